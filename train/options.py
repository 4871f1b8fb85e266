"""The command line of ``python -m train``, generated from :class:`train.config.TrainConfig`.

Each field is one flag (``lr_scheduler`` is ``--lr-scheduler``) with the field's default, help
text and choices; booleans are ``--x/--no-x``. Only how a flag's text becomes a value is said
here, for the fields whose type argparse cannot read by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable

from train.augment import parse_scale
from train.config import GROUPS, ConfigError, TrainConfig
from train.evaluate import parse_scales


def _scale(text: str) -> tuple[int, int]:
    try:
        return parse_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# field -> (text to value, metavar) where the field's type is not a plain int, float, str or Path.
PARSERS: dict[str, tuple[Callable[[str], object], str | None]] = {
    "scale": (_scale, "S|SMIN:SMAX"),
    "val_scales": (parse_scales, None),
}


def _value_type(hint: object) -> object:
    """``int | None`` -> int: the type a flag's text is read as."""
    if isinstance(hint, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def build_parser() -> argparse.ArgumentParser:
    """The parser; ``python -m train --help`` prints every flag with its default."""
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a VGG with the recipe of Simonyan & Zisserman (ICLR 2015, section "
        "3.1) on an ImageFolder tree (DIR/train/<class>/*, DIR/val/<class>/*), on one device or "
        "many (torchrun). Rerunning the same command resumes from OUTPUT_DIR/last.pth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        options: dict = {"help": field.metadata["help"]}
        if field.default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = field.default
        value_type = _value_type(hints[field.name])
        if value_type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif field.name in PARSERS:
            options["type"], metavar = PARSERS[field.name]
            if metavar is not None:
                options["metavar"] = metavar
        elif value_type is not str:
            options["type"] = value_type
        if field.metadata["choices"] is not None:
            options["choices"] = field.metadata["choices"]
        flag = "--" + field.name.replace("_", "-")
        groups[field.metadata["group"]].add_argument(flag, **options)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse and check the command line: the run's settings, defaults filled in."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(args)).resolved()
    except ConfigError as exc:
        parser.error(str(exc))
