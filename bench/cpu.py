"""VGG-16 and VGG-19 on this CPU: ONNX Runtime, OpenVINO (fp32, bf16, int8) and PyTorch, one run.

    bench/cpu.sh                                   # Q = 256,384,512 with flips, 3 images per model
    bench/cpu.sh --scales 256 --images 4           # quicker
    bench/cpu.sh --models vgg16 --calibration-images 8

Full-size networks with seeded random weights (no ImageNet weights are needed or fetched) are
exported into a temporary repository: fp32 with ``export/to_onnx.py``, int8 with
``export.quantize`` (calibrated on generated 640x480 images at the same scales; random weights
give near-uniform posteriors, so the export's int8-vs-fp32 agreement check is not applied here:
accuracy is measured on trained models by ``python -m bench.int8_accuracy``). OpenVINO (where
it is installed) runs the same two files as ``--backend openvino`` does: fp32, bf16 where the
CPU computes bf16 natively (what ``--openvino-precision auto`` picks there), and the int8 file
at the default precision. Each image is evaluated densely per the paper (every Q, the image and
its flip as one batch of 2) by every engine in turn, image after image, so load from other jobs
falls on all alike. Printed: the median seconds per image of each engine, images/s, GFLOP/s
(fp32-equivalent) and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.report import load_average, machine
from export import quantize
from export.graph import ServingGraph
from export.repository import ModelInfo, write_model
from inference import decode_image, read_repository
from inference.backends.onnxruntime import session_options
from inference.protocol import dense_batch, parse_scales
from testkit.images import jpeg
from testkit.models import export_random_model
from vgg.convert import to_fully_conv
from vgg.models import build

ENGINES = ("PyTorch eager fp32", "ONNX Runtime fp32", "ONNX Runtime int8")
OPENVINO_FP32, OPENVINO_BF16, OPENVINO_INT8 = "OpenVINO fp32", "OpenVINO bf16", "OpenVINO int8"


def openvino_engines() -> tuple[str, ...]:
    """The OpenVINO rows this machine can run: none without OpenVINO, no bf16 without native
    bf16 (the reason is printed)."""
    try:
        from inference.backends.openvino import native_bf16
    except ImportError as exc:
        print(f"OpenVINO rows left out: {exc} (pip install 'openvino>=2026.4,<2027')")
        return ()
    if native_bf16():
        return (OPENVINO_FP32, OPENVINO_BF16, OPENVINO_INT8)
    print("OpenVINO bf16 row left out: this CPU has no native bf16 (OpenVINO's capabilities)")
    return (OPENVINO_FP32, OPENVINO_INT8)


def openvino_runners(entries: dict, engines: tuple[str, ...]) -> dict:
    """OpenVINO's runners (``--backend openvino`` with every core) for ``engines``."""
    from inference.backends.openvino import OpenVinoBackend

    fp32, int8 = entries.values()
    chosen = {
        OPENVINO_FP32: (fp32, "fp32"),
        OPENVINO_BF16: (fp32, "bf16"),
        OPENVINO_INT8: (int8, "auto"),
    }
    runners = {}
    for engine in engines:
        entry, precision = chosen[engine]
        backend = OpenVinoBackend({"model": entry}, precision=precision)
        runners[engine] = lambda batch, backend=backend: backend.run("model", batch, ("probs",))[
            "probs"
        ]
    return runners


def prepare(
    workdir: Path,
    arch: str,
    calibration: list[Path],
    scales: tuple[int, ...],
    openvino: tuple[str, ...] = (),
) -> dict:
    """Export ``arch`` (random weights) in fp32 and int8; returns the engines' runners
    (``openvino``: the OpenVINO rows to add)."""
    started = time.perf_counter()
    repo = export_random_model(workdir / "repo", arch, arch, seed=0)
    fp32_entry = read_repository(repo, [arch])[arch]
    fp32_bytes = fp32_entry.onnx_path.read_bytes()
    exported = time.perf_counter()
    int8_bytes = quantize.quantize_int8(fp32_bytes, calibration, scales)
    info = ModelInfo(
        f"{arch}-int8",
        fp32_entry.num_classes,
        fp32_entry.mean,
        fp32_entry.std,
        fp32_entry.min_size,
        fp32_entry.arch,
        precision="int8",
    )
    write_model(repo, info, 1, int8_bytes, fp32_entry.labels)
    print(
        f"{arch}: fp32 export {exported - started:.0f} s, int8 quantisation "
        f"{time.perf_counter() - exported:.0f} s ({len(calibration)} images)",
        flush=True,
    )
    del fp32_bytes, int8_bytes
    entries = read_repository(repo, [arch, f"{arch}-int8"])
    options = session_options()  # the server's: every core, no arena
    sessions = {
        precision: ort.InferenceSession(
            str(entry.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        for precision, entry in zip(("fp32", "int8"), entries.values(), strict=True)
    }
    torch.manual_seed(0)  # the same weights export_random_model wrote
    graph = ServingGraph(to_fully_conv(build(arch)).eval(), fp32_entry.mean, fp32_entry.std)

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return graph(torch.from_numpy(batch))[0].numpy()

    def onnxruntime(precision: str):
        session = sessions[precision]
        return lambda batch: session.run(["probs"], {"image": batch})[0]

    return {
        "graph": graph,
        ENGINES[0]: eager,
        ENGINES[1]: onnxruntime("fp32"),
        ENGINES[2]: onnxruntime("int8"),
        **openvino_runners(entries, openvino),
    }


def counting_conv_gflop(graph: ServingGraph) -> tuple[list[float], callable]:
    """Hooks that add up convolution GFLOP (2 x multiply-adds) from output shapes; returns the
    running list and a function that removes the hooks."""
    gflop: list[float] = []

    def count(module: torch.nn.Conv2d, inputs, output) -> None:
        kernel = module.kernel_size[0] * module.kernel_size[1]
        gflop.append(2e-9 * output.numel() * module.in_channels * kernel)

    hooks = [
        m.register_forward_hook(count) for m in graph.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    return gflop, lambda: [hook.remove() for hook in hooks]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--models", default="vgg16,vgg19", help="vgg16, vgg19 or both")
    parser.add_argument("--scales", default="256,384,512", help="Q set, each with its flip")
    parser.add_argument("--images", type=int, default=3, help="measured images per model")
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=4,
        help="int8 calibration images (random weights: speed does not depend on it)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep exports here (reused)")
    args = parser.parse_args()
    scales = parse_scales(args.scales)
    models = args.models.split(",")
    print(f"{machine()}; load average {load_average()} at the start", flush=True)
    engines = ENGINES + openvino_engines()
    images = [decode_image(jpeg(640, 480, seed=1 + i)) for i in range(args.images + 1)]
    with tempfile.TemporaryDirectory(prefix="vggserve-bench-cpu-") as temporary:
        work = args.workdir or Path(temporary)
        calibration_dir = work / "calibration"
        calibration_dir.mkdir(parents=True, exist_ok=True)
        for i in range(args.calibration_images):
            (calibration_dir / f"{i:03d}.jpg").write_bytes(jpeg(640, 480, seed=1000 + i))
        calibration = sorted(calibration_dir.glob("*.jpg"))
        rows = []
        for arch in models:
            runners = prepare(work / arch, arch, calibration, scales, engines[len(ENGINES) :])
            warm, *measured = images  # the first image: first-run costs of every shape
            batches = [dense_batch(warm, q) for q in scales]
            counted, remove_hooks = counting_conv_gflop(runners["graph"])
            for engine in engines:
                for batch in batches:
                    runners[engine](batch)
            remove_hooks()
            gflop = sum(counted)  # 4:3 images of one size: the same work for every image
            seconds = {engine: [] for engine in engines}
            for image in measured:
                batches = [dense_batch(image, q) for q in scales]
                for engine in engines:
                    started = time.perf_counter()
                    for batch in batches:
                        runners[engine](batch)
                    seconds[engine].append(time.perf_counter() - started)
                print(
                    f"{arch}: " + ", ".join(f"{e} {seconds[e][-1]:.2f} s" for e in engines),
                    flush=True,
                )
            rows.append((arch, gflop, {e: float(np.median(s)) for e, s in seconds.items()}))
            del runners
    print()
    print(
        f"{machine()}; load average {load_average()} at the end; Q = "
        f"{','.join(map(str, scales))} with flips, 640x480 images, {args.images} per model"
    )
    print()
    print("| model | engine | median s/image | images/s | GFLOP/s | x PyTorch eager | x ORT fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch, gflop, median in rows:
        for engine in engines:
            s = median[engine]
            print(
                f"| {arch} | {engine} | {s:.2f} | {1 / s:.3f} | {gflop / s:.0f} | "
                f"{median[ENGINES[0]] / s:.2f} | {median[ENGINES[1]] / s:.2f} |"
            )
    print(
        f"\n(GFLOP per image: {', '.join(f'{a} {g:.0f}' for a, g, _ in rows)}; int8 counted "
        "as the same operations)"
    )
    if OPENVINO_INT8 in engines:
        # --openvino-precision auto: bf16 where the CPU has it (the bf16 row), else fp32.
        default = OPENVINO_BF16 if OPENVINO_BF16 in engines else OPENVINO_FP32
        for arch, _, median in rows:
            print(
                f"{arch}: OpenVINO at its default ({default}) {median[ENGINES[1]] / median[default]:.2f}x "
                f"ONNX Runtime fp32; OpenVINO int8 {median[ENGINES[2]] / median[OPENVINO_INT8]:.2f}x "
                "ONNX Runtime int8"
            )


if __name__ == "__main__":
    main()
