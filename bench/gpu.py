"""The GPU benchmark, one run of at most 5 minutes: ``bench/gpu.sh OUT_DIR``.

    bench/gpu.sh bench/results/gpu              # on a CUDA machine (an H200 here)
    bench/gpu.sh bench/results/dry --dry-run    # the same code path, tiny, on the CPU
    bench/gpu.sh --check-deps                   # what the run needs, each missing item on a line

What one run measures, all against a bf16 matrix-product peak measured in the same run
(``torch.matmul`` 8192^3, best of several):

1. VGG-16 and VGG-19 exported in the run into a temporary repository, with seeded random
   weights whose last layer is scaled so that the test images get posteriors like a trained
   model's (top-1 probability around 0.6, not the near-uniform ones of random weights), and
   class names written by the run. Dense evaluation at Q = 256, 384, 512 with flips of 4:3
   images (512x384 source), batches of 1 and 32 images: images/s and TFLOP/s (FLOPs counted
   from the conv shapes) for PyTorch eager bf16 channels-last (the baseline a user would write)
   and our torch backend (``inference/backends/torch.py``, each compile mode as time allows).
2. Accuracy of each engine against float32 with TF32 off, on the same images: the score maps'
   relative error, the largest posterior difference and top-1 agreement, each against a bound
   derived from the format's rounding (``testkit/tolerances.py``). A bound exceeded marks the
   row FAIL and the run exits 1.
3. The HTTP front end end to end: ``python -m server --backend torch`` on loopback, driven by
   concurrent keep-alive clients (standard library only).
4. First-request and steady-state latency over a stream of mixed aspect ratios, with exact
   rescaling and with ``--shape-multiple 32`` (with the probability difference it causes).

The torch backend compiles and captures its CUDA graphs at warm-up, in the benchmark as in the
server, so the timed passes measure what a warm server does. Every step counts what would stall
the request path after warm-up: the compiler's recompiles (the ``recompiles`` log of
``TORCH_LOGS``) and the batch shapes the backend runs eagerly because warm-up did not compile
them; and the CUDA graphs the backend captured (its ``stats``; in the servers, their
``vggserve_torch_*`` gauges on /metrics, read when they answered ready and at the end).

Results go to OUT_DIR/results.json and OUT_DIR/results.md after every step, so a run stopped
early still leaves what it measured. ``bench/gpu.sh`` sets the run's deadline
(``VGGSERVE_BENCH_DEADLINE``, epoch seconds) before it installs anything; optional steps that
would not finish by then are skipped and say so. Every server the run starts is stopped on the
way out, also on SIGINT and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import http.client
import importlib
import importlib.util
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The toolkit's root and processes import only the standard library: the dependency check below
# still runs on a machine that lacks the rest.
from testkit import REPOSITORY_ROOT
from testkit.processes import ServerProcess

# Every module the run imports that the standard library lacks: (module, what pip installs,
# who needs it). Imported for real by the check, so a wheel that installs but cannot load (a
# missing shared library) counts as missing. tests/test_bench_scripts.py checks that this covers
# every third-party import of the code the run executes.
DEPENDENCIES = (
    ("torch", "torch", "the engines, the peak, torch.compile"),
    ("numpy", "numpy", "everything"),
    ("onnx", "onnx", "the export, and the torch backend's graph reader"),
    ("onnxruntime", "onnxruntime", "the export checks its graph with it"),
    ("PIL", "pillow", "image decoding"),
    ("google.protobuf", "protobuf", "config.pbtxt"),
    ("grpc", "grpcio", "tritonclient.grpc"),
    ("tritonclient.grpc", "tritonclient[grpc]", "the repository reader's config messages"),
    ("fastapi", "fastapi", "the HTTP front end"),
    ("fastapi_offline", "fastapi-offline", "the front end's /docs assets (checked at start)"),
    ("starlette", "starlette", "the HTTP front end"),
    ("pydantic", "pydantic", "the front end's schemas"),
    ("python_multipart", "python-multipart", "uploads"),
    ("uvicorn", "uvicorn", "the HTTP server"),
    ("h11", "h11", "the HTTP server's protocol"),
    ("prometheus_client", "prometheus-client", "/metrics"),
)
# On the machine before anything is installed: bench/gpu.sh brings the rest as wheels.
BASE_MODULES = ("torch", "numpy", "onnx", "onnxruntime")
# Exit statuses of --check-deps: a Python module is missing (bench/gpu.sh can install wheels),
# or something else is (a compiler, headers, the driver), or both (MISSING_MODULES).
MISSING_MODULES, MISSING_OTHER = 3, 2
COMPILE_CHECK_TIMEOUT_S = 240.0
# ``x + 1`` through torch.compile in a fresh process with empty caches: the whole first-compile
# path (Inductor, its C/C++ compiler and Python.h; on CUDA Triton, libcuda and ptxas) in seconds.
COMPILE_CHECK = """
import sys, time
import torch
device = sys.argv[1]
x = torch.arange(8, dtype=torch.float32, device=device)
start = time.perf_counter()
y = torch.compile(lambda t: t + 1, fullgraph=True)(x)
assert torch.equal(y.cpu(), torch.arange(1, 9, dtype=torch.float32)), y
print(f"{time.perf_counter() - start:.1f}")
"""

DEADLINE_VARIABLE = "VGGSERVE_BENCH_DEADLINE"  # epoch seconds, set by bench/gpu.sh
# Set to 1 by bench/gpu.sh once its --check-deps passed: the run does not compile x + 1 again.
CHECKED_VARIABLE = "VGGSERVE_BENCH_DEPS_CHECKED"
# Seconds kept before the deadline for stopping servers and writing results.
DEADLINE_RESERVE_S = 15.0
TORCH_LOGS = "recompiles"
# Dynamo's recompiles log, one line per recompile. A recompile the backend refuses after warm-up
# (the shape then runs eagerly) logs nothing: the eager-shapes gauge counts those.
RECOMPILE_MARK = "Recompiling function"
# The torch backend's /metrics gauges: its own CUDA graphs (Inductor's graph trees stay off, so
# TORCH_LOGS=cudagraphs would say nothing) and the batch shapes it runs eagerly.
TORCH_GAUGES = {
    "cuda_graphs": "vggserve_torch_cuda_graphs",
    "cuda_graph_bytes": "vggserve_torch_cuda_graph_memory_bytes",
    "eager_shapes": "vggserve_torch_eager_shapes",
}
# The fp32 reference's top-1 posterior the classifier is scaled to: a trained VGG's typical
# confidence, between near-uniform (random weights) and one-hot (where nothing can disagree).
TARGET_TOP1_POSTERIOR = 0.6
CALIBRATION_IMAGES = 4
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
    source: tuple[int, int]  # (width, height) of the 4:3 images
    batches: tuple[int, ...]  # images per batch; the largest is also the accuracy check's
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
# The GPU run's steps, engines and tables with tiny models on the CPU: bf16 convolutions (so the
# accuracy bounds are the GPU's), Inductor compiling C++ instead of Triton, no CUDA graphs.
DRY_RUN = Profile(
    name="dry-run",
    device="cpu",
    dtype="bf16",
    # Q above the 64 crop: at Q = 64 the score map is 1x1, a size the compiler specialises,
    # which the GPU run's sizes never make.
    scales=(96, 128, 160),
    source=(160, 120),
    batches=(1, 4),
    iterations={1: 2, 4: 1},
    compile_modes=("reduce-overhead", "off"),
    peak_size=1024,
    arch_overrides={"width": 0.125, "fc_width": 64, "crop": 64},
    http_clients=4,
    http_requests=8,
    stream_scale=0.2,
    stream_repeats=3,
    server_start_s=150.0,
)


class Budget:
    """Seconds left before the run's deadline (less a reserve); optional steps ask first."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # epoch seconds

    @classmethod
    def from_environment(cls, fallback_s: float) -> Budget:
        """The deadline bench/gpu.sh set (:data:`DEADLINE_VARIABLE`), else ``fallback_s`` from
        now."""
        value = os.environ.get(DEADLINE_VARIABLE)
        if not value:
            return cls(time.time() + fallback_s)
        try:
            return cls(float(value))
        except ValueError:
            raise SystemExit(
                f"error: {DEADLINE_VARIABLE}={value!r} is not a time in epoch seconds"
            ) from None

    def left(self) -> float:
        """Seconds until the deadline less the reserve (negative once past it)."""
        return self.deadline - DEADLINE_RESERVE_S - time.time()

    def allows(self, needed_s: float) -> bool:
        """Whether a step of ``needed_s`` seconds still ends before the deadline."""
        return self.left() >= needed_s


class Results:
    """results.json + results.md in the output folder, rewritten after every step."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out = out
        self.data = {
            **header,
            "peak": None,
            "pipeline": [],
            "accuracy": [],
            "http": [],
            "stream": [],
            "skipped": [],
            "notes": [],
        }

    def skip(self, what: str, why: str) -> None:
        print(f"skipped: {what} ({why})", flush=True)
        self.data["skipped"].append(f"{what}: {why}")
        self.save()

    def failures(self) -> list[str]:
        """The accuracy rows that exceeded a bound, one line each."""
        return [
            f"{r['model']} {r['method']}: {'; '.join(r['exceeded'])}"
            for r in self.data["accuracy"]
            if r["verdict"] == "FAIL"
        ]

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown(self.data))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- what the run needs ------------------------------------------------------------------------


def check_dependencies(device: str) -> tuple[list[str], int]:
    """Every missing item the run on ``device`` (``cuda`` or ``cpu``) needs, one line each saying
    what and how to get it, and the exit status for them (0 when nothing is missing)."""
    missing_modules = []
    lines = []
    for module, requirement, user in DEPENDENCIES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a library the module loads that is absent
            missing_modules.append(module)
            if module in BASE_MODULES:
                how = f"install it with the machine's CUDA build ({requirement})"
            else:
                how = (
                    f"pip install '{requirement}', or offline: bench/gpu.sh installs it from "
                    "bench/wheels (filled by bench/gpu.sh --fetch-wheels where there is internet)"
                )
            lines.append(
                f"missing Python module {module} ({user}): {type(exc).__name__}: "
                f"{first_line(exc)}; {how}"
            )
    lines += check_toolchain(device, torch_missing="torch" in missing_modules)
    if not lines:  # the compile needs everything above: a missing item is already on a line
        lines += check_compile(device)
    if missing_modules:
        return lines, MISSING_MODULES
    return lines, MISSING_OTHER if lines else 0


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def check_toolchain(device: str, torch_missing: bool) -> list[str]:
    """What Inductor needs on its first compile on ``device``: a compiler, Python.h, and on
    CUDA the driver's library, Triton and a visible device."""
    lines = []
    if device == "cuda":
        # Triton builds its CUDA launcher with a C compiler: $CC, else gcc, else clang.
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            lines.append(
                "no C compiler (CC, gcc or clang on PATH): Triton builds its kernel launcher with "
                "it on the first torch.compile; install gcc (apt-get install gcc) or set CC"
            )
    elif not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        lines.append(
            "no C++ compiler (CXX, g++ or clang++ on PATH): Inductor compiles its CPU kernels "
            "with it; install g++ (apt-get install g++) or set CXX"
        )
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        lines.append(
            f"no Python.h in {include}: Inductor and Triton compile C extensions against this "
            f"Python's headers; install them (apt-get install python{version}-dev)"
        )
    if torch_missing:
        return lines
    import torch

    if device == "cuda":
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            lines.append(
                f"libcuda.so.1 cannot be loaded ({exc}): the NVIDIA driver's library, which "
                "Triton links against; install the driver or add its folder to LD_LIBRARY_PATH"
            )
        if importlib.util.find_spec("triton") is None:
            lines.append(
                f"missing Python module triton: torch.compile's GPU code generator; install the "
                f"version PyTorch {torch.__version__} pins (pip install triton)"
            )
        if not torch.cuda.is_available():
            lines.append(
                f"no CUDA device is visible to PyTorch {torch.__version__} (built for CUDA "
                f"{torch.version.cuda}); this benchmark needs a GPU. Check the script on the CPU "
                "with: bench/gpu.sh OUT_DIR --dry-run"
            )
    return lines


def check_compile(device: str) -> list[str]:
    """``torch.compile`` of ``x + 1`` on ``device`` in a fresh process with empty caches."""
    with tempfile.TemporaryDirectory(prefix="vggserve-compile-check-") as cache:
        environment = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": cache,
            "TRITON_CACHE_DIR": str(Path(cache) / "triton"),
        }
        try:
            result = subprocess.run(
                [sys.executable, "-c", COMPILE_CHECK, device],
                capture_output=True,
                text=True,
                timeout=COMPILE_CHECK_TIMEOUT_S,
                env=environment,
            )
        except subprocess.TimeoutExpired:
            return [
                f"torch.compile of x + 1 on {device} took over {COMPILE_CHECK_TIMEOUT_S:.0f} s: "
                "the compiler hangs or the machine is overloaded"
            ]
    if result.returncode != 0:
        errors = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return [
            f"torch.compile of x + 1 on {device} failed: {errors[-1] if errors else 'no output'} "
            "(run the check alone to see the whole error: python -m bench.gpu --check-deps)"
        ]
    print(f"torch.compile of x + 1 on {device}: {result.stdout.strip()} s", file=sys.stderr)
    return []


# --- compile events: recompiles, eager shapes, CUDA graphs -------------------------------------


def count_compile_events(text: str) -> dict[str, int]:
    """Recompiles in ``TORCH_LOGS=recompiles`` output."""
    return {"recompiles": text.count(RECOMPILE_MARK)}


class CompileEvents(logging.Handler):
    """Counts this process's recompiles, as :func:`count_compile_events` counts them in a
    server's log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts = {"recompiles": 0}

    def emit(self, record: logging.LogRecord) -> None:
        for name, value in count_compile_events(record.getMessage()).items():
            self.counts[name] += value

    def snapshot(self) -> dict[str, int]:
        """The counts so far."""
        return dict(self.counts)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """The counts since ``before`` (a :meth:`snapshot`)."""
        return {name: self.counts[name] - before[name] for name in self.counts}

    @classmethod
    def install(cls) -> CompileEvents:
        """Turn on torch's recompiles log and count what it says."""
        import torch

        torch._logging.set_logs(recompiles=True)
        handler = cls()
        # torch's logging stops propagation here: the recompiles artifact is its child.
        logging.getLogger("torch._dynamo").addHandler(handler)
        return handler


# --- servers, and stopping them whatever happens -----------------------------------------------


class Stopped(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so every ``finally`` runs and every server is stopped."""


RUNNING_SERVERS: set[ServerProcess] = set()


def raise_stopped(signum: int, _frame) -> None:
    """The SIGTERM handler: raise :class:`Stopped` wherever the run is."""
    raise Stopped(signal.Signals(signum).name)


def kill_servers() -> None:
    """SIGKILL every server the run started that is still running (none outlives the run)."""
    for server in list(RUNNING_SERVERS):
        server.kill()
        RUNNING_SERVERS.discard(server)


@contextlib.contextmanager
def server_process(profile: Profile, args: list[str], log_dir: Path, budget: Budget):
    """``python -m server ARGS`` on a free loopback port, counted as started once its backend is
    ready (``/readyz``), with torch's recompiles log on; its log goes to ``log_dir``. Yields the
    server and its :func:`serving_counts` when it answered ready."""
    start_timeout = max(1.0, min(profile.server_start_s, budget.left()))
    server = ServerProcess(
        *args,
        log_dir=log_dir,
        start_timeout=start_timeout,
        health_path="/readyz",
        environment={"TORCH_LOGS": TORCH_LOGS},
    )
    RUNNING_SERVERS.add(server)
    try:
        server.start()
        yield server, serving_counts(server)
    finally:
        server.stop(stop_timeout=10)
        RUNNING_SERVERS.discard(server)


def torch_gauges(port: int) -> dict[str, int]:
    """The torch backend's gauges (:data:`TORCH_GAUGES`) from the server's /metrics."""
    status, body = get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered HTTP {status}: {body[:300]!r}")
    values = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    missing = [metric for metric in TORCH_GAUGES.values() if metric not in values]
    if missing:
        raise RuntimeError(f"/metrics lacks {', '.join(missing)}: a server without them")
    return {key: int(float(values[metric])) for key, metric in TORCH_GAUGES.items()}


def served_summary(events: dict[str, int]) -> str:
    """:func:`request_path_events` in words, for the progress log."""
    return (
        f"{events['recompiles']} recompiles after ready, {events['eager_shapes']} shapes run "
        f"eagerly ({events['eager_shapes_after_ready']} after ready), {events['cuda_graphs']} "
        f"CUDA graphs ({events['cuda_graphs_after_ready']} after ready)"
    )


def serving_counts(server: ServerProcess) -> dict[str, int]:
    """The recompiles the server logged so far and its torch backend's gauges, now."""
    return {**count_compile_events(server.log()), **torch_gauges(server.port)}


def request_path_events(server: ServerProcess, at_ready: dict[str, int]) -> dict[str, int]:
    """What slowed the request path: the recompiles since the server answered ready, the batch
    shapes it runs eagerly (all, those since ready apart), and its CUDA graphs: the count at the
    end and those captured since ready (none: the backend captures at warm-up only)."""
    now = serving_counts(server)
    return {
        "recompiles": now["recompiles"] - at_ready["recompiles"],
        "eager_shapes": now["eager_shapes"],
        "eager_shapes_after_ready": now["eager_shapes"] - at_ready["eager_shapes"],
        "cuda_graphs": now["cuda_graphs"],
        "cuda_graphs_after_ready": now["cuda_graphs"] - at_ready["cuda_graphs"],
        "cuda_graph_bytes": now["cuda_graph_bytes"],
    }


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


def photo_like_image(width: int, height: int, seed: int):
    """A photo-like uint8 (3, H, W) image drawn from ``seed`` (the same on every machine)."""
    import numpy as np

    from testkit.images import smooth_image

    return np.ascontiguousarray(np.asarray(smooth_image(width, height, seed)).transpose(2, 0, 1))


def scale_classifier(model, images, mean, std) -> float:
    """Scale ``model``'s last layer (in place) so that the median top-1 posterior of ``images``
    (uint8 (N, 3, H, W)) is :data:`TARGET_TOP1_POSTERIOR`; returns the factor.

    The class scores are linear in the last layer's weight and bias, so the factor scales the
    spatially averaged scores exactly and a bisection on it needs one forward pass.
    """
    import torch

    from vgg.convert import to_fully_conv

    with torch.inference_mode():
        x = torch.from_numpy(images).float() / 255
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        logits = to_fully_conv(model).eval()(x).mean(dim=(2, 3)).double()
    # Random layers shrink the signal by orders of magnitude: start from unit spread.
    unit = 1 / float(logits.std(dim=1).mean())
    low, high = unit / 1e3, unit * 1e3
    for _ in range(60):  # geometric bisection over 6 decades
        factor = (low * high) ** 0.5
        top1 = torch.softmax(factor * logits, dim=1).max(dim=1).values.median()
        low, high = (factor, high) if top1 < TARGET_TOP1_POSTERIOR else (low, factor)
    last = model.classifier[-1]
    with torch.no_grad():
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return factor


def export_for_benchmark(workdir: Path, repo: Path, arch: str, seed: int, profile: Profile) -> None:
    """Export ``arch`` with seeded random weights and a scaled last layer into ``repo``, with
    class names written here (``class_0000``, ...); the weights stay in ``workdir/ARCH.pth``
    (the eager baseline loads them), the export's output in ``workdir/export-ARCH.log``."""
    import numpy as np
    import torch

    from export.exporter import export_model
    from vgg.models import IMAGENET_MEAN, IMAGENET_STD, build

    with (
        open(workdir / f"export-{arch}.log", "w") as output,
        contextlib.redirect_stdout(output),
        contextlib.redirect_stderr(output),
    ):
        torch.manual_seed(seed)
        model = build(arch, **profile.arch_overrides).eval()
        height, width = view_shapes(profile)[0]
        images = np.stack([photo_like_image(width, height, i) for i in range(CALIBRATION_IMAGES)])
        factor = scale_classifier(model, images, IMAGENET_MEAN, IMAGENET_STD)
        print(f"last layer scaled by {factor:.4g}")
        weights = workdir / f"{arch}.pth"
        torch.save(model.state_dict(), weights)
        classes = model.classifier[-1].out_features
        labels = workdir / f"labels-{arch}.txt"
        labels.write_text("".join(f"class_{i:04d}\n" for i in range(classes)))
        sizes = {
            k: v for k, v in profile.arch_overrides.items() if k in ("width", "fc_width", "crop")
        }
        export_model(weights, arch=arch, repository=repo, name=arch, labels=labels, **sizes)


def export_models(profile: Profile, workdir: Path, archs: list[str]) -> dict[str, Path]:
    """Exports of ``archs``, each into its own repository ``workdir/repo-ARCH`` (the exporter
    rewrites the shared ``classify`` model of a repository through one staging file name, so two
    processes must not write one repository), in parallel processes stopped with the run."""
    repos = {arch: workdir / f"repo-{arch}" for arch in archs}
    # Spawned, not forked: this process has initialised CUDA (the peak measurement). Leaving the
    # pool (an interrupt included) terminates its processes.
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(archs)) as pool:
        exports = {
            arch: pool.apply_async(
                export_for_benchmark, (workdir, repos[arch], arch, seed, profile)
            )
            for seed, arch in enumerate(archs)
        }
        for arch, export in exports.items():
            try:
                export.get()
            except Exception as exc:
                tail = (workdir / f"export-{arch}.log").read_text()[-2000:]
                raise SystemExit(f"error: export of {arch} failed ({exc}):\n{tail}") from None
    return repos


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

    def outputs(self, views) -> dict:
        """``probs`` and ``scores`` of uint8 ``views``, as the served graph names them."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(views).to(self.device)
            x = ((x.float() / 255 - self.mean) / self.std).to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            scores = self.net(x).float()
            probs = torch.softmax(scores.mean(dim=(2, 3)), dim=1)
            return {"probs": probs.cpu().numpy(), "scores": scores.cpu().numpy()}

    def run(self, views):
        return self.outputs(views)["probs"]


def make_batches(profile: Profile, batch: int) -> list:
    """uint8 views per Q: ``batch`` photo-like images and their flips, (2 * batch, 3, H, W)."""
    import numpy as np

    batches = []
    for height, width in view_shapes(profile):
        images = np.stack([photo_like_image(width, height, seed) for seed in range(batch)])
        batches.append(np.ascontiguousarray(np.concatenate([images, images[..., ::-1]])))
    return batches


def fused_posterior(probs_per_scale: list):
    """The protocol's posterior: flips averaged, then scales."""
    import numpy as np

    half = len(probs_per_scale[0]) // 2
    return np.mean([(p[:half] + p[half:]) / 2 for p in probs_per_scale], axis=0)


def time_pipeline(run, batches: list, iterations: int, warmup: int, device) -> dict:
    """Seconds per full pass (every Q, flips averaged) after ``warmup`` passes; first pass apart."""

    def one_pass():
        return fused_posterior([run(views) for views in batches])

    synchronize(device)
    start = time.perf_counter()
    one_pass()
    first_s = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        one_pass()
    times = []
    for _ in range(iterations):
        synchronize(device)
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return {"first_s": first_s, "times": times}


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """float32 matrix products and convolutions in float32, not TF32, inside the block (the
    torch backend turns TF32 on for its bf16 engines; the setting is per process)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference_outputs(module, batches: list, device) -> list[dict]:
    """The float32 reference: the served graph's own module, eager, float32, TF32 off."""
    import torch

    module = module.to(device).eval()
    outputs = []
    with tf32_off(), torch.inference_mode():
        for views in batches:
            probs, scores = module(torch.from_numpy(views).to(device))
            outputs.append({"probs": probs.cpu().numpy(), "scores": scores.cpu().numpy()})
    return outputs


def score_error_bound(module, precision: str) -> float:
    """How far, relative to the largest score, an engine storing weights and activations in
    ``precision`` (sums in float32) may put its class scores from the float32 reference.

    Derived in testkit/tolerances.py (``score_bound``): each layer rounds its weights and its
    output to ``precision``, a relative error of at most u (bf16: 8 significant bits, u = 2^-8 =
    3.9e-3; fp16: 2^-11); the roundings are independent and of either sign, so over L weight
    layers they add like a random walk, sqrt(2 L) u (VGG-16: 0.022, VGG-19: 0.024 in bf16), and
    4x headroom for summation orders gives 0.088 and 0.096 of the largest score.
    """
    from testkit.tolerances import score_bound

    return score_bound(module, precision, "fp32")


def compare_accuracy(engine: list[dict], reference: list[dict], score_bound: float) -> dict:
    """Score and posterior differences of ``engine`` against ``reference`` (per scale: probs
    (N, C), scores (N, C, h, w)), and the bounds each must keep.

    Scores: within ``score_bound`` of the largest reference score. Posteriors: the soft-max of
    the spatial mean moves by at most half the largest score difference (``|dp_i| <= 2 p_i (1 -
    p_i) max|dz|``; the means over positions, flips and scales never add), plus each side's
    float32 soft-max rounding: posteriors that do not follow from the scores fail. Top-1: an
    image whose reference leads its runner-up by more than twice that bound must keep its top-1.
    """
    import numpy as np

    from testkit.tolerances import softmax_bound

    largest = max(float(np.max(np.abs(r["scores"]))) for r in reference)
    score_difference = max(
        float(np.max(np.abs(e["scores"] - r["scores"])))
        for e, r in zip(engine, reference, strict=True)
    )
    relative = score_difference / largest
    classes = reference[0]["probs"].shape[1]
    dp_bound = score_difference / 2 + 2 * softmax_bound(classes)
    ours = fused_posterior([e["probs"] for e in engine])
    theirs = fused_posterior([r["probs"] for r in reference])
    max_dp = float(np.max(np.abs(ours - theirs)))
    agree = ours.argmax(axis=1) == theirs.argmax(axis=1)
    ranked = np.sort(theirs, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] > 2 * dp_bound
    exceeded = []
    if relative > score_bound:
        exceeded.append(f"score error {relative:.3g} of the largest score > {score_bound:.3g}")
    if max_dp > dp_bound:
        exceeded.append(f"max |dp| {max_dp:.3g} > {dp_bound:.3g}, more than its scores explain")
    if np.any(clear & ~agree):
        exceeded.append(f"top-1 changed on {int(np.sum(clear & ~agree))} clear-margin images")
    return {
        "images": len(ours),
        "relative_score_error": relative,
        "max_abs_dp": max_dp,
        "top1_agreement": float(np.mean(agree)),
        "clear_margin_images": int(np.sum(clear)),
        "reference_top1_posterior": {
            "min": float(theirs.max(axis=1).min()),
            "median": float(np.median(theirs.max(axis=1))),
            "max": float(theirs.max(axis=1).max()),
        },
        "bounds": {"relative_score_error": score_bound, "max_abs_dp": dp_bound},
        "exceeded": exceeded,
    }


def accuracy_row(arch, method, engine, reference, score_bound: float, gated: bool) -> dict:
    """One row of the accuracy table; only ``gated`` engines get a PASS or FAIL."""
    row = {"model": arch, "method": method, **compare_accuracy(engine, reference, score_bound)}
    row["verdict"] = ("FAIL" if row["exceeded"] else "PASS") if gated else "–"
    return row


def perturb_last_layer(module, relative: float) -> None:
    """Scale the last convolution's weights by ``1 + relative`` (``--perturb-engine``: shows
    that the accuracy check fails when an engine is wrong)."""
    import torch

    last = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(1 + relative)
        if last.bias is not None:
            last.bias.mul_(1 + relative)


def probs_runner(backend, model: str):
    """``views -> probs`` through the backend's synchronous ``run`` (one thread: this one)."""
    return lambda views: backend.run(model, views)["probs"]


def http_max_batch(profile: Profile) -> int:
    """``--max-batch`` of the HTTP step's server: the views of the largest pipeline batch."""
    return 2 * max(profile.batches)


def backend_batch_sizes(profile: Profile) -> tuple[int, ...]:
    """The batch sizes the HTTP step's server pads its runs to (compiled, micro-batching on, as
    on a GPU): the pipeline's backends are built with the same."""
    from inference.batching import padded_batch_sizes

    return padded_batch_sizes(http_max_batch(profile))


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


def bench_model(profile, arch, repo, workdir, device, peak, results, modes, events, options):
    """The float32 reference, the eager baseline (``options.eager``), then our backend in each
    compile mode of ``modes``: speed per batch size, accuracy on the largest batch."""
    import torch

    from inference import read_repository
    from inference.backends.torch import TorchBackend, load_modules

    entries = read_repository(repo, [arch])
    reference_module = load_modules(entries)[arch]
    flops = sum(conv_flops(reference_module.layers, 2, h, w) for h, w in view_shapes(profile))
    results.data.setdefault("flops_per_image", {})[arch] = flops
    batches = {batch: make_batches(profile, batch) for batch in profile.batches}
    accuracy_batch = max(profile.batches)
    reference = reference_outputs(reference_module, batches[accuracy_batch], device)
    bound = score_error_bound(reference_module, profile.dtype)
    del reference_module
    empty_cache(device)

    if options.eager:
        baseline = EagerBaseline(profile, arch, workdir / f"{arch}.pth", entries[arch], device)
        method = f"eager {profile.dtype} (baseline)"
        for batch in profile.batches:
            timing = time_pipeline(
                baseline.run, batches[batch], profile.iterations[batch], 3, device
            )
            row = pipeline_row(profile, arch, method, batch, timing, flops, peak)
            # Eager: nothing is compiled or captured.
            row.update(warmup_s=None, recompiles=None, eager_shapes=None, cuda_graphs=None)
            results.data["pipeline"].append(row)
            log(f"{arch} eager batch {batch}: {row['images_per_s']:.1f} images/s")
            results.save()
        engine = [baseline.outputs(views) for views in batches[accuracy_batch]]
        results.data["accuracy"].append(
            accuracy_row(arch, method, engine, reference, bound, gated=False)
        )
        results.save()
        del baseline
        empty_cache(device)

    for mode in modes:
        # Each backend gets its own float32 modules: the backend converts them in place.
        modules = load_modules(entries)
        if options.perturb_engine:
            perturb_last_layer(modules[arch], options.perturb_engine)
        # Built as the HTTP step's server builds it (the constructor drops the padded sizes
        # when nothing is compiled).
        backend = TorchBackend(
            modules,
            device=str(device),
            dtype=profile.dtype,
            compile=mode,
            batch_sizes=backend_batch_sizes(profile),
        )
        method = f"torch backend {profile.dtype}, compile {mode}"
        run = probs_runner(backend, arch)
        for batch in profile.batches:
            # The server's warm-up for the shapes this batch runs (its views at each Q, padded):
            # compiled, and on CUDA captured as graphs, so the timed passes compile nothing.
            shapes = [(backend.padded_size(2 * batch), 3, h, w) for h, w in view_shapes(profile)]
            before = events.snapshot()
            graphs_before = backend.stats.cuda_graphs
            eager_before = backend.stats.eager_shapes
            warmup_s = asyncio.run(backend.warmup({arch: shapes}))
            warmup_recompiles = events.since(before)["recompiles"]
            before = events.snapshot()
            # The first pass apart (reported: warm-up left nothing for it to do), one untimed.
            timing = time_pipeline(run, batches[batch], profile.iterations[batch], 2, device)
            row = pipeline_row(profile, arch, method, batch, timing, flops, peak)
            row.update(
                warmup_s=warmup_s,
                warmup_recompiles=warmup_recompiles,
                **events.since(before),
                eager_shapes=backend.stats.eager_shapes - eager_before,
                cuda_graphs=backend.stats.cuda_graphs - graphs_before,
                cuda_graph_bytes=backend.stats.cuda_graph_bytes,
            )
            eager_row = next(
                (
                    r
                    for r in results.data["pipeline"]
                    if r["model"] == arch and r["batch"] == batch and "eager" in r["method"]
                ),
                None,
            )
            if eager_row:
                row["speedup_vs_eager"] = row["images_per_s"] / eager_row["images_per_s"]
            results.data["pipeline"].append(row)
            log(
                f"{arch} {method} batch {batch}: {row['images_per_s']:.1f} images/s, warm-up "
                f"{warmup_s:.1f} s ({row['cuda_graphs']} CUDA graphs), first pass "
                f"{row['first_pass_s']:.2f} s; timed: {row['recompiles']} recompiles, "
                f"{row['eager_shapes']} eager shapes"
            )
            results.save()
        # The largest batch's shapes were warmed up above: this pass compiles nothing.
        engine = [
            backend.run(arch, views, ("probs", "scores")) for views in batches[accuracy_batch]
        ]
        row = accuracy_row(arch, method, engine, reference, bound, gated=True)
        results.data["accuracy"].append(row)
        log(
            f"{arch} {method} against fp32: score error {row['relative_score_error']:.2e}, max "
            f"|dp| {row['max_abs_dp']:.2e}, top-1 agreement {100 * row['top1_agreement']:.0f}%: "
            f"{row['verdict']}"
        )
        results.save()
        asyncio.run(backend.close())
        del backend, modules
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
    # Micro-batches as large as the backend's largest-batch runs, where the server has them;
    # the delay is the GPU's default, given so that the dry run batches (and warms up the
    # micro-batch sizes) as a GPU server does.
    extra = (
        ["--max-batch", str(http_max_batch(profile)), "--batch-delay-ms", "2"]
        if server_has_flag("--max-batch")
        else []
    )
    with server_process(
        profile, server_args(profile, repo, arch, mode, extra), out / f"http-{arch}", budget
    ) as (running, at_ready):
        client = Client(running.port, f"scales={scales}&flip=true")
        # The server's warm-up compiled and captured every batch size its micro-batches can
        # make at the images' size (--torch-warmup): these open the one-client connection, and
        # no untimed pass precedes the timed one.
        for data in images[:3]:
            client.classify(data)
        latencies = [client.classify(images[i % len(images)])[0] for i in range(10)]
        load = [images[i % len(images)] for i in range(profile.http_requests)]
        with ThreadPoolExecutor(profile.http_clients) as pool:
            start = time.perf_counter()
            list(pool.map(client.classify, load))
            seconds = time.perf_counter() - start
        request_path = request_path_events(running, at_ready)
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
        "warmup_events": at_ready,
        "request_path_events": request_path,
    }
    results.data["http"].append(row)
    log(
        f"{arch} HTTP: {row['images_per_s']:.1f} images/s, one client p50 "
        f"{row['latency_ms_p50_one_client']:.1f} ms; {served_summary(request_path)}"
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
    ) as (running, at_ready):
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
        request_path = request_path_events(running, at_ready)
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
        "request_path_events": request_path,
    }
    results.data["stream"].append(row)
    log(
        f"{arch} stream ({label}): first {row['first_ms_mean']:.1f} ms mean, steady "
        f"{row['steady_ms_p50'] or float('nan'):.1f} ms p50, {row['distinct_shapes']} shapes; "
        f"{served_summary(request_path)}"
    )
    results.save()
    return {"row": row, "posteriors": np.array(posteriors)}


# --- the report --------------------------------------------------------------------------------


def fmt(value, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def events_cells(events: dict | None) -> str:
    """The recompiles, eager shapes and CUDA graphs cells of a table row (dashes where nothing
    compiles); graphs captured after a server was ready (none by design) are shown apart."""
    if events is None:
        return "– | – | –"
    graphs = str(events["cuda_graphs"])
    if events.get("cuda_graphs_after_ready"):
        graphs += f" ({events['cuda_graphs_after_ready']} after ready)"
    return f"{events['recompiles']} | {events['eager_shapes']} | {graphs}"


def verdict_cell(verdict: str) -> str:
    """PASS and FAIL in bold; the baseline's dash as it is."""
    return f"**{verdict}**" if verdict in ("PASS", "FAIL") else verdict


def markdown(data: dict) -> str:
    """results.md: the header, then one table per step (the same columns on a GPU and in a dry
    run), then what was skipped and the notes."""
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
            "| model | method | batch | images/s | TFLOP/s | % of peak | vs eager | pass ms p50 "
            "| warm-up s | first pass s | recompiles | eager shapes | CUDA graphs |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: |",
        ]
        for r in data["pipeline"]:
            share = None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"]
            events = None if r.get("recompiles") is None else r
            lines.append(
                f"| {r['model']} | {r['method']} | {r['batch']} | {r['images_per_s']:.1f} | "
                f"{r['tflops']:.2f} | {fmt(share)} | {fmt(r.get('speedup_vs_eager'), '.2f')} | "
                f"{r['pass_ms_p50']:.1f} | {fmt(r.get('warmup_s'))} | {r['first_pass_s']:.2f} | "
                f"{events_cells(events)} |"
            )
    if data["accuracy"]:
        lines += [
            "",
            "| model | method | images | score error (bound) | max abs Δp (bound) | top-1 agreement "
            "| fp32 top-1 p (min / median / max) | accuracy |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in data["accuracy"]:
            bounds, top1 = r["bounds"], r["reference_top1_posterior"]
            lines.append(
                f"| {r['model']} | {r['method']} | {r['images']} | "
                f"{r['relative_score_error']:.2e} ({bounds['relative_score_error']:.1e}) | "
                f"{r['max_abs_dp']:.2e} ({bounds['max_abs_dp']:.1e}) | "
                f"{100 * r['top1_agreement']:.1f}% | "
                f"{top1['min']:.2f} / {top1['median']:.2f} / {top1['max']:.2f} | "
                f"{verdict_cell(r['verdict'])} |"
            )
    if data["http"]:
        lines += [
            "",
            "| model | path | clients | images/s | TFLOP/s | vs backend (best batch) "
            "| one-client p50 ms | start s | recompiles after ready | eager shapes | CUDA graphs |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in data["http"]:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['clients']} | {r['images_per_s']:.1f} | "
                f"{r['tflops']:.2f} | {fmt(r['vs_backend_best'], '.2f')} | "
                f"{r['latency_ms_p50_one_client']:.1f} | {r['server_start_s']:.0f} | "
                f"{events_cells(r['request_path_events'])} |"
            )
    if data["stream"]:
        lines += [
            "",
            "| model | rescaling | requests | input shapes | first-request ms (mean / max) "
            "| 2nd ms | steady p50 ms | max abs Δp vs exact | recompiles after ready "
            "| eager shapes | CUDA graphs |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in data["stream"]:
            lines.append(
                f"| {r['model']} | {r['rescaling']} | {r['requests']} | {r['distinct_shapes']} | "
                f"{r['first_ms_mean']:.1f} / {r['first_ms_max']:.1f} | {fmt(r['second_ms_mean'])} | "
                f"{fmt(r['steady_ms_p50'])} | {fmt(r.get('max_abs_diff_vs_exact'), '.2e')} | "
                f"{events_cells(r['request_path_events'])} |"
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
        help=f"without {DEADLINE_VARIABLE} (bench/gpu.sh sets it), the run's deadline is this "
        "many seconds from now; optional steps that would pass it are skipped "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--check-deps",
        action="store_true",
        help="only check that every module, compiler and library the run needs is there "
        "(with --dry-run: for the CPU run)",
    )
    parser.add_argument(
        "--perturb-engine",
        type=float,
        default=0.0,
        metavar="R",
        help="scale the served engines' last layer by 1 + R, to see the accuracy check fail",
    )
    args = parser.parse_args(argv)
    if args.out is None and not args.check_deps:
        parser.error("give the output folder (e.g. bench/results/gpu)")
    return args


def run_steps(profile, args, device, archs, results, budget, events) -> None:
    """Peak, exports, the pipeline and accuracy per model, HTTP, the streams, other modes."""
    started = time.monotonic()
    results.data["peak"] = peak = measure_peak(profile, device)
    log(f"matrix peak: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']} {peak['n']}^3)")
    results.save()

    with tempfile.TemporaryDirectory(prefix="vggserve-gpu-bench-") as tmp:
        workdir = Path(tmp)
        log(f"exporting {', '.join(archs)} into {workdir}")
        repos = export_models(profile, workdir, archs)
        results.data["export_s"] = round(time.monotonic() - started, 1)
        main_mode, *extra_modes = profile.compile_modes
        for arch in archs:  # the baseline and the backend's default mode first, for every model
            options = argparse.Namespace(eager=True, perturb_engine=args.perturb_engine)
            bench_model(
                profile,
                arch,
                repos[arch],
                workdir,
                device,
                peak,
                results,
                [main_mode],
                events,
                options,
            )
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
                    bench_http(profile, repos[first], first, args.out, results, budget)
                    continue
                measured = bench_stream(
                    profile, repos[first], first, args.out, results, budget, multiple
                )
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
            if not budget.allows(90 if profile.device == "cuda" else 30):
                results.skip(f"{first} torch backend compile {mode}", f"{budget.left():.0f} s left")
                continue
            options = argparse.Namespace(eager=False, perturb_engine=args.perturb_engine)
            bench_model(
                profile,
                first,
                repos[first],
                workdir,
                device,
                peak,
                results,
                [mode],
                events,
                options,
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before anything slow: the deadline counts from bench/gpu.sh's start when it set one.
    budget = Budget.from_environment(args.budget_s)
    # SIGTERM unwinds like Ctrl-C: the finally below stops every server this run started.
    signal.signal(signal.SIGTERM, raise_stopped)
    profile = DRY_RUN if args.dry_run else GPU
    if args.check_deps or os.environ.get(CHECKED_VARIABLE) != "1":
        lines, status = check_dependencies(profile.device)
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        if status or args.check_deps:
            return status
    import torch

    events = CompileEvents.install()
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
        "perturb_engine": args.perturb_engine,
        "load_average": os.getloadavg(),
    }
    results = Results(args.out, header)
    results.save()
    started = time.monotonic()
    log(f"{profile.name} run on {header['device_name']}, {budget.left():.0f} s to the deadline")

    try:
        run_steps(profile, args, device, archs, results, budget, events)
    except (KeyboardInterrupt, Stopped) as exc:  # bench/gpu.sh's time limit, Ctrl-C, SIGTERM
        why = "the time limit or Ctrl-C" if isinstance(exc, KeyboardInterrupt) else exc
        results.data["notes"].append(f"stopped at {time.monotonic() - started:.0f} s by {why}")
        results.save()
        print(f"stopped by {why}; partial results in {args.out}", file=sys.stderr)
        return 130
    finally:
        kill_servers()
    results.data["total_s"] = round(time.monotonic() - started, 1)
    results.save()
    print(markdown(results.data))
    failures = results.failures()
    for failure in failures:
        print(f"accuracy FAIL: {failure}", file=sys.stderr)
    log(f"done in {results.data['total_s']:.0f} s: {args.out / 'results.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
