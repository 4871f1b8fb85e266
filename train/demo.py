"""``make demo-models``: two small VGGs trained on the synthetic set, exported for serving.

    python -m train.demo                       # data/synthetic, runs/demo-*, model_repository/

Steps, each skipped when its result is already there (so the command is idempotent):

1. draw the synthetic data set (``train.synthetic``) into ``data/synthetic``;
2. train ``demo-vgg16`` (configuration D with batch-norm, 1/8 width, FC 512, 64x64 crops),
   first at a fixed S=64, then fine-tuned with scale jittering S in [64, 128] (the paper
   pre-trains at a fixed S and fine-tunes the multi-scale nets);
3. train ``demo-vgg19`` (E with batch-norm) the same way, its first four conv layers and three
   FC layers taken from the trained D (the paper's initialisation from a shallower trained net);
4. export both with :func:`export.exporter.export_model` into the model repository, with their
   class names and their serving scales;
5. report the dense multi-scale error of each net and of their fusion on the validation set.

The recipe is data: :data:`BASE` (the paper's defaults except where a 2-core CPU and a few
minutes call for something else), :data:`SINGLE` and :data:`JITTER` derived from it, and
:func:`run_configs` naming the four runs; :func:`run_demo` runs them with
:func:`train.recipe.train` and exports with :func:`export.exporter.export_model`.

The nets are trained at S in [64, 128] with 64x64 crops and evaluated at Q = {64, 96, 128}
(Smin, the middle, Smax: paper section 4.2), and exported with those serving scales. The graphs
accept any Q >= 64, {256, 384, 512} included, but objects then appear 2-4 times larger than in
training and the error rises (see docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from export.exporter import ExportError, export_model
from inference.protocol import ScalePosteriors, average_posteriors
from train.checkpoints import BEST, LAST, read
from train.config import TrainConfig
from train.evaluate import error_rates
from train.recipe import FINAL_FILE, POSTERIORS_FILE, train_and_report
from train.reporting import log
from train.synthetic import MANIFEST, SyntheticConfig, generate
from vgg.checkpoint import CheckpointError

SCALES = (64, 96, 128)
DATA = SyntheticConfig(classes=10, train=10000, val=1000, seed=0)
DEFAULT_DATA = Path("data/synthetic")
SUMMARY_FILE = "demo-summary.json"

# Settings shared by all runs: the recipe's defaults except where a 2-core CPU and a few minutes
# call for something else (docs/training.md says why for each).
BASE = TrainConfig(
    data=DEFAULT_DATA,
    width=0.125,
    fc_width=512,
    crop=64,
    batch_size=32,
    lr_scheduler="cosine",
    dropout=0.0,
    init="kaiming",
    normalize="mean-std",
)
# Single-scale training at S=64 first (the paper pre-trains at a fixed S, then fine-tunes with
# jittering), validated at Q=64 only, which is cheap.
SINGLE = replace(
    BASE,
    scale=(64, 64),
    val_scale=64,
    val_scales=(64,),
    lr=0.02,
    warmup_epochs=0.5,
    val_every=1,
    val_images=100,
)
# Scale-jittering fine-tuning, validated with the dense multi-scale protocol.
JITTER = replace(
    BASE, scale=(64, 128), val_scale=96, val_scales=SCALES, lr=0.005, val_every=1, val_images=100
)
MODELS = ("demo-vgg16", "demo-vgg19")


def run_configs(data: Path, runs: Path, progress: bool | None = None) -> dict[str, TrainConfig]:
    """The demo's training runs by name, in the order they run; the last two are the MODELS'."""
    single = replace(SINGLE, data=data, progress=progress)
    jitter = replace(JITTER, data=data, progress=progress)
    return {
        "demo-vgg16-s64": replace(
            single, arch="vgg16_bn", epochs=3, output_dir=runs / "demo-vgg16-s64"
        ),
        "demo-vgg16": replace(
            jitter,
            arch="vgg16_bn",
            epochs=3,
            finetune_from=runs / "demo-vgg16-s64" / BEST,
            output_dir=runs / "demo-vgg16",
        ),
        # E starts from D's first four conv layers and three FC layers (paper section 3.1).
        "demo-vgg19-s64": replace(
            single,
            arch="vgg19_bn",
            epochs=2,
            init_from=runs / "demo-vgg16-s64" / BEST,
            output_dir=runs / "demo-vgg19-s64",
        ),
        "demo-vgg19": replace(
            jitter,
            arch="vgg19_bn",
            epochs=3,
            finetune_from=runs / "demo-vgg19-s64" / BEST,
            output_dir=runs / "demo-vgg19",
        ),
    }


def _finished(run: Path) -> bool:
    last = run / LAST
    return last.is_file() and bool(read(last).get("finished")) and (run / FINAL_FILE).is_file()


def export(name: str, weights: Path, repository: Path) -> bool:
    """Export ``weights`` as model ``name`` unless the repository already has this version."""
    onnx_path = repository / name / "1" / "model.onnx"
    if onnx_path.is_file() and onnx_path.stat().st_mtime >= weights.stat().st_mtime:
        log(f"[{name}] {onnx_path} is up to date")
        return False
    export_model(weights, name=name, repository=repository, scales=SCALES, log=log)
    return True


def summarise(runs: Path, names: list[str]) -> dict:
    """Dense multi-scale errors of each net and of their fusion, from the final validations."""
    rows, posteriors = {}, []
    labels = None
    for name in names:
        final = json.loads((runs / name / FINAL_FILE).read_text())
        saved = np.load(runs / name / POSTERIORS_FILE)
        labels = saved["labels"]
        scales = final["val_scales"]
        probs = ScalePosteriors(dense={q: saved[f"Q{q}"] for q in scales}).combine(scales)
        posteriors.append(probs)
        rows[name] = {
            "epoch": final["epoch"],
            "single_scale": {
                "Q": final["val_scale"],
                "top1_err": final["val_top1_err"],
                "top5_err": final["val_top5_err"],
            },
            "multi_scale": {
                "Q": final["val_scales"],
                "top1_err": final["val_multi_top1_err"],
                "top5_err": final["val_multi_top5_err"],
            },
        }
    top1, top5 = error_rates(average_posteriors(posteriors), labels)
    rows["fusion"] = {"multi_scale": {"Q": list(SCALES), "top1_err": top1, "top5_err": top5}}
    return {"images": int(len(labels)), "models": rows}


def run_demo(
    data: Path,
    runs: Path,
    repository: Path,
    configs: dict[str, TrainConfig],
    synthetic: SyntheticConfig = DATA,
) -> int:
    """Draw ``synthetic`` into ``data``, train ``configs`` in order, export the MODELS into
    ``repository`` and write ``runs/demo-summary.json``; each step is skipped when its result
    is there. Returns the command's exit code (0 when every step succeeded)."""
    started = time.perf_counter()
    timings = {}
    try:
        fresh = not (data / MANIFEST).is_file()
        generate(data, synthetic, log=log)
    except (ValueError, FileExistsError) as exc:
        log(f"error: {exc}")
        return 2
    if fresh:
        timings["data"] = time.perf_counter() - started
    for name, config in configs.items():
        step = time.perf_counter()
        if _finished(config.output_dir):
            log(f"[{name}] already trained ({config.output_dir})")
            continue
        log(f"[{name}] training")
        code = train_and_report(config)
        if code != 0:
            log(
                f"error: training {name} stopped (exit {code}); run make demo-models again to resume"
            )
            return code
        timings[name] = time.perf_counter() - step
    step = time.perf_counter()
    exported = False
    for name in MODELS:
        try:
            exported = export(name, configs[name].output_dir / BEST, repository) or exported
        except (ExportError, CheckpointError, ValueError, OSError) as exc:
            log(f"error: exporting {name} failed: {exc}")
            return 1
    if exported:
        timings["export"] = time.perf_counter() - step
    summary = summarise(runs, list(MODELS))
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    summary["seconds"]["total"] = round(time.perf_counter() - started, 1)
    path = runs / SUMMARY_FILE
    if timings or not path.is_file():  # a rerun with nothing to do keeps the first timings
        path.write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"demo models in {repository} (served at Q = {','.join(map(str, SCALES))}); "
        f"dense multi-scale top-1 error on {summary['images']} synthetic validation images:"
    )
    for name, row in summary["models"].items():
        log(
            f"  {name}: {row['multi_scale']['top1_err']:.2f}% (top-5 {row['multi_scale']['top5_err']:.2f}%)"
        )
    if timings:
        log(f"total {summary['seconds']['total']:.0f} s ({summary['seconds']})")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m train.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m train.demo",
        description="Draw the synthetic set, train two small VGGs on it and export them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="where the synthetic set is (or will be) drawn",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="where training runs keep checkpoints and metrics",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="model repository to export into",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.demo``."""
    args = parse_args(argv)
    configs = run_configs(args.data, args.runs, args.progress)
    return run_demo(args.data, args.runs, args.repository, configs)


if __name__ == "__main__":
    sys.exit(main())
