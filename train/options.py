"""The command line of ``python -m train``: the paper's recipe is the default of every flag."""

from __future__ import annotations

import argparse
from pathlib import Path

from train.augment import LIGHTING_STD, parse_scale
from train.evaluate import parse_scales
from train.initialise import INITS
from train.schedule import KINDS

NORMALISATIONS = ("mean", "mean-std", "imagenet")
FINETUNE_LR = 1e-3
DEFAULT_LR = 1e-2


def _scale(text: str) -> tuple[int, int]:
    try:
        return parse_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The parser; ``python -m train --help`` prints every flag with its default."""
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a VGG with the recipe of Simonyan & Zisserman (ICLR 2015, section "
        "3.1) on an ImageFolder tree (DIR/train/<class>/*, DIR/val/<class>/*), on one device or "
        "many (torchrun). Rerunning the same command resumes from OUTPUT_DIR/last.pth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder holding train/ and val/ in ImageFolder layout",
    )
    data.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where checkpoints, metrics and the plot go (default: runs/<arch>)",
    )
    data.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-loading processes per training process (default: 1 on CPU, 8 on GPU)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--arch",
        default="vgg16",
        help="torchvision name (vgg11, vgg13, vgg16, vgg19, *_bn) or the paper's "
        "letter (A, A-LRN, B, C, D, E)",
    )
    model.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="multiplier on every conv's channels (small variants for CPU runs)",
    )
    model.add_argument("--fc-width", type=int, default=4096, help="channels of FC6 and FC7")
    model.add_argument(
        "--crop", type=int, default=224, help="training crop; FC6's kernel is crop / 32"
    )
    model.add_argument("--dropout", type=float, default=0.5, help="dropout after FC6 and FC7")
    model.add_argument(
        "--init",
        choices=INITS,
        default="normal",
        help="normal: N(0, 1e-2) weights, zero biases; glorot: Glorot & Bengio; kaiming: He et al.",
    )
    model.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a trained net (e.g. A): its first four conv layers and three FC "
        "layers start this one, the rest follows --init",
    )
    model.add_argument(
        "--init-from-arch",
        default=None,
        help="architecture of --init-from when it is a plain state dict",
    )
    model.add_argument(
        "--finetune-from",
        type=Path,
        default=None,
        help="start from all weights of a trained net of the same architecture "
        f"(the paper's S=384 and multi-scale runs; --lr defaults to {FINETUNE_LR})",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="global mini-batch, split evenly over the processes",
    )
    optim.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"initial learning rate (default: {DEFAULT_LR}; {FINETUNE_LR} with --finetune-from)",
    )
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty")
    optim.add_argument("--epochs", type=int, default=74, help="at most this many epochs")
    optim.add_argument(
        "--lr-scheduler",
        choices=KINDS,
        default="plateau",
        help="plateau: divide by --lr-factor when validation top-1 stops "
        "improving; cosine and step: fixed schedules for short runs",
    )
    optim.add_argument(
        "--lr-factor", type=float, default=0.1, help="factor of each decrease (plateau and step)"
    )
    optim.add_argument(
        "--lr-patience",
        type=int,
        default=2,
        help="validations without improvement before a decrease (plateau)",
    )
    optim.add_argument(
        "--lr-drops",
        type=int,
        default=3,
        help="decreases before training stops at the next plateau (plateau)",
    )
    optim.add_argument("--lr-step-size", type=int, default=30, help="epochs per decrease (step)")
    optim.add_argument(
        "--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up"
    )
    optim.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of initialisation, data order, augmentation and dropout",
    )

    augment = parser.add_argument_group("augmentation")
    augment.add_argument(
        "--scale",
        type=_scale,
        default=(256, 256),
        metavar="S|SMIN:SMAX",
        help="training scale: fixed S (256) or jittered per image (256:512)",
    )
    augment.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flip"
    )
    augment.add_argument(
        "--lighting",
        type=float,
        default=LIGHTING_STD,
        help="std of AlexNet's PCA colour shift (0: off)",
    )
    augment.add_argument(
        "--normalize",
        choices=NORMALISATIONS,
        default="mean",
        help="mean: subtract the training set's mean RGB (the paper); "
        "mean-std: also divide by its std; imagenet: torchvision's values",
    )
    augment.add_argument(
        "--stats-images",
        type=int,
        default=500,
        help="training images sampled for the mean/std and the colour PCA",
    )

    val = parser.add_argument_group("validation (dense protocol, paper section 3.2)")
    val.add_argument(
        "--val-scale",
        type=int,
        default=None,
        help="single test scale Q (default: S, or (Smin+Smax)/2 with jittering)",
    )
    val.add_argument(
        "--val-scales",
        type=parse_scales,
        default=None,
        help="multi-scale test set (default: S-32,S,S+32 for fixed S; "
        "Smin,(Smin+Smax)/2,Smax with jittering)",
    )
    val.add_argument(
        "--val-flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average with the flipped image",
    )
    val.add_argument(
        "--val-every",
        type=int,
        default=1,
        help="validate every N epochs (0: only after the last); the plateau "
        "schedule needs validations",
    )
    val.add_argument(
        "--val-images",
        type=int,
        default=0,
        help="validate on this many images (a fixed random subset; 0: all); the "
        "final validation of the best weights always uses all",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default: cores / processes)",
    )
    run.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast on GPU (ignored on CPU)",
    )
    run.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels-last memory format on GPU (ignored on CPU)",
    )
    run.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch-norm over the global batch when training on several processes",
    )
    run.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from OUTPUT_DIR/last.pth when it exists",
    )
    run.add_argument(
        "--save-every-steps",
        type=int,
        default=0,
        help="also checkpoint every N steps within an epoch (0: at epoch ends)",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    return parser


def default_val_scales(smin: int, smax: int) -> tuple[int, tuple[int, ...]]:
    """(single Q, multi-scale set) as the paper's sections 4.1 and 4.2 choose them."""
    if smin == smax:
        return smin, (smin - 32, smin, smin + 32)
    middle = (smin + smax) // 2
    return middle, (smin, middle, smax)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line, filling the defaults that depend on other flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = FINETUNE_LR if args.finetune_from else DEFAULT_LR
    if args.init_from and args.finetune_from:
        parser.error("--init-from and --finetune-from exclude each other")
    if args.output_dir is None:
        args.output_dir = Path("runs") / args.arch
    smin, smax = args.scale
    single, multi = default_val_scales(smin, smax)
    if args.val_scale is None:
        args.val_scale = single
    if args.val_scales is None:
        args.val_scales = tuple(q for q in multi if q >= args.crop)
    if smin < args.crop:
        parser.error(f"--scale {smin} is smaller than --crop {args.crop}")
    for q in (args.val_scale, *args.val_scales):
        if q < args.crop:
            parser.error(f"test scale Q={q} is smaller than the crop {args.crop}")
    for name in ("batch_size", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.val_every < 0 or args.val_images < 0 or args.save_every_steps < 0:
        parser.error("--val-every, --val-images and --save-every-steps cannot be negative")
    if args.lr_scheduler == "plateau" and args.val_every == 0:
        parser.error("--lr-scheduler plateau needs validations: set --val-every")
    return args
