"""The documentation's references hold: every relative link in README.md and docs/*.md points to
a file that exists (and to a heading of it, where the link names one), and every repository path
written as code (`bench/cpu.sh`, `server/settings.py`, commands in code blocks) exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
# Where generated files go (see .gitignore): a path under one of these is an example of output,
# such as model_repository/vgg16/1/model.onnx or runs/demo-vgg16/best.pth, not a repository file.
GENERATED = (
    ".venv/",
    "data/",
    "runs/",
    "model_repository/",
    "bench/results/",
    "bench/wheels/",
    "loadtest/results/",
    "loadtest/.models/",
)

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?$")
SHELL_COMMENT = re.compile(r"(?:^|\s)#")
# Quotes, brackets and punctuation around a path in code: "(bench/cpu.sh)," -> bench/cpu.sh
AROUND_PATH = "\"'()[]{},;:"


def split_page(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, lines inside fenced code blocks) of a Markdown page."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page`` (``## Soak: 10 minutes`` ->
    ``soak-10-minutes``; a repeated heading gets ``-1``, ``-2``, ...)."""
    anchors: set[str] = set()
    for line in split_page(page.read_text())[0]:
        match = HEADING.match(line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).strip().lower()
        anchor = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        unique, count = anchor, 0
        while unique in anchors:
            count += 1
            unique = f"{anchor}-{count}"
        anchors.add(unique)
    return anchors


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of ``page`` that points to no file, or to no heading of its file."""
    prose = [CODE_SPAN.sub("", line) for line in split_page(page.read_text())[0]]
    targets = [t for line in prose for t in INLINE_LINK.findall(line)]
    targets += [m.group(1) for line in prose if (m := REFERENCE_LINK.match(line))]
    problems = []
    for target in targets:
        if SCHEME.match(target):
            continue  # https:, mailto:: not a file of the repository
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if resolved != root and root not in resolved.parents:
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            problems.append(f"{target}: {resolved.name} has no heading with anchor #{anchor}")
    return problems


def code_paths(page: Path) -> list[str]:
    """Every word of ``page``'s inline code and code blocks that looks like a relative path."""
    prose, code = split_page(page.read_text())
    words = [w for line in prose for _, span in CODE_SPAN.findall(line) for w in span.split()]
    # A shell or YAML comment is prose ("# export/prepare models"), not a path.
    words += [w for line in code for w in SHELL_COMMENT.split(line)[0].split()]
    paths = []
    for word in words:
        word = word.strip(AROUND_PATH).split("::")[0]  # tests/test_x.py::test_y -> the file
        word = word.removeprefix("./")
        if "/" in word and PATH.match(word) and not word.startswith(("./", "../")):
            paths.append(word)
    return paths


def path_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Each repository path written as code in ``page`` that does not exist.

    Only paths whose first part is a file or folder at the repository's root are repository
    paths; others are relative to something the text names (`photos/`, `OUTPUT_DIR/x`), and
    paths under GENERATED are examples of output.
    """
    problems = []
    for path in code_paths(page):
        first = path.split("/")[0]
        if path.startswith(GENERATED) or f"{path}/".startswith(GENERATED):
            continue
        if not (root / first).exists():
            continue
        if not (root / path).exists():
            problems.append(f"`{path}`: no such file or folder")
    return sorted(set(problems))


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_point_to_existing_files_and_headings(page):
    problems = link_problems(page)
    assert not problems, f"{page_id(page)}: " + "; ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_repository_paths_written_as_code_exist(page):
    problems = path_problems(page)
    assert not problems, f"{page_id(page)}: " + "; ".join(problems)


def test_docs_index_links_every_page():
    index = DOCS / "README.md"
    linked = {
        (index.parent / target.partition("#")[0]).resolve()
        for line in split_page(index.read_text())[0]
        for target in INLINE_LINK.findall(line)
    }
    missing = [p.name for p in DOCS.glob("*.md") if p != index and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


def test_the_checks_find_broken_links_anchors_and_paths(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "cpu.sh").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Soak: 10 minutes\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[good](other.md#soak-10-minutes), [own](#page), [web](https://example.org/x.md),\n"
        "[gone](missing.md), [bad anchor](other.md#soak), [out](../../elsewhere.md)\n"
        "`bench/cpu.sh` and `bench/gpu.sh`; `runs/demo/best.pth` is output; `photos/` is yours\n"
        "\n```bash\nbench/cpu.sh --images 2   # see bench/notes.txt\npython bench/missing.py\n```\n"
        "`[not a link](nowhere.md)`\n"
    )
    assert link_problems(page, tmp_path) == [
        "missing.md: no such file",
        "other.md#soak: other.md has no heading with anchor #soak",
        "../../elsewhere.md: outside the repository",
    ]
    assert path_problems(page, tmp_path) == [
        "`bench/gpu.sh`: no such file or folder",
        "`bench/missing.py`: no such file or folder",
    ]
