"""What the server is started with: one immutable record whose fields define the command line.

Every field of :class:`Settings` carries its flag (:class:`Flag`): help text, how the flag's text
is read, its choices, the check its value must pass. ``python -m server``'s parser, its
``--help`` and the flag table of docs/server.md are generated from the fields
(:mod:`server.flags`), and :class:`Settings` checks every value, whoever builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from inference.backends import torch_options
from inference.protocol import parse_scales
from inference.repository import parse_model_names

BACKENDS = ("onnxruntime", "triton", "torch", "openvino")
# inference.backends.openvino.PRECISIONS, named here so that --help needs no OpenVINO.
OPENVINO_PRECISIONS = ("auto", "fp32", "bf16")
# inference.backends.onnxruntime.DEVICES, named here so that --help needs no ONNX Runtime.
ONNXRUNTIME_DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

# A check takes a value and says what is wrong with it ("must be positive, got 0"), or None.
Check = Callable[[Any], "str | None"]


class SettingError(ValueError):
    """A setting whose value the server cannot use: ``name`` is the field, ``problem`` says
    what is wrong and what to give."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class Flag:
    """How a setting is given on the command line and described in ``--help`` and the docs.

    A field whose default is a bool is a switch (given: True).
    """

    help: str
    # Flag text -> value; raises ValueError with a message saying what to give.
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    check: Check | None = None
    # The default in words, where its value says little (None: "the model's own", "every core").
    default_text: str | None = None

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this setting, or None when it is fine."""
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        return self.check(value) if self.check else None


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A :class:`Settings` field with its flag (keyword arguments: :class:`Flag`'s)."""
    return field(default=default, metadata={"flag": Flag(help, **flag)})


def positive(value: float) -> str | None:
    """Refuses 0 and below."""
    return None if value > 0 else f"must be positive, got {value}"


def at_least_zero(value: float) -> str | None:
    """Refuses negative values."""
    return None if value >= 0 else f"must be 0 or more, got {value}"


def between(low: float, high: float) -> Check:
    """A check that refuses values outside [low, high]."""

    def check(value: float) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}, got {value}"

    return check


def positive_scales(scales: tuple[int, ...]) -> str | None:
    """Refuses an empty list and scales of 0 or below."""
    if scales and all(q > 0 for q in scales):
        return None
    return f"must be one or more positive integers (e.g. 256,384,512), got {scales}"


def positive_sizes(sizes: tuple[tuple[int, int], ...]) -> str | None:
    """Refuses sizes with a side of 0 or below."""
    if all(width > 0 and height > 0 for width, height in sizes):
        return None
    return f"must be (width, height) pairs of positive integers, got {sizes}"


def parse_size_list(text: str) -> tuple[tuple[int, int], ...]:
    """``"640x480,480x640"`` -> ``((640, 480), (480, 640))`` (width x height, positive)."""
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) < 1 or int(height) < 1:
            raise ValueError(
                f"{text!r} is not a comma-separated list of WIDTHxHEIGHT sizes (e.g. 640x480,480x640)"
            )
        sizes.append((int(width), int(height)))
    return tuple(sizes)


@dataclass(frozen=True)
class Settings:
    """Every start-up option of the front end: ``python -m server --help`` lists them."""

    # --- the models ---
    repository: Path = setting(
        Path("model_repository"),
        "Triton model repository written by python export/to_onnx.py; missing or empty: the "
        "server exits with status 2 and one line saying what to do. Not used with --backend "
        "triton: the models are read from Triton",
        parse=Path,
        metavar="DIR",
    )
    models: tuple[str, ...] | None = setting(
        None,
        "comma-separated models to serve and fuse, e.g. vgg16,vgg19",
        parse=parse_model_names,
        metavar="NAMES",
        default_text="every model in the repository (--backend triton: every classifier Triton "
        "serves)",
    )
    scales: tuple[int, ...] | None = setting(
        None,
        "scales Q (shorter side) of a request that names none, comma-separated, for every model",
        parse=parse_scales,
        metavar="Q,...",
        check=positive_scales,
        default_text="each model's serving scales, written into its config.pbtxt by the exporter",
    )
    # --- the backend ---
    backend: str = setting(
        "onnxruntime",
        "onnxruntime: ONNX Runtime in this process; triton: a Triton server over gRPC at "
        "--triton-url; torch: PyTorch in this process, for GPUs; openvino: OpenVINO Runtime in this "
        "process, on the CPU, reading the same model.onnx",
        choices=BACKENDS,
    )
    triton_url: str = setting(
        "127.0.0.1:8001", "Triton's gRPC address, with --backend triton", metavar="HOST:PORT"
    )
    threads: int | None = setting(
        None,
        "ONNX Runtime threads per inference; with --backend torch on the CPU, PyTorch's threads; "
        "with --backend openvino, OpenVINO's",
        parse=int,
        check=positive,
        metavar="N",
        default_text="every core (ONNX Runtime on the GPU: 1)",
    )
    onnxruntime_device: str = setting(
        "auto",
        "with --backend onnxruntime: auto (CUDA when the installed ONNX Runtime is the GPU build, "
        "else the CPU), cpu or cuda; a model whose session does not run on the GPU asked for "
        "(auto included) fails the backend with one line saying why, never a silent CPU fallback",
        choices=ONNXRUNTIME_DEVICES,
    )
    onnxruntime_arena_mb: int | None = setting(
        None,
        "with --backend onnxruntime on the CPU: MiB of activation memory kept between runs, so "
        "a run reuses mapped pages instead of page-faulting fresh ones; a larger run borrows "
        "more and gives it back when it ends; 0: nothing kept (every run page-faults)",
        parse=int,
        check=at_least_zero,
        metavar="MIB",
        default_text="the activations of two 4:3 views at the largest serving scale",
    )
    torch_device: str = setting(
        "auto",
        "with --backend torch: auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N",
        metavar="DEVICE",
    )
    torch_dtype: str = setting(
        "auto",
        "with --backend torch: precision of the convolutions; auto is bf16 on CUDA and fp32 on "
        "the CPU; normalisation, spatial mean and soft-max stay fp32",
        choices=("auto", *torch_options.DTYPES),
    )
    torch_compile: str = setting(
        "auto",
        "with --backend torch: torch.compile mode (dynamic shapes, a few compiles per model, all "
        "at warm-up) or off (eager); reduce-overhead and max-autotune also capture a CUDA graph "
        "of each warm-up shape. Compiled, runs are padded to a few batch sizes (1, 2, 25, 50 "
        "and, with micro-batching, powers of two up to the largest micro-batch), and a shape "
        "warm-up did not compile runs eagerly, with a warning. auto is reduce-overhead on CUDA "
        "and off on the CPU",
        choices=("auto", *torch_options.COMPILE_MODES),
    )
    torch_warmup: tuple[tuple[int, int], ...] | None = setting(
        None,
        "with --backend torch: image sizes WIDTHxHEIGHT (e.g. 640x480,480x640) run with flips "
        "at every default scale before the server answers; compiled, at every padded batch "
        "size (one view, two, micro-batches) and with each model's multi-crop batches too, so "
        "that no request compiles",
        parse=parse_size_list,
        check=positive_sizes,
        metavar="WxH,...",
        default_text="none with --torch-compile off; compiled: 640x480,480x640",
    )
    openvino_precision: str = setting(
        "auto",
        "with --backend openvino: precision of the float layers; auto is bf16 where the CPU "
        "computes bf16 natively (AVX-512 BF16 or AMX, as OpenVINO reports), else fp32; fp32 "
        "equals ONNX Runtime within 1e-5, bf16 moved the test models' posteriors by up to "
        "1.1e-3; int8 graphs run their quantised layers in int8 either way",
        choices=OPENVINO_PRECISIONS,
    )
    # --- HTTP ---
    host: str = setting("127.0.0.1", "address to listen on", metavar="ADDRESS")
    port: int = setting(
        8080, "TCP port to listen on", parse=int, check=between(1, 65535), metavar="PORT"
    )
    client_timeout: float = setting(
        30.0,
        "seconds a client may send no byte while the server waits for its request head or body; "
        "then a JSON 408 (no answer to a connection that sent nothing) and the connection is "
        "closed, its upload freed. Idle keep-alive connections between requests are closed "
        "after uvicorn's 5 s",
        parse=float,
        check=positive,
        metavar="SECONDS",
    )
    max_connections: int = setting(
        1000,
        "most open client connections; a connection beyond them is answered a JSON 503 with "
        "Retry-After and closed. The open-file limit is raised to fit, where the hard limit "
        "allows",
        parse=int,
        check=positive,
        metavar="N",
    )
    # --- limits ---
    max_upload_mb: float = setting(
        20.0,
        "largest request body in MB (2**20 bytes), refused with 413 while it streams in",
        parse=float,
        check=positive,
        metavar="MB",
    )
    max_pixels: int = setting(
        50_000_000,
        "largest image in pixels (width x height), read from the header before decoding; "
        "larger: 413",
        parse=int,
        check=positive,
        metavar="N",
    )
    max_batch_files: int = setting(
        32,
        "most files in one POST /v1/classify/batch; more: 413",
        parse=int,
        check=positive,
        metavar="N",
    )
    max_concurrency: int = setting(
        4, "requests decoded and classified at once", parse=int, check=positive, metavar="N"
    )
    max_queue: int = setting(
        32,
        "requests waiting for a slot; beyond them: 429 with Retry-After",
        parse=int,
        check=at_least_zero,
        metavar="N",
    )
    # --- speed ---
    batch_delay_ms: float | None = setting(
        None,
        "micro-batching: how long the first batch of views of a shape waits for other requests' "
        "views of that shape to run with it (in-process backends); 0: off",
        parse=float,
        check=between(0, 1000),
        metavar="MS",
        # On the CPU one run already uses every core: joining runs would only add latency.
        default_text="2 on a GPU, off on the CPU",
    )
    max_batch: int = setting(
        32, "most views in one micro-batch", parse=int, check=positive, metavar="N"
    )
    shape_multiple: int | None = setting(
        None,
        "round the longer rescaled side to a multiple of M (e.g. 32), so photos of many aspect "
        "ratios make few input shapes; stretches the image slightly, which moves probabilities",
        parse=int,
        check=positive,
        metavar="M",
        default_text="off, exact rescaling as in the paper",
    )
    jpeg_draft: bool = setting(
        False,
        "decode JPEGs much larger than the largest Q at 1/2, 1/4 or 1/8 size (libjpeg's scaled "
        "IDCT), the shorter side kept at least twice that Q: 1.5x faster decoding of 768-1152 px "
        "photos; probabilities differ from full decoding by up to 4.7e-3, 1.9e-4 on average, "
        "as measured by bench/approximations.py on the demo models at Q=64,96,128",
        default_text="off, exact decoding",
    )
    # --- the process ---
    grace_period: float = setting(
        30.0,
        "seconds in-flight requests get to finish after SIGTERM before the server exits anyway",
        parse=float,
        check=positive,
        metavar="SECONDS",
    )
    log_level: str = setting("info", "uvicorn and server log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None:  # the documented default behaviour (default_text)
                continue
            problem = item.metadata["flag"].problem(value)
            if problem:
                raise SettingError(item.name, problem)

    @property
    def max_upload_bytes(self) -> int:
        """The request body limit in bytes (1 MB = 2**20 bytes)."""
        return int(self.max_upload_mb * 1024 * 1024)
