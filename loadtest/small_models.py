"""Two small VGG exports ("m16", "m19") for load tests: the real topology at 1/8 width.

    python -m loadtest.small_models DIR      # writes DIR/m16 and DIR/m19 (skips existing ones)

The same shape as the test suite's ``two_model_repository``: VGG-16 and VGG-19 at 1/8 width,
FC 128, crop 64, 10 classes, seeded weights. A request at Q = 64,96,128 takes ~10-50 ms on one
core, so a load test measures the server rather than the convolutions.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script or by Locust: make the repository importable
    sys.path.insert(0, str(ROOT))

SMALL = {"width": 0.125, "fc_width": 128, "crop": 64, "num_classes": 10}
MODELS = (("m16", "vgg16", 16), ("m19", "vgg19", 19))
# The scales a load test asks for: at least the crop (64), small enough to stay fast.
SCALES = (64, 96, 128)


def export_small_models(repository: Path) -> Path:
    """Export the small models into ``repository`` unless they are there; returns it."""
    import torch

    from export import to_onnx
    from vgg.models import build

    repository = Path(repository)
    for name, arch, seed in MODELS:
        if (repository / name / "config.pbtxt").is_file():
            continue
        torch.manual_seed(seed)
        model = build(arch, **SMALL)
        with torch.no_grad():  # larger FC weights: posteriors far from uniform, as trained ones
            for layer in model.classifier:
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(0, 0.08)
        with tempfile.TemporaryDirectory() as scratch:
            weights = Path(scratch) / f"{name}.pth"
            torch.save(model.state_dict(), weights)
            code = to_onnx.main(
                [
                    "--arch",
                    arch,
                    "--weights",
                    str(weights),
                    "--name",
                    name,
                    "--repository",
                    str(repository),
                    "--crop",
                    str(SMALL["crop"]),
                    "--width",
                    str(SMALL["width"]),
                    "--fc-width",
                    str(SMALL["fc_width"]),
                ]
            )
        if code != 0:
            raise RuntimeError(f"exporting the small model {name} failed (exit code {code})")
    return repository


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest.small_models DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m loadtest.small_models DIR", file=sys.stderr)
        return 2
    print(export_small_models(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
