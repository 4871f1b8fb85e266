"""The paper's findings in miniature, on the synthetic set (docs/training.md).

    python -m train.findings --data data/synthetic --runs runs        # after make demo-models

Table 3 and 4 compare training scales at equal budgets, the way the paper trained its nets
(section 3.1: fixed S=384 and jittered nets fine-tuned from a fixed-S net): starting from the
same single-scale net ``demo-vgg16-s64`` (D trained at S=64), three epochs of fine-tuning at
fixed S=64, at fixed S=128, or with S jittered in [64, 128] (that one is ``demo-vgg16``). Each
net is then evaluated with the serving protocol at every single Q and at Q = {64, 96, 128}.

The demo nets D and E (``demo-vgg16``, ``demo-vgg19``) then give:

* Table 5: dense vs multi-crop (5x5 grid of 64x64 crops per Q, with flips) vs both;
* flips at test time on and off;
* Table 6: the fusion of D and E (posteriors averaged).

Runs that exist are reused, so the command can be rerun to rebuild the tables. The new runs'
curves are in ``runs/findings-*/curves.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from inference.protocol import DEFAULT_SCALES, average_posteriors
from train.config import TrainConfig
from train.data import scan_folder
from train.demo import SCALES, run_configs
from train.evaluate import collect, error_rates, load_images, serving_graph
from train.recipe import train_and_report
from train.reporting import log
from vgg.checkpoint import load_weights

# The demo's fine-tuning of demo-vgg16-s64, at a fixed scale S instead of jittering.
FIXED = {"findings-S64": 64, "findings-S128": 128}
# The paper's test scales for 224 crops (ImageNet's nets): 2-4 times the demo nets' training scale.
PAPER_SCALES = DEFAULT_SCALES


def fixed_scale_configs(
    data: Path, runs: Path, progress: bool | None = None
) -> dict[str, TrainConfig]:
    """The runs of Tables 3 and 4 by name: ``demo-vgg16``'s settings at a fixed S."""
    jittered = run_configs(data, runs, progress)["demo-vgg16"]
    return {
        name: replace(jittered, scale=(scale, scale), val_scale=scale, output_dir=runs / name)
        for name, scale in FIXED.items()
    }


def _errors(probs: np.ndarray, labels: np.ndarray) -> str:
    top1, top5 = error_rates(probs, labels)
    return f"{top1:.1f} ({top5:.1f})"


def scale_table(args: argparse.Namespace, images, labels) -> list[str]:
    """Tables 3 and 4: rows by training scale, columns by test scale(s)."""
    runs = {"S = 64": "findings-S64", "S = 128": "findings-S128", "S in [64, 128]": "demo-vgg16"}
    head = " | ".join(f"Q = {q}" for q in SCALES)
    lines = [
        f"| D trained at | {head} | Q = {{{', '.join(map(str, SCALES))}}} |",
        "| --- |" + " --- |" * (len(SCALES) + 1),
    ]
    for label, name in runs.items():
        weights = load_weights(args.runs / name / "best.pth")
        graph = serving_graph(weights.model, weights.mean, weights.std)
        posteriors = collect(graph, images, SCALES, weights.model.spec.crop)
        cells = [_errors(posteriors.dense[q], labels) for q in SCALES]
        cells.append(_errors(posteriors.combine(SCALES), labels))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def protocol_table(args: argparse.Namespace, images, labels) -> list[str]:
    """Table 5 (dense / multi-crop / both), flips on and off, Table 6 (fusion of D and E)."""
    # Validation images are listed class by class: take every k-th for a balanced subset.
    picks = np.linspace(0, len(images) - 1, min(len(images), args.multicrop_images)).astype(int)
    few, few_labels = [images[i] for i in picks], labels[picks]
    crops = len(few)
    rows, dense_all, dense_few, both_few = [], [], [], []
    graphs = {}  # net -> (serving graph, crop), read once for both tables
    for net, name in (("D", "demo-vgg16"), ("E", "demo-vgg19")):
        weights = load_weights(args.runs / name / "best.pth")
        graph = serving_graph(weights.model, weights.mean, weights.std)
        crop = weights.model.spec.crop
        graphs[net] = graph, crop
        flipped = collect(graph, images, SCALES, crop)
        unflipped = collect(graph, images, SCALES, crop, flip=False)
        both = collect(graph, few, SCALES, crop, mode="both")
        rows.append((f"{net}, dense, flips off", _errors(unflipped.combine(SCALES), labels), "all"))
        rows.append((f"{net}, dense", _errors(flipped.combine(SCALES), labels), "all"))
        for mode, label in (
            ("dense", "dense"),
            ("multicrop", "multi-crop"),
            ("both", "dense + multi-crop"),
        ):
            rows.append((f"{net}, {label}", _errors(both.combine(SCALES, mode), few_labels), crops))
        dense_all.append(flipped.combine(SCALES))
        dense_few.append(both.combine(SCALES, "dense"))
        both_few.append(both.combine(SCALES, "both"))
    rows.append(("D + E fused, dense", _errors(average_posteriors(dense_all), labels), "all"))
    fused_default = []
    for net, (graph, crop) in graphs.items():
        # Objects 2-4 times larger than in training.
        default = collect(graph, few, PAPER_SCALES, crop).combine(PAPER_SCALES)
        fused_default.append(default)
        q = ", ".join(map(str, PAPER_SCALES))
        rows.append(
            (f"{net}, dense at the paper's Q = {{{q}}}", _errors(default, few_labels), crops)
        )
    rows.append(
        (
            f"D + E fused, dense at Q = {{{q}}}",
            _errors(average_posteriors(fused_default), few_labels),
            crops,
        )
    )
    rows.append(("D + E fused, dense", _errors(average_posteriors(dense_few), few_labels), crops))
    rows.append(
        (
            "D + E fused, dense + multi-crop",
            _errors(average_posteriors(both_few), few_labels),
            crops,
        )
    )
    lines = [
        f"| net, protocol (Q = {{{', '.join(map(str, SCALES))}}}) | top-1 (top-5) error % | "
        "images |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {what} | {cell} | {n if n != 'all' else len(images)} |" for what, cell, n in rows]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m train.findings``."""
    parser = argparse.ArgumentParser(
        prog="python -m train.findings",
        description="Train the short runs and print the paper's findings in miniature.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"), help="synthetic set")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="training runs folder")
    parser.add_argument("--limit", type=int, default=0, help="validation images (0: all)")
    parser.add_argument(
        "--multicrop-images",
        type=int,
        default=300,
        help="validation images for the (slow) multi-crop rows",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.findings``: train the fixed-S runs, then write the tables."""
    args = parse_args(argv)
    started = time.perf_counter()
    for name in ("demo-vgg16-s64", "demo-vgg16", "demo-vgg19"):
        if not (args.runs / name / "best.pth").is_file():
            log(f"error: {args.runs / name / 'best.pth'} is missing; run make demo-models first")
            return 2
    for config in fixed_scale_configs(args.data, args.runs, args.progress).values():
        code = train_and_report(config)
        if code != 0:
            return code
    val = scan_folder(args.data / "val")
    count = len(val) if args.limit <= 0 else min(args.limit, len(val))
    images, labels = load_images(val, range(count))
    lines = [
        "Tables 3 and 4: top-1 (top-5) error %, dense protocol with flips, "
        f"{count} validation images",
        "",
        *scale_table(args, images, labels),
        "",
        "Tables 5 and 6, and flips",
        "",
        *protocol_table(args, images, labels),
    ]
    text = "\n".join(lines) + "\n"
    (args.runs / "findings.md").write_text(text)
    print(text)
    log(f"findings in {args.runs / 'findings.md'} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
