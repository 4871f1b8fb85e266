"""python -m train: the paper's recipe as defaults, the schedule, initialisation, a short run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from testkit import REPOSITORY_ROOT as ROOT
from train.initialise import conv_layers, init_from, initialise
from train.options import build_parser, parse_args
from train.schedule import LearningRate
from vgg.models import build, resolve_arch


def test_defaults_are_the_papers_recipe():
    args = parse_args(["--data", "d"])
    assert args.batch_size == 256
    assert args.momentum == 0.9
    assert args.weight_decay == 5e-4
    assert args.dropout == 0.5
    assert args.lr == 1e-2
    assert args.lr_scheduler == "plateau" and args.lr_factor == 0.1 and args.lr_drops == 3
    assert args.epochs == 74
    assert args.crop == 224 and args.fc_width == 4096 and args.width == 1.0
    assert args.scale == (256, 256)
    assert args.flip is True
    assert args.lighting == 0.1
    assert args.init == "normal"
    assert args.normalize == "mean"  # mean RGB subtraction only
    # single-scale Q = S, multi-scale {S-32, S, S+32} (paper section 4.2, fixed S)
    assert args.val_scale == 256 and args.val_scales == (224, 256, 288)


def test_jittering_finetuning_and_small_variants():
    args = parse_args(["--data", "d", "--scale", "256:512", "--finetune-from", "a.pth"])
    assert args.scale == (256, 512)
    assert args.val_scale == 384 and args.val_scales == (256, 384, 512)
    assert args.lr == 1e-3  # the paper's fine-tuning rate
    small = parse_args(["--data", "d", "--crop", "64", "--scale", "64:128", "--width", "0.125"])
    assert small.val_scales == (64, 96, 128)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scale", "48", "--crop", "64"], "smaller than --crop 64"),
        (["--scale", "512:256"], "give S"),
        (["--val-scales", "32", "--crop", "64"], "Q=32 is smaller than the crop 64"),
        (["--init-from", "a.pth", "--finetune-from", "b.pth"], "exclude each other"),
        (["--val-every", "0"], "plateau needs validations"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", *argv])
    assert message in capsys.readouterr().err


def test_help_lists_every_flag_with_its_default():
    result = subprocess.run(
        [sys.executable, "-m", "train", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.option_strings[0] in text
    for shown in (
        "--batch-size BATCH_SIZE global mini-batch, split evenly over the processes (default: 256)",
        "(default: 0.9)",
        "(default: 0.0005)",
        "(default: 74)",
        "(default: plateau)",
        "(default: (256, 256))",
        "(default: 0.1)",
    ):
        assert shown in text


def test_plateau_divides_by_ten_then_stops():
    schedule = LearningRate(kind="plateau", base_lr=0.01, patience=2, max_drops=3)
    assert schedule.at(0, 0, 10) == 0.01
    errors = [50, 40, 41, 40.5, 30, 31, 31, 31, 31, 31, 31]
    stops = [schedule.observe(e) for e in errors]
    # 40 -> no improvement twice -> drop 1; 30 -> two bad -> drop 2; two bad -> drop 3; then stop
    assert schedule.drops == 3
    assert math.isclose(schedule.at(5, 0, 10), 1e-5)
    assert stops[-1] is True and not any(stops[:-1])
    resumed = LearningRate(kind="plateau", base_lr=0.01)
    resumed.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert (resumed.scale, resumed.drops, resumed.best, resumed.bad) == (
        schedule.scale,
        schedule.drops,
        schedule.best,
        schedule.bad,
    )


def test_cosine_and_warmup():
    schedule = LearningRate(kind="cosine", base_lr=0.1, epochs=10, warmup_epochs=1)
    assert schedule.at(0, 0, 100) == pytest.approx(0.001)  # first step of the warm-up
    assert schedule.at(0, 99, 100) == pytest.approx(0.1)
    assert schedule.at(1, 0, 100) == pytest.approx(0.1)
    assert schedule.at(5, 50, 100) == pytest.approx(0.05)
    assert schedule.at(9, 99, 100) < 0.001


def test_normal_init_is_n_0_1e_2_with_zero_bias():
    torch.manual_seed(0)
    model = build("vgg11", width=0.5, fc_width=512, crop=64, num_classes=10)
    initialise(model, "normal")
    weights = torch.cat(
        [
            m.weight.flatten()
            for m in model.modules()
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
        ]
    )
    assert abs(weights.std().item() - 1e-2) < 2e-4 and abs(weights.mean().item()) < 2e-4
    assert all(torch.all(m.bias == 0) for m in model.modules() if hasattr(m, "bias"))


def test_init_from_a_copies_its_first_four_convs_and_three_fc_layers():
    names = [name for name, _ in conv_layers(resolve_arch("A"))]
    assert names[:4] == ["conv1_1", "conv2_1", "conv3_1", "conv3_2"]
    small = {"width": 0.125, "fc_width": 64, "crop": 64, "num_classes": 5}
    torch.manual_seed(0)
    a, d = build("A", **small), build("D", **small)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    copied = init_from(d, a)
    assert copied == [
        "conv1_1",
        "conv2_1",
        "conv3_1",
        "conv3_2",
        "classifier.0",
        "classifier.3",
        "classifier.6",
    ]
    index = dict(conv_layers(d.spec))
    a_index = dict(conv_layers(a.spec))
    for name in copied[:4]:
        assert torch.equal(d.features[index[name]].weight, a.features[a_index[name]].weight)
    assert torch.equal(d.classifier[0].weight, a.classifier[0].weight)
    # conv1_2 (absent in A) keeps its own initialisation
    assert torch.equal(d.features[index["conv1_2"]].weight, before["features.2.weight"])
