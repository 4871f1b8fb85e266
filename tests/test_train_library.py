"""The functions under ``python -m train`` and ``python -m train.demo``: TrainConfig (the one
definition of every flag), train(config) equal to the command and resumed exactly after a
signal, and the demo pipeline run in miniature through run_demo."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.classifier import Classifier, ClassifyOptions
from inference.protocol import dense_batch
from inference.repository import read_repository
from testkit import REPOSITORY_ROOT as ROOT
from testkit.tolerances import largest_score, posterior_bound
from train import demo, recipe
from train.config import ConfigError, TrainConfig
from train.data import load_rgb, scan_folder
from train.options import build_parser, parse_args
from train.recipe import train, train_step
from train.synthetic import SyntheticConfig, generate
from vgg.checkpoint import load_weights


def test_every_field_is_a_flag_with_the_fields_default():
    actions = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert list(actions) == list(fields)  # one flag per field, in the field order
    for name, field in fields.items():
        action = actions[name]
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        assert action.help == field.metadata["help"]
        if field.default is dataclasses.MISSING:
            assert action.required
        else:
            assert action.default == field.default, name
    assert parse_args(["--data", "d"]) == TrainConfig(data=Path("d")).resolved()


def test_derived_defaults_follow_replace():
    base = TrainConfig(data="d", scale=256)
    assert base.scale == (256, 256) and base.data == Path("d")
    assert base.resolved().lr == 1e-2
    finetune = replace(base, finetune_from="a.pth", scale=(256, 512))
    # the paper's fine-tuning rate and multi-scale test set, chosen after the replace
    assert finetune.resolved().lr == 1e-3
    assert finetune.resolved().val_scales == (256, 384, 512)
    assert finetune.resolved().resolved() == finetune.resolved()
    assert base.resolved().output_dir == Path("runs/vgg16")


@pytest.mark.parametrize(
    ("settings", "flags", "message"),
    [
        ({"scale": 48, "crop": 64}, ["--scale", "48", "--crop", "64"], "smaller than --crop 64"),
        (
            {"val_scales": (32,), "crop": 64},
            ["--val-scales", "32", "--crop", "64"],
            "Q=32 is smaller than the crop 64",
        ),
        (
            {"init_from": "a.pth", "finetune_from": "b.pth"},
            ["--init-from", "a.pth", "--finetune-from", "b.pth"],
            "exclude each other",
        ),
        ({"val_every": 0}, ["--val-every", "0"], "plateau needs validations"),
        ({"epochs": 0}, ["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_config_and_command_refuse_the_same_settings(settings, flags, message, capsys):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(data="d", **settings).resolved()
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", *flags])
    assert message in capsys.readouterr().err


def test_settings_argparse_checks_are_checked_by_the_config_too():
    with pytest.raises(ConfigError, match="--lr-scheduler 'linear': choose from plateau"):
        TrainConfig(data="d", lr_scheduler="linear").resolved()
    with pytest.raises(ConfigError, match="--scale"):
        TrainConfig(data="d", scale=(512, 256)).resolved()


TINY_FLAGS = [
    *("--arch", "vgg11_bn", "--width", "0.0625", "--fc-width", "32", "--crop", "32"),
    *("--scale", "32:48", "--batch-size", "8", "--lr", "0.02", "--lr-scheduler", "cosine"),
    *("--warmup-epochs", "0.5", "--init", "kaiming", "--normalize", "mean-std"),
    *("--stats-images", "16", "--val-images", "6", "--threads", "1", "--no-progress"),
    *("--workers", "0", "--epochs", "2"),
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    config = SyntheticConfig(classes=3, train=32, val=6, seed=5)  # 4 steps of 8 per epoch
    return generate(tmp_path_factory.mktemp("tiny") / "data", config, workers=1, log=print)


def train_here(config: TrainConfig):
    """``train(config)`` in this process, leaving its torch thread count as it was."""
    threads = torch.get_num_threads()
    try:
        return train(config)
    finally:
        torch.set_num_threads(threads)


def same_weights(a: Path, b: Path) -> bool:
    first, second = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def library_run(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted tiny run through train(config)."""
    out = tmp_path_factory.mktemp("library") / "run"
    config = replace(parse_args(["--data", str(tiny_data), *TINY_FLAGS]), output_dir=out)
    outcome = train_here(config)
    assert outcome.epochs == 2 and [row["epoch"] for row in outcome.history] == [1, 2]
    assert outcome.final == json.loads((out / "final.json").read_text())
    return out


def test_train_function_gives_the_commands_weights(tiny_data, library_run, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "command"
    command = [sys.executable, "-m", "train", "--data", str(tiny_data), "--output-dir", str(out)]
    result = subprocess.run(
        [*command, *TINY_FLAGS], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("last.pth", "best.pth"):
        assert same_weights(out / name, library_run / name), name


def test_sigterm_interrupts_train_which_then_resumes_exactly(
    tiny_data, library_run, tmp_path, monkeypatch
):
    steps = []

    def step_then_signal(*args, **kwargs):
        result = train_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:  # as `kill -TERM` would, between two steps of the first epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    out = tmp_path / "run"
    config = replace(parse_args(["--data", str(tiny_data), *TINY_FLAGS]), output_dir=out)
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(recipe, "train_step", step_then_signal)
    with pytest.raises(recipe.Interrupted) as info:
        train_here(config)
    monkeypatch.undo()
    assert (info.value.signum, info.value.exit_code) == (signal.SIGTERM, 128 + signal.SIGTERM)
    assert str(info.value) == (
        f"stopped by signal {int(signal.SIGTERM)}: saved {out / 'last.pth'} at epoch 1, step 3"
    )
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back
    saved = torch.load(out / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["finished"]) == (0, 3, False)
    assert not (out / "final.json").exists()

    outcome = train_here(config)  # the same config continues where the signal stopped it
    assert outcome.epochs == 2
    for name in ("last.pth", "best.pth"):
        assert same_weights(out / name, library_run / name), name


def tiny_demo_configs(data: Path, runs: Path) -> dict[str, TrainConfig]:
    """The demo's four runs at 1/16 width, FC 32 and one epoch on a handful of images."""
    return {
        name: replace(
            config,
            width=0.0625,
            fc_width=32,
            batch_size=8,
            epochs=1,
            stats_images=16,
            threads=1,
            workers=0,
            progress=False,
        )
        for name, config in demo.run_configs(data, runs).items()
    }


def test_demo_pipeline_in_miniature_and_its_rerun(tmp_path, capsys):
    data, runs, repository = tmp_path / "data", tmp_path / "runs", tmp_path / "repo"
    configs = tiny_demo_configs(data, runs)
    synthetic = SyntheticConfig(classes=3, train=16, val=6, seed=3)
    threads = torch.get_num_threads()
    try:
        assert demo.run_demo(data, runs, repository, configs, synthetic) == 0
        first = capsys.readouterr().err
        summary_text = (runs / demo.SUMMARY_FILE).read_text()
        assert demo.run_demo(data, runs, repository, configs, synthetic) == 0
        again = capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)

    # the paper's order: D at S=64, D fine-tuned, E from D's layers, E fine-tuned
    starts = [first.index(f"[{name}] training") for name in demo.run_configs(data, runs)]
    assert starts == sorted(starts)
    copied = "conv1_1, conv1_2, conv2_1, conv2_2, classifier.0, classifier.3, classifier.6"
    assert f"initialised {copied} from {runs / 'demo-vgg16-s64' / 'best.pth'}" in first
    assert f"fine-tuning from {runs / 'demo-vgg19-s64' / 'best.pth'}" in first
    # rerun: every step is skipped and the first timings stay
    for name in configs:
        assert f"[{name}] already trained" in again
    assert "training" not in again.replace("already trained", "")
    assert again.count("is up to date") == 2
    assert (runs / demo.SUMMARY_FILE).read_text() == summary_text

    models = read_repository(repository)
    assert sorted(models) == ["demo-vgg16", "demo-vgg19"]
    classes = scan_folder(data / "val").classes
    for entry in models.values():
        assert entry.scales == demo.SCALES and tuple(entry.labels) == classes
    summary = json.loads(summary_text)
    assert summary["images"] == 6 and summary["models"]["fusion"]["multi_scale"]["Q"] == [
        64,
        96,
        128,
    ]

    # what the summary measured is what the server answers: the two nets fused over Q and flips
    validated = []
    for name in demo.MODELS:
        saved = np.load(runs / name / demo.POSTERIORS_FILE)
        validated.append(np.mean([saved[f"Q{q}"] for q in demo.SCALES], axis=0))
    fused = np.mean(validated, axis=0)
    backend = OnnxRuntimeBackend(models, threads=1)
    classifier = Classifier(backend, models)
    val = scan_folder(data / "val")
    nets = [load_weights(runs / name / "best.pth").model for name in demo.MODELS]
    graphs = [entry.onnx_path for entry in models.values()]
    try:
        for index in range(2):
            image = load_rgb(val.samples[index][0])
            served = asyncio.run(classifier.classify(image, ClassifyOptions(top_k=3)))
            # fp32 ONNX Runtime against fp32 PyTorch: within testkit.tolerances' bound
            views = [dense_batch(image, q) for q in demo.SCALES]
            bound = posterior_bound(nets, largest_score(graphs, views))
            assert np.abs(served.probabilities - fused[index]).max() < bound
    finally:
        asyncio.run(backend.close())
