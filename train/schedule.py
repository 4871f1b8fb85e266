"""The learning-rate schedule, with its whole state in a plain dict for exact resume.

``plateau`` is the paper's: the rate is divided by 10 when the validation top-1 error stops
improving (for ``patience`` validations), and training stops at the next plateau after
``max_drops`` divisions (the paper divided 3 times). ``cosine`` and ``step`` are there for
short runs, where a fixed schedule needs no validation to make progress. All three can start
with a linear warm-up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

KINDS = ("plateau", "cosine", "step")
STATE_FIELDS = ("scale", "drops", "best", "bad")


@dataclass
class LearningRate:
    """Learning rate at any (epoch, step), plus the plateau bookkeeping."""

    kind: str = "plateau"
    base_lr: float = 0.01
    epochs: int = 74
    warmup_epochs: float = 0.0
    factor: float = 0.1
    patience: int = 2
    max_drops: int = 3
    step_size: int = 30
    threshold: float = 1e-3
    # state (changes as training goes)
    scale: float = 1.0
    drops: int = 0
    best: float | None = None
    bad: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown learning-rate schedule {self.kind!r}; choose {KINDS}")

    def at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The rate for step ``step`` of epoch ``epoch`` (both from 0)."""
        t = epoch + step / max(1, steps_per_epoch)
        warm = 1.0
        if self.warmup_epochs > 0 and t < self.warmup_epochs:
            warm = (t + 1 / max(1, steps_per_epoch)) / self.warmup_epochs
        if self.kind == "plateau":
            return self.base_lr * self.scale * warm
        if self.kind == "step":
            return self.base_lr * self.factor ** (epoch // max(1, self.step_size)) * warm
        span = max(1e-9, self.epochs - self.warmup_epochs)
        progress = min(1.0, max(0.0, (t - self.warmup_epochs) / span))
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * progress)) * warm

    def observe(self, top1_error: float) -> bool:
        """Record a validation result; True when the plateau rule says training is over."""
        if self.kind != "plateau":
            return False
        if self.best is None or top1_error < self.best * (1 - self.threshold):
            self.best, self.bad = top1_error, 0
            return False
        self.bad += 1
        if self.bad < self.patience:
            return False
        if self.drops >= self.max_drops:
            return True
        self.drops += 1
        self.scale *= self.factor
        self.bad = 0
        return False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore the bookkeeping; the settings stay those of the command line."""
        for key in STATE_FIELDS:
            if key in state:
                setattr(self, key, state[key])
