"""What the server is started with: one immutable record, filled from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("onnxruntime", "triton", "torch")
# --backend torch (inference/backends/torch.py checks the same names; torch is not imported here).
TORCH_DTYPES = ("auto", "bf16", "fp16", "fp32")
TORCH_COMPILE_MODES = (
    "auto",
    "off",
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)


@dataclass(frozen=True)
class Settings:
    """Every start-up option of the front end (see ``python -m server --help``)."""

    repository: Path = Path("model_repository")
    models: tuple[str, ...] | None = None  # None: every model in the repository
    backend: str = "onnxruntime"
    triton_url: str = "127.0.0.1:8001"
    host: str = "127.0.0.1"
    port: int = 8080
    scales: tuple[int, ...] | None = None  # None: each model's serving scales (config.pbtxt)
    max_upload_mb: float = 20.0
    max_pixels: int = 50_000_000
    max_concurrency: int = 4
    max_queue: int = 32
    threads: int | None = None  # ONNX Runtime intra-op threads; None: every core
    max_batch_files: int = 32
    torch_device: str = "auto"  # auto: the first CUDA device, else the CPU
    torch_dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on the CPU
    torch_compile: str = "auto"  # auto: reduce-overhead (CUDA graphs) on CUDA, off on the CPU
    torch_warmup: tuple[tuple[int, int], ...] = ()  # image sizes (width, height) run at start-up
    # Longer side rounded to a multiple of this (few input shapes); None: exact rescaling.
    shape_multiple: int | None = None
    # Micro-batching of same-shape views across requests (in-process backends); None: 2 ms on
    # a GPU, off on CPU (where one run already uses every core and joining only adds latency).
    batch_delay_ms: float | None = None
    max_batch: int = 32
    # Decode large JPEGs at 1/2-1/8 size (never below twice the largest Q); off: exact decoding.
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.max_upload_mb <= 0:
            raise ValueError("max_upload_mb must be positive")
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be positive")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        if self.max_batch_files < 1:
            raise ValueError("max_batch_files must be at least 1")
        if self.scales is not None and not self.scales:
            raise ValueError("scales must not be empty")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"torch_dtype must be one of {', '.join(TORCH_DTYPES)}")
        if self.torch_compile not in TORCH_COMPILE_MODES:
            raise ValueError(f"torch_compile must be one of {', '.join(TORCH_COMPILE_MODES)}")
        if self.shape_multiple is not None and self.shape_multiple < 1:
            raise ValueError("shape_multiple must be positive")
        if self.batch_delay_ms is not None and not 0 <= self.batch_delay_ms <= 1000:
            raise ValueError("batch_delay_ms must be between 0 and 1000")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")

    @property
    def max_upload_bytes(self) -> int:
        """The request body limit in bytes (1 MB = 2**20 bytes)."""
        return int(self.max_upload_mb * 1024 * 1024)


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"256,384,512"`` -> ``(256, 384, 512)``; raises ``ValueError`` saying what is malformed."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ValueError(f"{text!r} is not a comma-separated list of integers (e.g. 256,384,512)")
    try:
        return tuple(int(item) for item in items)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a comma-separated list of integers (e.g. 256,384,512)"
        ) from None


def parse_name_list(text: str) -> tuple[str, ...]:
    """``"vgg16,vgg19"`` -> ``("vgg16", "vgg19")``; raises ``ValueError`` on empty items."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ValueError(f"{text!r} is not a comma-separated list of names (e.g. vgg16,vgg19)")
    return tuple(items)


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
