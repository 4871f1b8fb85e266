"""python -m train.synthetic: deterministic for a seed, the promised sizes, an ImageFolder tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from testkit import REPOSITORY_ROOT as ROOT
from train.synthetic import (
    ASPECT_RATIOS,
    CLASSES,
    SHORT_SIDES,
    SyntheticConfig,
    draw_image,
    generate,
    image_rng,
)

TINY = SyntheticConfig(classes=4, train=24, val=8, seed=3)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "set", TINY, workers=1, log=lambda _m: None)


def test_imagefolder_layout_and_manifest(tiny_set):
    for split, count in (("train", TINY.train), ("val", TINY.val)):
        folders = sorted(p.name for p in (tiny_set / split).iterdir())
        assert folders == sorted(CLASSES[: TINY.classes])
        files = list((tiny_set / split).rglob("*.jpg"))
        assert len(files) == count
        per_class = [len(list((tiny_set / split / c).iterdir())) for c in folders]
        assert max(per_class) - min(per_class) <= 1  # balanced
    manifest = json.loads((tiny_set / "synthetic.json").read_text())
    assert manifest["config"]["seed"] == 3
    assert manifest["classes"] == list(CLASSES[:4])


def test_same_seed_same_bytes_whatever_the_process_count(tiny_set, tmp_path):
    again = generate(tmp_path / "again", TINY, workers=2, log=lambda _m: None)
    assert tree(again) == tree(tiny_set)
    other = generate(
        tmp_path / "other",
        SyntheticConfig(**{**TINY.__dict__, "seed": 4}),
        workers=1,
        log=lambda _m: None,
    )
    assert tree(other).keys() == tree(tiny_set).keys()
    assert tree(other) != tree(tiny_set)


def test_varied_sizes_and_aspect_ratios(tiny_set):
    sizes = {Image.open(p).size for p in tiny_set.rglob("*.jpg")}
    ratios = set()
    for width, height in sizes:
        short, long = min(width, height), max(width, height)
        assert short in SHORT_SIDES
        ratio = next((n, d) for n, d in ASPECT_RATIOS if long * d == short * n)
        ratios.add((ratio, width >= height))
    assert len(sizes) >= 4 and len(ratios) >= 3


def test_object_size_spans_about_10_to_90_percent():
    fractions = [
        draw_image(i % 10, image_rng(0, "train", i), SyntheticConfig())[1]["fraction"]
        for i in range(300)
    ]
    assert 0.1 <= min(fractions) < 0.15
    assert 0.85 < max(fractions) <= 0.9


def test_rerun_is_a_no_op_and_other_settings_are_refused(tiny_set):
    before = {p: p.stat().st_mtime_ns for p in tiny_set.rglob("*")}
    messages = []
    generate(tiny_set, TINY, workers=1, log=messages.append)
    assert "nothing to do" in messages[0]
    assert {p: p.stat().st_mtime_ns for p in tiny_set.rglob("*")} == before
    with pytest.raises(FileExistsError, match="other settings"):
        generate(tiny_set, SyntheticConfig(**{**TINY.__dict__, "train": 25}), workers=1)


def test_command_line_errors_are_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train.synthetic", "--out", str(tmp_path / "x"), "--classes", "11"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--classes must be between 1 and 10" in result.stderr
    assert not (tmp_path / "x").exists()
