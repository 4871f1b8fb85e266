"""The paper's findings in miniature, on the synthetic set (README, "Training").

    python -m train.findings --data data/synthetic --runs runs

Trains three D nets with equal short budgets, at fixed S=64, fixed S=128 and jittered
S in [64, 128] (paper Table 3 and 4), then evaluates them and the two demo models
(``make demo-models``) with the serving protocol:

* Table 3: single test scale (Q = S; Q = 96 for the jittered net);
* Table 4: several test scales (Q around S; Q = {64, 96, 128} for the jittered net);
* Table 5: dense vs multi-crop (5x5 grid of 64x64 crops per Q, with flips) vs both;
* flips at test time on and off;
* Table 6: the fusion of D and E (posteriors averaged).

Runs that exist are reused, so the command can be rerun to rebuild the table. The training
runs' curves are in ``runs/findings-*/curves.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from inference.protocol import average_posteriors
from train.data import scan_folder
from train.evaluate import collect, error_rates, load_images, serving_graph
from train.recipe import main as train_main
from train.reporting import log
from vgg.checkpoint import load_weights

SHORT = [
    "--arch", "vgg16_bn", "--width", "0.125", "--fc-width", "512", "--crop", "64",
    "--batch-size", "32", "--lr", "0.02", "--lr-scheduler", "cosine", "--warmup-epochs", "0.5",
    "--dropout", "0", "--init", "kaiming", "--normalize", "mean-std", "--val-every", "0",
    "--val-images", "200",
]  # fmt: skip
# name: (training scale, single test scale, multi-scale test set)
TRAINED = {
    "findings-S64": ("64", 64, (64, 80)),
    "findings-S128": ("128", 128, (112, 128, 144)),
    "findings-S64-128": ("64:128", 96, (64, 96, 128)),
}
MULTI = (64, 96, 128)


def _row(label: str, what: str, probs: np.ndarray, labels: np.ndarray) -> dict:
    top1, top5 = error_rates(probs, labels)
    return {"table": label, "what": what, "top1_err": round(top1, 2), "top5_err": round(top5, 2)}


def evaluate_all(args: argparse.Namespace) -> list[dict]:
    """Every row of the findings table."""
    val = scan_folder(args.data / "val")
    count = len(val) if args.limit <= 0 else min(args.limit, len(val))
    images, labels = load_images(val, range(count))
    rows: list[dict] = []

    def graph_of(path: Path):
        weights = load_weights(path)
        return serving_graph(weights.model, weights.mean, weights.std), weights.model.spec.crop

    for name, (scale, single, multi) in TRAINED.items():
        graph, crop = graph_of(args.runs / name / "best.pth")
        posteriors = collect(graph, images, sorted({single, *multi}), crop)
        rows.append(_row("3: single scale", f"D, train S={scale}, test Q={single}",
                         posteriors.dense[single], labels))  # fmt: skip
        rows.append(_row("4: multi-scale", f"D, train S={scale}, test Q={{{','.join(map(str, multi))}}}",
                         posteriors.combine(multi), labels))  # fmt: skip

    demo = {name: graph_of(args.runs / name / "best.pth") for name in ("demo-vgg16", "demo-vgg19")}
    crops = min(count, args.multicrop_images)
    fused_dense, fused_both = [], []
    for name, (graph, crop) in demo.items():
        net = "D" if name.endswith("16") else "E"
        dense = collect(graph, images, MULTI, crop)
        noflip = collect(graph, images, MULTI, crop, flip=False)
        both = collect(graph, images[:crops], MULTI, crop, modes=("both",))
        q = f"Q={{{','.join(map(str, MULTI))}}}"
        rows.append(_row("5: dense / multi-crop", f"{net}, dense, {q} ({crops} images)",
                         both.combine(MULTI, "dense"), labels[:crops]))  # fmt: skip
        rows.append(_row("5: dense / multi-crop", f"{net}, multi-crop, {q} ({crops} images)",
                         both.combine(MULTI, "multicrop"), labels[:crops]))  # fmt: skip
        rows.append(_row("5: dense / multi-crop", f"{net}, dense + multi-crop, {q} ({crops} images)",
                         both.combine(MULTI, "both"), labels[:crops]))  # fmt: skip
        rows.append(_row("flip", f"{net}, dense {q}, flip on", dense.combine(MULTI), labels))
        rows.append(_row("flip", f"{net}, dense {q}, flip off", noflip.combine(MULTI), labels))
        rows.append(_row("6: fusion", f"{net} alone, dense {q}", dense.combine(MULTI), labels))
        fused_dense.append(dense.combine(MULTI))
        fused_both.append(both.combine(MULTI, "both"))
    rows.append(_row("6: fusion", "D + E, dense", average_posteriors(fused_dense), labels))
    rows.append(_row("6: fusion", f"D + E, dense + multi-crop ({crops} images)",
                     average_posteriors(fused_both), labels[:crops]))  # fmt: skip
    return rows


def markdown(rows: list[dict], images: int) -> str:
    """The rows as a Markdown table."""
    lines = ["| paper table | net and protocol | top-1 err (%) | top-5 err (%) |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['table']} | {row['what']} | {row['top1_err']:.2f} | {row['top5_err']:.2f} |"
        )
    return "\n".join(lines) + f"\n\n{images} synthetic validation images unless stated.\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.findings",
        description="Train the short runs and print the paper's findings in miniature.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"), help="synthetic set")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="training runs folder")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each short D run")
    parser.add_argument("--limit", type=int, default=0, help="validation images (0: all)")
    parser.add_argument("--multicrop-images", type=int, default=300,
                        help="validation images for the (slow) multi-crop rows")  # fmt: skip
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: when stderr is a terminal)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    for name in ("demo-vgg16", "demo-vgg19"):
        if not (args.runs / name / "best.pth").is_file():
            log(f"error: {args.runs / name / 'best.pth'} is missing; run make demo-models first")
            return 2
    progress = [] if args.progress is None else ["--progress" if args.progress else "--no-progress"]
    for name, (scale, single, multi) in TRAINED.items():
        code = train_main(["--data", str(args.data), "--output-dir", str(args.runs / name), *SHORT,
                           "--scale", scale, "--epochs", str(args.epochs), "--val-scale", str(single),
                           "--val-scales", ",".join(map(str, multi)), *progress])  # fmt: skip
        if code != 0:
            return code
    rows = evaluate_all(args)
    images = len(scan_folder(args.data / "val"))
    images = images if args.limit <= 0 else min(images, args.limit)
    table = markdown(rows, images)
    (args.runs / "findings.md").write_text(table)
    (args.runs / "findings.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    log(f"findings in {args.runs / 'findings.md'} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
