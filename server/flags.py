"""``python -m server``'s command line and the flag table of the docs, both generated from the
fields of :class:`~server.settings.Settings`.

    python -m server.flags                         # print the markdown table
    python -m server.flags --write docs/server.md  # replace the table between its markers
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from server.settings import Flag, SettingError, Settings

DESCRIPTION = "HTTP front end: dense multi-scale VGG classification (FastAPI + uvicorn)."
TABLE_BEGIN, TABLE_END = "<!-- flags:begin -->", "<!-- flags:end -->"


def flag_of(item: Field) -> Flag:
    """The :class:`Flag` a Settings field carries."""
    return item.metadata["flag"]


def option_name(name: str) -> str:
    """``max_upload_mb`` -> ``--max-upload-mb``."""
    return "--" + name.replace("_", "-")


def is_switch(item: Field) -> bool:
    """Whether the flag takes no value (a bool setting, True when given)."""
    return isinstance(item.default, bool)


def describe_default(item: Field) -> str:
    """The default as ``--help`` and the table show it."""
    flag = flag_of(item)
    if flag.default_text is not None:
        return flag.default_text
    if is_switch(item):
        return "on" if item.default else "off"
    return str(item.default)


def _argument_type(parse: Any) -> Any:
    """``parse`` as an argparse type: its ValueError's message becomes argparse's error line."""
    if isinstance(parse, type):  # int, float, Path: argparse says "invalid int value: 'x'"
        return parse

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def argument_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m server``: one option per Settings field, in field order."""
    parser = argparse.ArgumentParser(prog="python -m server", description=DESCRIPTION)
    for item in fields(Settings):
        flag = flag_of(item)
        # argparse %-formats help texts: a literal % must be doubled.
        help_text = f"{flag.help} (default: {describe_default(item)})".replace("%", "%%")
        if is_switch(item):
            parser.add_argument(option_name(item.name), action="store_true", help=help_text)
            continue
        parser.add_argument(
            option_name(item.name),
            type=_argument_type(flag.parse),
            choices=flag.choices,
            metavar=flag.metavar,
            default=item.default,
            help=help_text,
        )
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`; a bad value exits 2 with argparse's
    ``error: --flag ...`` line saying what to give."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        return Settings(**vars(args))
    except SettingError as exc:
        parser.error(f"{option_name(exc.name)} {exc.problem}")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def flags_markdown() -> str:
    """The markdown table of every flag of ``python -m server``: flag, default, meaning."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for item in fields(Settings):
        flag = flag_of(item)
        usage = option_name(item.name)
        if flag.choices:
            usage += " {" + ",".join(flag.choices) + "}"
        elif flag.metavar:
            usage += f" {flag.metavar}"
        default = describe_default(item)
        if flag.default_text is None:
            default = f"`{default}`"
        rows.append(f"| `{_cell(usage)}` | {_cell(default)} | {_cell(flag.help)} |")
    return "\n".join(rows) + "\n"


def replace_table(document: str) -> str:
    """``document`` with the text between the flag-table markers replaced by the table."""
    begin, end = document.find(TABLE_BEGIN), document.find(TABLE_END)
    if begin < 0 or end < begin:
        raise ValueError(f"no {TABLE_BEGIN} ... {TABLE_END} markers, in this order")
    return document[: begin + len(TABLE_BEGIN)] + "\n" + flags_markdown() + document[end:]


def main(argv: list[str] | None = None) -> int:
    """Print the flag table, or write it into a markdown file between its markers."""
    parser = argparse.ArgumentParser(
        prog="python -m server.flags", description="The flag table of python -m server."
    )
    parser.add_argument(
        "--write",
        type=Path,
        metavar="FILE",
        help=f"replace the table between {TABLE_BEGIN} and {TABLE_END} in FILE",
    )
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(flags_markdown())
        return 0
    try:
        args.write.write_text(replace_table(args.write.read_text()))
    except (OSError, ValueError) as exc:
        print(f"error: {args.write}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
