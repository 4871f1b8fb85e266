"""VGG networks of Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition" (ICLR 2015, https://arxiv.org/abs/1409.1556), Table 1.

The architecture is data: ``CONFIGS`` maps the paper's letters to layer lists and one
``make_features`` turns any of them into layers. Module names and indices follow torchvision's
``torchvision/models/vgg.py`` exactly, so a torchvision state dict loads into :class:`VGG`
unchanged and parameter counts are equal (vgg16: 138,357,544).

Two forms of the same weights:

* :class:`VGG`, the training form: conv features, average pool to ``crop / 32``, and the
  classifier FC6-FC7-FC8 with dropout, as the paper trains on fixed-size crops.
* :class:`FullyConvVGG`, the test form (paper section 3.2): FC6 is a ``k x k`` convolution
  (``k = crop / 32``), FC7 and FC8 are 1x1 convolutions, so any input of at least ``crop``
  pixels a side maps to a class score map. :func:`vgg.convert.classifier_to_conv` maps one to
  the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

# "M": 2x2 max-pool, stride 2; "LRN": AlexNet's local response normalisation; an int: a 3x3 conv
# with that many channels; ("1x1", n): a 1x1 conv (configuration C's last three stacks).
Layer = int | str | tuple[str, int]

# The configurations C and E repeat a stack: written once and unpacked, so each fits a line.
_C_STACK = [512, 512, ("1x1", 512), "M"]
CONFIGS: dict[str, list[Layer]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, ("1x1", 256), "M", *_C_STACK, *_C_STACK],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M"],
}

# torchvision's names for the configurations it ships; "_bn" adds batch-norm after each conv.
TORCHVISION_NAMES = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# AlexNet's LRN as the paper uses it in A-LRN (size 5, alpha 1e-4, beta 0.75, k 2), with PyTorch's
# (and Caffe's, and ONNX's) convention of alpha divided by the window size.
LRN_PARAMS = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}

DOWNSAMPLING = 32  # five 2x2 max-pools


@dataclass(frozen=True)
class VGGSpec:
    """Everything needed to rebuild a VGG: the paper's configuration plus size knobs.

    Args:
        config: the paper's letter, "A", "A-LRN", "B", "C", "D" or "E".
        batch_norm: batch-norm after every conv (torchvision's ``_bn`` variants).
        num_classes: outputs of FC8.
        width: multiplier on every conv's channel count (1.0 is the paper's net).
        fc_width: channels of FC6 and FC7 (4096 in the paper).
        crop: training crop size; FC6's kernel is ``crop / 32`` (224 -> 7).
        dropout: dropout probability after FC6 and FC7 at training.
    """

    config: str = "D"
    batch_norm: bool = False
    num_classes: int = 1000
    width: float = 1.0
    fc_width: int = 4096
    crop: int = 224
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.config not in CONFIGS:
            raise ValueError(
                f"unknown VGG configuration {self.config!r}; choose one of {sorted(CONFIGS)}"
            )
        if self.crop < DOWNSAMPLING or self.crop % DOWNSAMPLING:
            raise ValueError(f"crop must be a positive multiple of 32, got {self.crop}")
        if self.width <= 0 or self.fc_width <= 0 or self.num_classes <= 0:
            raise ValueError("width, fc_width and num_classes must be positive")

    @property
    def fc6_kernel(self) -> int:
        """FC6 as a convolution: its kernel covers the crop's final feature map."""
        return self.crop // DOWNSAMPLING

    @property
    def arch(self) -> str:
        """torchvision's name where there is one (vgg16, vgg19_bn), else "vgg-<letter>"."""
        for name, letter in TORCHVISION_NAMES.items():
            if letter == self.config:
                return name + ("_bn" if self.batch_norm else "")
        return f"vgg-{self.config.lower()}" + ("_bn" if self.batch_norm else "")

    def channels(self, n: int) -> int:
        """A conv's channel count after the width multiplier (never below 1)."""
        return max(1, round(n * self.width))

    @property
    def feature_channels(self) -> int:
        """Channels entering FC6."""
        last = [c for c in CONFIGS[self.config] if isinstance(c, int | tuple)][-1]
        return self.channels(last[1] if isinstance(last, tuple) else last)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> VGGSpec:
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**known)


def resolve_arch(arch: str, **overrides) -> VGGSpec:
    """A :class:`VGGSpec` from the paper's letter ("D", "A-LRN") or torchvision's name ("vgg16_bn").

    Keyword overrides (``width``, ``fc_width``, ``crop``, ``num_classes``, ...) make small variants.
    """
    key = arch.strip()
    batch_norm = False
    lowered = key.lower()
    if lowered.endswith("_bn"):
        batch_norm, lowered, key = True, lowered[: -len("_bn")], key[: -len("_bn")]
    if lowered in TORCHVISION_NAMES:
        config = TORCHVISION_NAMES[lowered]
    elif lowered.startswith("vgg-") and lowered[4:].upper() in CONFIGS:
        config = lowered[4:].upper()
    elif key.upper() in CONFIGS:
        config = key.upper()
    else:
        names = sorted(CONFIGS) + sorted(TORCHVISION_NAMES) + [n + "_bn" for n in TORCHVISION_NAMES]
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(names)}")
    return replace(VGGSpec(config=config, batch_norm=batch_norm), **overrides)


def make_features(spec: VGGSpec) -> nn.Sequential:
    """The conv stack of one configuration, indexed exactly as torchvision's ``make_layers``."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in CONFIGS[spec.config]:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        if item == "LRN":
            layers.append(nn.LocalResponseNorm(**LRN_PARAMS))
            continue
        kernel, out = (1, item[1]) if isinstance(item, tuple) else (3, item)
        out = spec.channels(out)
        layers.append(nn.Conv2d(in_channels, out, kernel_size=kernel, padding=kernel // 2))
        if spec.batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out
    return nn.Sequential(*layers)


def _init_like_torchvision(module: nn.Module) -> None:
    # torchvision's default initialisation, so an untrained net behaves as users expect;
    # the paper's N(0, 1e-2) and Glorot schemes live in the training module.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class VGG(nn.Module):
    """The training form: features, average pool to ``crop / 32``, FC classifier with dropout.

    Same module names as torchvision's ``VGG`` (``features.*``, ``classifier.0/3/6``).
    """

    def __init__(self, spec: VGGSpec) -> None:
        super().__init__()
        self.spec = spec
        k = spec.fc6_kernel
        self.features = make_features(spec)
        # Identity at the training crop; lets the classifier form run on other sizes too.
        self.avgpool = nn.AdaptiveAvgPool2d((k, k))
        self.classifier = nn.Sequential(
            nn.Linear(spec.feature_channels * k * k, spec.fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(p=spec.dropout),
            nn.Linear(spec.fc_width, spec.fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(p=spec.dropout),
            nn.Linear(spec.fc_width, spec.num_classes),
        )
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class FullyConvVGG(nn.Module):
    """The dense-evaluation form: FC6 a ``k x k`` conv, FC7 and FC8 1x1 convs.

    ``forward`` returns the class score map (N, classes, h, w) with
    ``h = floor(H / 32) - k + 1`` (and likewise w); inputs need ``H, W >= crop``.
    """

    def __init__(self, spec: VGGSpec) -> None:
        super().__init__()
        self.spec = spec
        self.features = make_features(spec)
        self.head = nn.Sequential(
            nn.Conv2d(spec.feature_channels, spec.fc_width, kernel_size=spec.fc6_kernel),
            nn.ReLU(inplace=True),
            nn.Dropout(p=spec.dropout),
            nn.Conv2d(spec.fc_width, spec.fc_width, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Dropout(p=spec.dropout),
            nn.Conv2d(spec.fc_width, spec.num_classes, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(arch: str | VGGSpec, **overrides) -> VGG:
    """A freshly initialised training-form VGG, by letter, torchvision name or spec."""
    spec = (
        replace(arch, **overrides) if isinstance(arch, VGGSpec) else resolve_arch(arch, **overrides)
    )
    return VGG(spec)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())
