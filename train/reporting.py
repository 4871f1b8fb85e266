"""What a run tells its user: one log line per epoch, a metrics file and a plot of the curves."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


def log(message: str) -> None:
    """One line on stderr, flushed (progress bars share the stream)."""
    print(message, file=sys.stderr, flush=True)


def _scales(values) -> str:
    return ",".join(str(q) for q in values)


def epoch_line(row: dict, epochs: int) -> str:
    """``epoch 3/12 loss 1.234 lr 0.01 train top-1 45.1% | val ... | 612 img/s 41 s``."""
    parts = [
        f"epoch {row['epoch']}/{epochs}",
        f"loss {row['train_loss']:.4f}",
        f"lr {row['lr']:.3g}",
        f"train top-1 err {row['train_top1_err']:.1f}%",
    ]
    if "val_top1_err" in row:
        parts.append(
            f"val Q={row['val_scale']} top-1/top-5 err {row['val_top1_err']:.2f}%/"
            f"{row['val_top5_err']:.2f}%"
        )
        parts.append(
            f"Q={_scales(row['val_scales'])} {row['val_multi_top1_err']:.2f}%/"
            f"{row['val_multi_top5_err']:.2f}% ({row['val_images']} images)"
        )
    parts.append(f"{row['images_per_s']:.0f} img/s")
    parts.append(f"{row['epoch_s']:.0f} s")
    return " | ".join(parts)


def write_metrics(directory: Path, history: list[dict]) -> Path:
    """Rewrite the metrics file from the checkpoint's history (so the two always agree)."""
    path = Path(directory) / METRICS_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(temporary, path)
    return path


def plot_curves(directory: Path, history: list[dict], title: str) -> Path | None:
    """PNG of training loss and top-1 errors per epoch; None when there is nothing to plot."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o", label="training loss")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    left.set_title("loss")
    left.grid(alpha=0.3)
    right.plot(
        epochs,
        [row["train_top1_err"] for row in history],
        marker="o",
        label="training (crops, augmented)",
    )
    validated = [row for row in history if "val_top1_err" in row]
    if validated:
        x = [row["epoch"] for row in validated]
        q = validated[-1]["val_scale"]
        right.plot(
            x,
            [row["val_top1_err"] for row in validated],
            marker="s",
            label=f"validation, dense Q={q}",
        )
        qs = _scales(validated[-1]["val_scales"])
        right.plot(
            x,
            [row["val_multi_top1_err"] for row in validated],
            marker="^",
            label=f"validation, dense Q={{{qs}}}",
        )
    right.set_xlabel("epoch")
    right.set_ylabel("top-1 error (%)")
    right.set_title("top-1 error")
    right.grid(alpha=0.3)
    right.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(directory) / PLOT_FILE
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return path
