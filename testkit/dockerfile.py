"""Reading the repository's Dockerfile: its stages, instructions and the tags its header names."""

from __future__ import annotations

import json
import re

from testkit import REPOSITORY_ROOT

DOCKERFILE = REPOSITORY_ROOT / "Dockerfile"


def stages() -> dict[str, list[str]]:
    """Instructions (continuation lines joined, comments dropped) by stage name; each stage's
    list starts with its FROM line."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = line.split()[-1]
            found[current] = [line]
        elif current:
            found[current].append(line)
    return found


def instruction(stage: list[str], name: str) -> list[str]:
    """The arguments of every ``name`` instruction (RUN, COPY, ...) of a stage."""
    return [line[len(name) + 1 :] for line in stage if line.startswith(name + " ")]


def exec_form(stage: str, name: str) -> list[str]:
    """A stage's ENTRYPOINT or CMD in exec (JSON) form, as a list."""
    (arguments,) = instruction(stages()[stage], name)
    return json.loads(arguments)


def target_tags() -> dict[str, str]:
    """``docker build --target T -t TAG .`` of the Dockerfile's header: {target: tag}."""
    return dict(re.findall(r"docker build --target (\S+)\s+-t (\S+)", DOCKERFILE.read_text()))
