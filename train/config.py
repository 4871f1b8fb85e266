"""Every setting of a training run, with the paper's recipe (section 3.1) as the defaults.

    from train.config import TrainConfig
    from train.recipe import train

    config = TrainConfig(data=Path("data/synthetic"), arch="vgg16_bn", scale=(256, 512))
    train(config)

One field per flag of ``python -m train`` (``--lr-scheduler`` is ``lr_scheduler``): the command's
parser is generated from these fields (``train.options``), so each default and help text is
written once, here. A few defaults depend on other settings (``lr``, ``output_dir``,
``val_scale``, ``val_scales``: None until :meth:`TrainConfig.resolved` fills them); checks name
the flag, so the command and the library say the same thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from train.augment import LIGHTING_STD
from train.initialise import INITS
from train.schedule import KINDS

NORMALISATIONS = ("mean", "mean-std", "imagenet")
FINETUNE_LR = 1e-3
DEFAULT_LR = 1e-2
# Flag groups of ``python -m train --help``, in order.
GROUPS = {
    "data": "data",
    "model": "model",
    "optimisation": "optimisation",
    "augmentation": "augmentation",
    "validation": "validation (dense protocol, paper section 3.2)",
    "run": "run",
}
# The settings whose defaults depend on others; everything else is fixed by its field.
DERIVED = ("output_dir", "lr", "val_scale", "val_scales")


class ConfigError(ValueError):
    """A setting no run can use, in one line naming its flag."""


def setting(
    group: str,
    help: str,
    default: object = dataclasses.MISSING,
    choices: tuple[str, ...] | None = None,
) -> dataclasses.Field:
    """A TrainConfig field with what ``--help`` says about it."""
    metadata = {"group": group, "help": help, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run (``python -m train``'s flags as fields)."""

    # data
    data: Path = setting("data", "folder holding train/ and val/ in ImageFolder layout")
    output_dir: Path | None = setting(
        "data", "where checkpoints, metrics and the plot go (default: runs/<arch>)", None
    )
    workers: int | None = setting(
        "data", "data-loading processes per training process (default: 1 on CPU, 8 on GPU)", None
    )
    # model
    arch: str = setting(
        "model",
        "torchvision name (vgg11, vgg13, vgg16, vgg19, *_bn) or the paper's "
        "letter (A, A-LRN, B, C, D, E)",
        "vgg16",
    )
    width: float = setting(
        "model", "multiplier on every conv's channels (small variants for CPU runs)", 1.0
    )
    fc_width: int = setting("model", "channels of FC6 and FC7", 4096)
    crop: int = setting("model", "training crop; FC6's kernel is crop / 32", 224)
    dropout: float = setting("model", "dropout after FC6 and FC7", 0.5)
    init: str = setting(
        "model",
        "normal: N(0, 1e-2) weights, zero biases; glorot: Glorot & Bengio; kaiming: He et al.",
        "normal",
        INITS,
    )
    init_from: Path | None = setting(
        "model",
        "a trained net (e.g. A): its first four conv layers and three FC "
        "layers start this one, the rest follows --init",
        None,
    )
    init_from_arch: str | None = setting(
        "model", "architecture of --init-from when it is a plain state dict", None
    )
    finetune_from: Path | None = setting(
        "model",
        "start from all weights of a trained net of the same architecture "
        f"(the paper's S=384 and multi-scale runs; --lr defaults to {FINETUNE_LR})",
        None,
    )
    # optimisation
    batch_size: int = setting(
        "optimisation", "global mini-batch, split evenly over the processes", 256
    )
    lr: float | None = setting(
        "optimisation",
        f"initial learning rate (default: {DEFAULT_LR}; {FINETUNE_LR} with --finetune-from)",
        None,
    )
    momentum: float = setting("optimisation", "SGD momentum", 0.9)
    weight_decay: float = setting("optimisation", "L2 penalty", 5e-4)
    epochs: int = setting("optimisation", "at most this many epochs", 74)
    lr_scheduler: str = setting(
        "optimisation",
        "plateau: divide by --lr-factor when validation top-1 stops "
        "improving; cosine and step: fixed schedules for short runs",
        "plateau",
        KINDS,
    )
    lr_factor: float = setting("optimisation", "factor of each decrease (plateau and step)", 0.1)
    lr_patience: int = setting(
        "optimisation", "validations without improvement before a decrease (plateau)", 2
    )
    lr_drops: int = setting(
        "optimisation", "decreases before training stops at the next plateau (plateau)", 3
    )
    lr_step_size: int = setting("optimisation", "epochs per decrease (step)", 30)
    warmup_epochs: float = setting("optimisation", "linear learning-rate warm-up", 0.0)
    seed: int = setting(
        "optimisation", "seed of initialisation, data order, augmentation and dropout", 0
    )
    # augmentation
    scale: tuple[int, int] = setting(
        "augmentation", "training scale: fixed S (256) or jittered per image (256:512)", (256, 256)
    )
    flip: bool = setting("augmentation", "random horizontal flip", True)
    lighting: float = setting(
        "augmentation", "std of AlexNet's PCA colour shift (0: off)", LIGHTING_STD
    )
    normalize: str = setting(
        "augmentation",
        "mean: subtract the training set's mean RGB (the paper); "
        "mean-std: also divide by its std; imagenet: torchvision's values",
        "mean",
        NORMALISATIONS,
    )
    stats_images: int = setting(
        "augmentation", "training images sampled for the mean/std and the colour PCA", 500
    )
    # validation
    val_scale: int | None = setting(
        "validation", "single test scale Q (default: S, or (Smin+Smax)/2 with jittering)", None
    )
    val_scales: tuple[int, ...] | None = setting(
        "validation",
        "multi-scale test set (default: S-32,S,S+32 for fixed S; "
        "Smin,(Smin+Smax)/2,Smax with jittering)",
        None,
    )
    val_flip: bool = setting("validation", "average with the flipped image", True)
    val_every: int = setting(
        "validation",
        "validate every N epochs (0: only after the last); the plateau schedule needs validations",
        1,
    )
    val_images: int = setting(
        "validation",
        "validate on this many images (a fixed random subset; 0: all); the "
        "final validation of the best weights always uses all",
        0,
    )
    # run
    device: str = setting("run", "auto (cuda when available), cpu or cuda", "auto")
    threads: int | None = setting(
        "run", "torch threads per process (default: cores / processes)", None
    )
    amp: bool = setting("run", "bf16 autocast on GPU (ignored on CPU)", True)
    channels_last: bool = setting(
        "run", "channels-last memory format on GPU (ignored on CPU)", True
    )
    sync_bn: bool = setting(
        "run", "batch-norm over the global batch when training on several processes", True
    )
    resume: bool = setting("run", "continue from OUTPUT_DIR/last.pth when it exists", True)
    save_every_steps: int = setting(
        "run", "also checkpoint every N steps within an epoch (0: at epoch ends)", 0
    )
    progress: bool | None = setting(
        "run", "progress bar (default: when stderr is a terminal)", None
    )

    def __post_init__(self) -> None:
        # Paths and scales may be given as strings, lists or a single S: store one form.
        for name in ("data", "output_dir", "init_from", "finetune_from"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if isinstance(self.scale, int):
            object.__setattr__(self, "scale", (self.scale, self.scale))
        elif not isinstance(self.scale, tuple):
            object.__setattr__(self, "scale", tuple(self.scale))
        if self.val_scales is not None and not isinstance(self.val_scales, tuple):
            object.__setattr__(self, "val_scales", tuple(self.val_scales))

    def resolved(self) -> TrainConfig:
        """A copy with the defaults that depend on other settings filled in, checked.

        Raises :class:`ConfigError` naming the flag of a setting no run can use. Resolving a
        resolved config changes nothing.
        """
        for field in dataclasses.fields(self):
            choices = field.metadata["choices"]
            value = getattr(self, field.name)
            if choices is not None and value not in choices:
                raise ConfigError(
                    f"--{_flag(field.name)} {value!r}: choose from {', '.join(choices)}"
                )
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(
                f"--scale {self.scale}: give S (e.g. 256) or Smin:Smax (e.g. 256:512)"
            )
        lr = self.lr
        if lr is None:
            lr = FINETUNE_LR if self.finetune_from else DEFAULT_LR
        if self.init_from and self.finetune_from:
            raise ConfigError("--init-from and --finetune-from exclude each other")
        output_dir = self.output_dir
        if output_dir is None:
            output_dir = Path("runs") / self.arch
        smin, smax = self.scale
        single, multi = default_val_scales(smin, smax)
        val_scale = single if self.val_scale is None else self.val_scale
        val_scales = self.val_scales
        if val_scales is None:
            val_scales = tuple(q for q in multi if q >= self.crop)
        if smin < self.crop:
            raise ConfigError(f"--scale {smin} is smaller than --crop {self.crop}")
        for q in (val_scale, *val_scales):
            if q < self.crop:
                raise ConfigError(f"test scale Q={q} is smaller than the crop {self.crop}")
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be at least 1")
        if self.val_every < 0 or self.val_images < 0 or self.save_every_steps < 0:
            raise ConfigError("--val-every, --val-images and --save-every-steps cannot be negative")
        if self.lr_scheduler == "plateau" and self.val_every == 0:
            raise ConfigError("--lr-scheduler plateau needs validations: set --val-every")
        return dataclasses.replace(
            self, lr=lr, output_dir=output_dir, val_scale=val_scale, val_scales=val_scales
        )

    def as_record(self) -> dict:
        """The settings as plain values (paths as strings), as checkpoints record them."""
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _plain(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


def default_val_scales(smin: int, smax: int) -> tuple[int, tuple[int, ...]]:
    """(single Q, multi-scale set) as the paper's sections 4.1 and 4.2 choose them."""
    if smin == smax:
        return smin, (smin - 32, smin, smin + 32)
    middle = (smin + smax) // 2
    return middle, (smin, middle, smax)
