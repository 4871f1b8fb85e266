"""The GPU benchmark, one run in under 5 minutes: ``bench/gpu.sh OUT_DIR``.

    bench/gpu.sh bench/results/gpu              # on a CUDA machine (an H200 here)
    bench/gpu.sh bench/results/dry --dry-run    # the same code path, tiny, on the CPU

What one run measures, all against a bf16 matrix-product peak measured in the same run
(``torch.matmul`` 8192^3, best of several):

1. VGG-16 and VGG-19 with random weights, exported in the run (``testkit.models``) into a
   temporary repository; dense evaluation at Q = 256, 384, 512 with flips of a 4:3 image
   (512x384 source), batch 1 and 32 images: images/s and TFLOP/s (FLOPs counted exactly from
   the conv shapes) for PyTorch eager bf16 channels-last (the baseline a user would write) and
   our torch backend (``inference/backends/torch.py``, each compile mode as time allows).
2. The HTTP front end end to end: ``python -m server --backend torch`` on loopback, driven by
   concurrent keep-alive clients (standard library only).
3. First-request and steady-state latency over a stream of mixed aspect ratios, with exact
   rescaling and, where the server has it, ``--shape-multiple 32`` (with the probability
   difference it causes).

Results go to OUT_DIR/results.json and OUT_DIR/results.md after every step, so a run stopped
early still leaves what it measured; optional steps are skipped when the time budget
(``--budget-s``) would be exceeded, and say so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.util
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The toolkit's root and processes import only the standard library: the dependency check below
# still runs on a machine that lacks the rest.
from testkit import REPOSITORY_ROOT
from testkit.processes import ServerProcess

# What the run imports beyond PyTorch, ONNX and ONNX Runtime (bench/gpu.sh brings wheels).
REQUIRED_MODULES = (
    "torch",
    "onnx",
    "onnxruntime",
    "numpy",
    "PIL",
    "fastapi",
    "uvicorn",
    "multipart",
    "prometheus_client",
    "tritonclient.grpc",
    "google.protobuf",
)
BASE_MODULES = ("torch", "onnx", "onnxruntime", "numpy")  # expected on the machine
# Sources of the mixed-aspect-ratio stream (width, height): landscape, portrait, square, wide.
# 4:3 landscape is left out: the server's warm-up (--torch-warmup) runs that shape already.
STREAM_SIZES = (
    (600, 600),
    (750, 500),
    (500, 750),
    (800, 450),
    (450, 800),
    (840, 360),
    (700, 560),
    (560, 700),
    (740, 400),
    (480, 640),
)


@dataclass(frozen=True)
class Profile:
    """Sizes of one run: the real one on a GPU, or a tiny one on the CPU (``--dry-run``)."""

    name: str
    device: str
    dtype: str
    scales: tuple[int, ...]
    source: tuple[int, int]  # (width, height) of the 4:3 image
    batches: tuple[int, ...]  # images per batch
    iterations: dict[int, int]  # timed pipeline passes per batch size
    compile_modes: tuple[str, ...]  # the first is the backend's default and always runs
    peak_size: int
    arch_overrides: dict = field(default_factory=dict)  # vgg.models.build sizes (none: full)
    http_clients: int = 32
    http_requests: int = 256
    stream_scale: float = 1.0  # stream image sizes are STREAM_SIZES times this
    stream_repeats: int = 4
    server_start_s: float = 240.0


GPU = Profile(
    name="gpu",
    device="cuda",
    dtype="bf16",
    scales=(256, 384, 512),
    source=(512, 384),
    batches=(1, 32),
    iterations={1: 30, 32: 6},
    compile_modes=("reduce-overhead", "default", "off"),
    peak_size=8192,
)
DRY_RUN = Profile(
    name="dry-run",
    device="cpu",
    dtype="fp32",
    scales=(64, 96, 128),
    source=(128, 96),
    batches=(1, 4),
    iterations={1: 2, 4: 1},
    compile_modes=("off",),
    peak_size=1024,
    arch_overrides={"width": 0.125, "fc_width": 64, "crop": 64},
    http_clients=4,
    http_requests=8,
    stream_scale=0.2,
    stream_repeats=3,
    server_start_s=120.0,
)


class Budget:
    """Seconds left of the run; optional steps ask before they start."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, needed_s: float) -> bool:
        return self.left() >= needed_s


class Results:
    """results.json + results.md in the output folder, rewritten after every step."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out = out
        self.data = {
            **header,
            "peak": None,
            "pipeline": [],
            "http": [],
            "stream": [],
            "skipped": [],
            "notes": [],
        }

    def skip(self, what: str, why: str) -> None:
        print(f"skipped: {what} ({why})", flush=True)
        self.data["skipped"].append(f"{what}: {why}")
        self.save()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown(self.data))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the work: FLOPs, peak, exported models ----------------------------------------------------


def conv_flops(layers, n: int, height: int, width: int) -> int:
    """Exact FLOPs (2 per multiply-add) of the convolutions of ``layers`` on (n, 3, H, W)."""
    from torch import nn

    total = 0
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
            (ph, pw), (dh, dw) = layer.padding, layer.dilation
            height = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            width = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            per_output = 2 * (layer.in_channels // layer.groups) * kh * kw
            total += n * per_output * layer.out_channels * height * width
        elif isinstance(layer, nn.MaxPool2d):
            k, s = layer.kernel_size, layer.stride
            k, s = (k if isinstance(k, int) else k[0]), (s if isinstance(s, int) else s[0])
            height, width = (height - k) // s + 1, (width - k) // s + 1
    return total


def view_shapes(profile: Profile) -> list[tuple[int, int]]:
    """(H, W) of the rescaled 4:3 source at each Q."""
    from inference import rescaled_size

    return [rescaled_size(*profile.source, q)[::-1] for q in profile.scales]


def measure_peak(profile: Profile, device) -> dict:
    """Best TFLOP/s of ``torch.matmul`` n^3 (bf16 on CUDA, fp32 on the CPU), several trials."""
    import torch

    n = profile.peak_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    repeats = 20 if device.type == "cuda" else 2
    best = float("inf")
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return {"tflops": 2 * n**3 / best / 1e12, "n": n, "dtype": str(dtype).removeprefix("torch.")}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def export_logged(workdir: Path, repo: Path, arch: str, seed: int, overrides: dict) -> None:
    """Export ``arch`` with random weights (seed ``seed``) into ``repo``; its weights stay in
    ``workdir/ARCH.pth`` (the eager baseline loads them), its output in ``workdir``."""
    from testkit.models import export_random_model

    with (
        open(workdir / f"export-{arch}.log", "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        export_random_model(repo, arch, arch, seed, overrides, weights_path=workdir / f"{arch}.pth")


def export_models(profile: Profile, workdir: Path, archs: list[str]) -> Path:
    """Random-weight exports of ``archs`` into ``workdir/repo``, in parallel processes."""
    repo = workdir / "repo"
    # Spawned, not forked: this process has initialised CUDA (the peak measurement).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(archs), mp_context=context) as pool:
        exports = {
            arch: pool.submit(export_logged, workdir, repo, arch, seed, profile.arch_overrides)
            for seed, arch in enumerate(archs)
        }
        for arch, export in exports.items():
            try:
                export.result()
            except Exception as exc:
                tail = (workdir / f"export-{arch}.log").read_text()[-2000:]
                raise SystemExit(f"error: export of {arch} failed ({exc}):\n{tail}") from None
    return repo


# --- the pipeline: eager baseline and our backend ----------------------------------------------


class EagerBaseline:
    """What a user would write: torchvision-style VGG, FC as convs, bf16, channels-last, eager."""

    def __init__(self, profile: Profile, arch: str, weights: Path, entry, device) -> None:
        import torch

        from vgg.convert import to_fully_conv
        from vgg.models import build

        self.torch, self.device = torch, device
        model = build(arch, **profile.arch_overrides)
        model.load_state_dict(torch.load(weights, weights_only=True))
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            profile.dtype, torch.float32
        )
        self.channels_last = device.type == "cuda"
        net = to_fully_conv(model).eval().to(device, self.dtype)
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net
        self.mean = torch.tensor(entry.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(entry.std, device=device).view(1, 3, 1, 1)

    def run(self, views):
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(views).to(self.device)
            x = ((x.float() / 255 - self.mean) / self.std).to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            scores = self.net(x).float()
            return torch.softmax(scores.mean(dim=(2, 3)), dim=1).cpu().numpy()


def make_batches(profile: Profile, batch: int, seed: int = 0) -> list:
    """uint8 views per Q: ``batch`` images and their flips, (2 * batch, 3, H, W)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batches = []
    for height, width in view_shapes(profile):
        images = rng.integers(0, 256, (batch, 3, height, width), dtype=np.uint8)
        batches.append(np.ascontiguousarray(np.concatenate([images, images[..., ::-1]])))
    return batches


def time_pipeline(run, batches: list, iterations: int, warmup: int, device) -> dict:
    """Seconds per full pass (every Q, flips averaged) after ``warmup`` passes; first pass apart."""
    import numpy as np

    def one_pass():
        posteriors = [run(views) for views in batches]
        half = len(batches[0]) // 2
        return np.mean([(p[:half] + p[half:]) / 2 for p in posteriors], axis=0)

    synchronize(device)
    start = time.perf_counter()
    first = one_pass()
    first_s = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        one_pass()
    times = []
    for _ in range(iterations):
        synchronize(device)
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return {"first_s": first_s, "times": times, "posterior": first}


def probs_runner(backend, model: str):
    """``views -> probs`` through the backend's synchronous ``run`` (one thread: this one)."""
    return lambda views: backend.run(model, views)["probs"]


def pipeline_row(profile, model, method, batch, timing, flops_per_image, peak) -> dict:
    import numpy as np

    seconds = float(np.median(timing["times"]))
    tflops = flops_per_image * batch / seconds / 1e12
    return {
        "model": model,
        "method": method,
        "batch": batch,
        "images_per_s": batch / seconds,
        "tflops": tflops,
        "fraction_of_peak": tflops / peak["tflops"] if peak else None,
        "pass_ms_p50": seconds * 1e3,
        "pass_ms_min": min(timing["times"]) * 1e3,
        "first_pass_s": timing["first_s"],
        "iterations": len(timing["times"]),
    }


def bench_model(profile, arch, repo, workdir, device, peak, results, modes, eager=True) -> None:
    """The eager baseline (``eager``), then our backend in each compile mode of ``modes``."""
    import numpy as np
    import torch

    from inference import read_repository
    from inference.backends.torch import TorchBackend, load_modules

    entries = read_repository(repo, [arch])
    modules = load_modules(entries)
    flops = sum(conv_flops(modules[arch].layers, 2, h, w) for h, w in view_shapes(profile))
    results.data.setdefault("flops_per_image", {})[arch] = flops
    batches = {batch: make_batches(profile, batch) for batch in profile.batches}
    reference = {}

    baseline = EagerBaseline(profile, arch, workdir / f"{arch}.pth", entries[arch], device)
    for batch in profile.batches:
        timing = time_pipeline(baseline.run, batches[batch], profile.iterations[batch], 3, device)
        reference[batch] = timing["posterior"]
        if eager:
            row = pipeline_row(
                profile, arch, f"eager {profile.dtype} (baseline)", batch, timing, flops, peak
            )
            results.data["pipeline"].append(row)
            log(f"{arch} eager batch {batch}: {row['images_per_s']:.1f} images/s")
            results.save()
    del baseline
    empty_cache(device)

    for mode in modes:
        backend = TorchBackend(modules, device=str(device), dtype=profile.dtype, compile=mode)
        for batch in profile.batches:
            run = probs_runner(backend, arch)
            warmup = 3  # the 2nd pass records CUDA graphs, the 3rd replays them
            timing = time_pipeline(run, batches[batch], profile.iterations[batch], warmup, device)
            row = pipeline_row(
                profile,
                arch,
                f"torch backend {profile.dtype}, compile {mode}",
                batch,
                timing,
                flops,
                peak,
            )
            # Same weights, same input: how far our posterior is from the eager baseline's.
            row["max_abs_diff_vs_eager"] = float(
                np.max(np.abs(timing["posterior"] - reference[batch]))
            )
            eager_row = next(
                r
                for r in results.data["pipeline"]
                if r["model"] == arch and r["batch"] == batch and "eager" in r["method"]
            )
            row["speedup_vs_eager"] = row["images_per_s"] / eager_row["images_per_s"]
            results.data["pipeline"].append(row)
            log(
                f"{arch} {row['method']} batch {batch}: {row['images_per_s']:.1f} images/s "
                f"({row['speedup_vs_eager']:.2f}x eager; first pass {row['first_pass_s']:.1f} s)"
            )
            results.save()
        asyncio.run(backend.close())
        del backend
        modules = load_modules(entries)  # fresh float32 modules for the next mode
        torch._dynamo.reset()
        empty_cache(device)


def empty_cache(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the HTTP front end ------------------------------------------------------------------------


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = f"vggservebench{os.getpid()}"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="i.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def server_process(
    profile: Profile, args: list[str], log_dir: Path, budget: Budget
) -> ServerProcess:
    """``python -m server ARGS`` on a free loopback port, counted as started once its backend is
    ready (``/readyz``); its log goes to ``log_dir``."""
    start_timeout = min(profile.server_start_s, budget.left())
    return ServerProcess(*args, log_dir=log_dir, start_timeout=start_timeout, health_path="/readyz")


def get(port: int, path: str) -> tuple[int, bytes]:
    """``GET path`` on the loopback server at ``port``: the status and the body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Client:
    """One keep-alive connection per thread, posting images to /v1/classify."""

    def __init__(self, port: int, query: str) -> None:
        self.port, self.query = port, query
        self.local = threading.local()

    def classify(self, data: bytes) -> tuple[float, dict]:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=300
            )
        body, content_type = multipart(data)
        start = time.perf_counter()
        connection.request(
            "POST", f"/v1/classify?{self.query}", body=body, headers={"Content-Type": content_type}
        )
        response = connection.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
        return elapsed, json.loads(payload)


def server_args(profile: Profile, repo: Path, arch: str, mode: str, extra=()) -> list[str]:
    warmup = "x".join(map(str, profile.source))
    return [
        "--backend",
        "torch",
        "--repository",
        str(repo),
        "--models",
        arch,
        "--scales",
        ",".join(map(str, profile.scales)),
        "--torch-device",
        profile.device,
        "--torch-dtype",
        profile.dtype,
        "--torch-compile",
        mode,
        "--torch-warmup",
        warmup,
        "--max-concurrency",
        str(profile.http_clients),
        "--max-queue",
        "4096",
        "--log-level",
        "warning",
        *extra,
    ]


def bench_http(profile, repo, arch, out, results, budget) -> None:
    """Images/s through POST /v1/classify with many clients, and one-at-a-time latency."""
    import numpy as np

    from testkit.images import jpeg

    mode = profile.compile_modes[0]
    images = [jpeg(*profile.source, seed=i) for i in range(8)]
    scales = ",".join(map(str, profile.scales))
    # Micro-batches as large as the backend's batch-32 runs (64 views), where the server has them.
    extra = ["--max-batch", str(2 * max(profile.batches))] if server_has_flag("--max-batch") else []
    with server_process(
        profile, server_args(profile, repo, arch, mode, extra), out / f"http-{arch}", budget
    ) as running:
        client = Client(running.port, f"scales={scales}&flip=true")
        for data in images[:3]:  # the warm-up covered the shapes; this warms the connections
            client.classify(data)
        latencies = [client.classify(images[i % len(images)])[0] for i in range(10)]
        load = [images[i % len(images)] for i in range(profile.http_requests)]
        with ThreadPoolExecutor(profile.http_clients) as pool:
            # One untimed pass: micro-batches of new sizes compile nothing (dynamic shapes) but
            # record their CUDA graphs on first use.
            list(pool.map(client.classify, load))
            start = time.perf_counter()
            list(pool.map(client.classify, load))
            seconds = time.perf_counter() - start
    backend_rows = [
        r
        for r in results.data["pipeline"]
        if r["model"] == arch and r["method"].endswith(f"compile {mode}")
    ]
    best_backend = max((r["images_per_s"] for r in backend_rows), default=None)
    flops = results.data["flops_per_image"][arch]
    row = {
        "model": arch,
        "method": f"HTTP front end, torch backend compile {mode}",
        "server_flags": " ".join(extra),
        "clients": profile.http_clients,
        "requests": profile.http_requests,
        "images_per_s": profile.http_requests / seconds,
        "tflops": flops * profile.http_requests / seconds / 1e12,
        "latency_ms_p50_one_client": float(np.median(latencies)) * 1e3,
        "server_start_s": running.start_seconds,
        "vs_backend_best": (profile.http_requests / seconds / best_backend)
        if best_backend
        else None,
    }
    results.data["http"].append(row)
    log(
        f"{arch} HTTP: {row['images_per_s']:.1f} images/s, one client p50 "
        f"{row['latency_ms_p50_one_client']:.1f} ms"
    )
    results.save()


def server_has_flag(flag: str) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "server", "--help"],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
    )
    return flag in result.stdout


def bench_stream(profile, repo, arch, out, results, budget, multiple: int | None) -> dict:
    """Sequential requests over mixed aspect ratios: first occurrence of a shape vs later ones."""
    import numpy as np

    from inference import rescaled_size
    from testkit.images import jpeg

    sizes = [
        (round(w * profile.stream_scale), round(h * profile.stream_scale)) for w, h in STREAM_SIZES
    ]
    rng = np.random.default_rng(0)
    order = [i for _ in range(profile.stream_repeats) for i in rng.permutation(len(sizes))]
    images = {i: jpeg(*sizes[i], seed=100 + i) for i in set(order)}
    mode = profile.compile_modes[0]
    extra = ["--shape-multiple", str(multiple)] if multiple else []
    label = f"--shape-multiple {multiple}" if multiple else "exact rescaling"
    scales = ",".join(map(str, profile.scales))

    def shapes_of(size):
        return tuple(rescaled_size(*size, q, multiple) for q in profile.scales)

    seen: dict[tuple, int] = {}
    by_occurrence: dict[int, list[float]] = {}
    posteriors = []
    with server_process(
        profile,
        server_args(profile, repo, arch, mode, extra),
        out / f"stream-{arch}-{multiple or 'exact'}",
        budget,
    ) as running:
        classes = int(json.loads(get(running.port, "/v1/models")[1])["models"][0]["classes"])
        client = Client(running.port, f"scales={scales}&flip=true&top_k={classes}")
        for index in order:
            key = shapes_of(sizes[index])
            occurrence = seen[key] = seen.get(key, 0) + 1
            elapsed, body = client.classify(images[index])
            by_occurrence.setdefault(occurrence, []).append(elapsed * 1e3)
            probs = np.zeros(classes)
            for item in body["per_model"][arch]:
                probs[item["index"]] = item["probability"]
            posteriors.append(probs)
    steady = [ms for k, values in by_occurrence.items() if k >= 3 for ms in values]
    row = {
        "model": arch,
        "rescaling": label,
        "compile": mode,
        "requests": len(order),
        "distinct_shapes": len({s for key in seen for s in key}),
        "first_ms_mean": float(np.mean(by_occurrence[1])),
        "first_ms_max": float(np.max(by_occurrence[1])),
        "second_ms_mean": float(np.mean(by_occurrence[2])) if 2 in by_occurrence else None,
        "steady_ms_p50": float(np.median(steady)) if steady else None,
        "server_start_s": running.start_seconds,
    }
    results.data["stream"].append(row)
    log(
        f"{arch} stream ({label}): first {row['first_ms_mean']:.1f} ms mean, steady "
        f"{row['steady_ms_p50'] or float('nan'):.1f} ms p50, {row['distinct_shapes']} shapes"
    )
    results.save()
    return {"row": row, "posteriors": np.array(posteriors)}


# --- the report --------------------------------------------------------------------------------


def fmt(value, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(data: dict) -> str:
    lines = [
        f"# bench/gpu.sh ({data['profile']})",
        "",
        f"{data['device_name']}; torch {data['torch']}, CUDA {data['cuda']}, cuDNN "
        f"{data['cudnn']}; {data['started']}",
        "",
    ]
    peak = data.get("peak")
    if peak:
        lines += [
            f"Matrix-product peak ({peak['dtype']} {peak['n']}^3, best of 6): "
            f"**{peak['tflops']:.1f} TFLOP/s**",
            "",
        ]
    for arch, flops in data.get("flops_per_image", {}).items():
        lines.append(
            f"{arch}: {flops / 1e12:.3f} TFLOP per image (Q = {data['scales']}, flips, "
            f"{data['source']} source)"
        )
    if data["pipeline"]:
        lines += [
            "",
            "| model | method | batch | images/s | TFLOP/s | % of peak | vs eager | pass ms p50 | first pass s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in data["pipeline"]:
            share = None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"]
            lines.append(
                f"| {r['model']} | {r['method']} | {r['batch']} | {r['images_per_s']:.1f} | "
                f"{r['tflops']:.2f} | {fmt(share)} | {fmt(r.get('speedup_vs_eager'), '.2f')} | "
                f"{r['pass_ms_p50']:.1f} | {r['first_pass_s']:.1f} |"
            )
    if data["http"]:
        lines += [
            "",
            "| model | path | clients | images/s | TFLOP/s | vs backend (best batch) | one-client p50 ms | start s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in data["http"]:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['clients']} | {r['images_per_s']:.1f} | "
                f"{r['tflops']:.2f} | {fmt(r['vs_backend_best'], '.2f')} | "
                f"{r['latency_ms_p50_one_client']:.1f} | {r['server_start_s']:.0f} |"
            )
    if data["stream"]:
        lines += [
            "",
            "| model | rescaling | requests | input shapes | first-request ms (mean / max) | 2nd ms | steady p50 ms | max |Δp| vs exact |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in data["stream"]:
            lines.append(
                f"| {r['model']} | {r['rescaling']} | {r['requests']} | {r['distinct_shapes']} | "
                f"{r['first_ms_mean']:.1f} / {r['first_ms_max']:.1f} | {fmt(r['second_ms_mean'])} | "
                f"{fmt(r['steady_ms_p50'])} | {fmt(r.get('max_abs_diff_vs_exact'), '.2e')} |"
            )
    for title, items in (("Skipped", data["skipped"]), ("Notes", data["notes"])):
        if items:
            lines += ["", f"{title}:", *[f"- {item}" for item in items]]
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out", type=Path, nargs="?", help="folder for results.json, results.md, logs"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny models on the CPU, same code path (to check the script)",
    )
    parser.add_argument(
        "--models", default="vgg16,vgg19", help="architectures (default: %(default)s)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=280.0,
        help="optional steps are skipped past this (default: %(default)s)",
    )
    parser.add_argument(
        "--check-deps",
        action="store_true",
        help="only check that every module the run imports is installed",
    )
    args = parser.parse_args(argv)
    if args.out is None and not args.check_deps:
        parser.error("give the output folder (e.g. bench/results/gpu)")
    return args


def check_deps() -> list[str]:
    missing = []
    for name in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


def run_steps(profile, args, device, archs, results, budget, started) -> None:
    """Peak, exports, the pipeline per model, HTTP, the streams, other compile modes."""
    results.data["peak"] = peak = measure_peak(profile, device)
    log(f"matrix peak: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']} {peak['n']}^3)")
    results.save()

    with tempfile.TemporaryDirectory(prefix="vggserve-gpu-bench-") as tmp:
        workdir = Path(tmp)
        log(f"exporting {', '.join(archs)} with random weights into {workdir}/repo")
        repo = export_models(profile, workdir, archs)
        results.data["export_s"] = round(time.monotonic() - started, 1)
        main_mode, *extra_modes = profile.compile_modes
        for arch in archs:  # the baseline and the backend's default mode first, for every model
            bench_model(profile, arch, repo, workdir, device, peak, results, [main_mode])
        first = archs[0]
        steps = [("http", None), ("stream", None)]
        if server_has_flag("--shape-multiple"):
            steps.append(("stream", 32))
        else:
            results.data["notes"].append(
                "the server has no --shape-multiple yet: bucketed stream not run"
            )
        exact = None
        for step, multiple in steps:
            if not budget.allows(60 if profile.device == "cpu" else 100):
                results.skip(f"{step} {multiple or ''}".strip(), f"{budget.left():.0f} s left")
                continue
            try:
                if step == "http":
                    bench_http(profile, repo, first, args.out, results, budget)
                    continue
                measured = bench_stream(profile, repo, first, args.out, results, budget, multiple)
                if multiple is None:
                    exact = measured["posteriors"]
                elif exact is not None:
                    import numpy as np

                    row = measured["row"]
                    row["max_abs_diff_vs_exact"] = float(
                        np.max(np.abs(measured["posteriors"] - exact))
                    )
                    results.save()
            except RuntimeError as exc:  # a server that failed: keep what was measured
                results.skip(f"{step} {multiple or ''}".strip(), str(exc))
        for mode in extra_modes:  # other compile modes of the backend, as time allows
            if not budget.allows(90):
                results.skip(f"{first} torch backend compile {mode}", f"{budget.left():.0f} s left")
                continue
            bench_model(profile, first, repo, workdir, device, peak, results, [mode], eager=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = check_deps()
    base = [name for name in missing if name in BASE_MODULES]
    if base:
        print(
            f"error: missing {', '.join(base)}: this run needs PyTorch, ONNX and ONNX Runtime "
            "installed",
            file=sys.stderr,
        )
        return 2
    if missing:
        print(
            f"error: missing Python modules: {', '.join(missing)}; bench/gpu.sh installs them "
            "from bench/results/wheels (fill it with bench/gpu.sh --fetch-wheels where there is "
            "internet)",
            file=sys.stderr,
        )
        return 2
    if args.check_deps:
        return 0
    import torch

    profile = DRY_RUN if args.dry_run else GPU
    if profile.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: no CUDA device is visible to PyTorch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda}); this benchmark needs a GPU. Check the script on the CPU "
            "with: bench/gpu.sh OUT_DIR --dry-run",
            file=sys.stderr,
        )
        return 2
    budget = Budget(args.budget_s)
    started = time.monotonic()
    device = torch.device("cuda:0" if profile.device == "cuda" else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    archs = [a.strip() for a in args.models.split(",") if a.strip()]
    header = {
        "profile": profile.name,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "scales": list(profile.scales),
        "source": "x".join(map(str, profile.source)),
        "batches": list(profile.batches),
        "dtype": profile.dtype,
        "settings": {k: v for k, v in asdict(profile).items() if k != "name"},
        "load_average": os.getloadavg(),
    }
    results = Results(args.out, header)
    results.save()
    log(f"{profile.name} run on {header['device_name']}, budget {args.budget_s:.0f} s")

    try:
        run_steps(profile, args, device, archs, results, budget, started)
    except KeyboardInterrupt:  # bench/gpu.sh's time limit: what finished is already saved
        results.data["notes"].append(
            f"stopped at {time.monotonic() - started:.0f} s by the time limit"
        )
        results.save()
        print(f"stopped by the time limit; partial results in {args.out}", file=sys.stderr)
        return 130
    results.data["total_s"] = round(time.monotonic() - started, 1)
    results.save()
    print(markdown(results.data))
    log(f"done in {results.data['total_s']:.0f} s: {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
