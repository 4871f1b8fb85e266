"""The paper's configurations, torchvision parity and the FC-to-conv conversion."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from testkit.tolerances import score_bound
from vgg.convert import classifier_to_conv, to_fully_conv
from vgg.models import CONFIGS, VGG, FullyConvVGG, build, count_parameters, resolve_arch

TORCHVISION_COUNTS = {
    "vgg11": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
}

# Paper Table 1: weight layers per configuration and 1x1 convs (only C has them).
WEIGHT_LAYERS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}


def on_meta(builder, *args, **kwargs) -> nn.Module:
    """A network built on the meta device: shapes without storage or initialisation, so a
    full-size VGG costs nothing to count."""
    with torch.device("meta"):
        return builder(*args, **kwargs)


@pytest.mark.parametrize("name, count", TORCHVISION_COUNTS.items())
def test_parameter_counts_equal_torchvision(name, count):
    assert count_parameters(on_meta(build, name)) == count
    assert count_parameters(on_meta(build, name + "_bn")) == count_parameters(
        on_meta(getattr(torchvision.models, name + "_bn"), weights=None)
    )


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_configuration_matches_table_1(config):
    model = build(config, width=0.125, fc_width=64)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == WEIGHT_LAYERS[config]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    one_by_one = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(one_by_one) == (3 if config == "C" else 0)
    assert all(c.kernel_size in ((3, 3), (1, 1)) and c.stride == (1, 1) for c in convs)
    lrn = [m for m in model.features if isinstance(m, nn.LocalResponseNorm)]
    if config == "A-LRN":
        assert len(lrn) == 1 and model.features[2] is lrn[0]  # after conv1 + ReLU
        assert (lrn[0].size, lrn[0].alpha, lrn[0].beta, lrn[0].k) == (5, 1e-4, 0.75, 2.0)
    else:
        assert not lrn
    if config == "C":  # the 1x1 convs close stacks 3, 4 and 5
        idx = [i for i, m in enumerate(model.features) if m in one_by_one]
        assert all(isinstance(model.features[i + 2], nn.MaxPool2d) for i in idx)
    out = model.eval()(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)


def test_paper_table_2_parameter_counts_in_millions():
    # Table 2: A/A-LRN 133, B 133, C 134, D 138, E 144 (millions).
    expected = {"A": 133, "A-LRN": 133, "B": 133, "C": 134, "D": 138, "E": 144}
    for config, millions in expected.items():
        assert round(count_parameters(on_meta(build, config)) / 1e6) == millions


@pytest.mark.parametrize(
    "name, letter, bn",
    [
        ("vgg11", "A", False),
        ("vgg13_bn", "B", True),
        ("D", "D", False),
        ("a-lrn", "A-LRN", False),
        ("vgg-c", "C", False),
        ("E", "E", False),
        ("vgg19_bn", "E", True),
    ],
)
def test_architecture_names(name, letter, bn):
    spec = resolve_arch(name)
    assert (spec.config, spec.batch_norm) == (letter, bn)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="unknown architecture 'vgg17'.*vgg16"):
        resolve_arch("vgg17")


def test_small_variants_scale_width_fc_and_kernel():
    spec = resolve_arch("vgg16", width=0.25, fc_width=256, crop=96, num_classes=7)
    model = VGG(spec)
    assert model.features[0].out_channels == 16
    assert model.classifier[0].in_features == 128 * 3 * 3
    assert model.classifier[0].out_features == 256
    assert FullyConvVGG(spec).head[0].kernel_size == (3, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        resolve_arch("vgg16", crop=100)


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "vgg11_bn"])
def test_torchvision_state_dict_gives_same_logits(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    ours = on_meta(VGG, resolve_arch(name))  # every tensor comes from the state dict
    ours.load_state_dict(reference.state_dict(), assign=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), reference(x))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fully_conv_equals_classifier_at_training_crop(config):
    torch.manual_seed(1)
    model = build(config, width=0.25, fc_width=512, crop=64, num_classes=20).eval()
    with torch.no_grad():
        # Larger FC weights than the default N(0, 1e-2) so logits are far from zero.
        for layer in model.classifier:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0, 0.05)
        x = torch.randn(3, 3, 64, 64)
        logits = model(x)
        scores = to_fully_conv(model).eval()(x)
    assert scores.shape == (3, 20, 1, 1)
    # The FC layers as matrix products and as convolutions: the same sums in other orders, so
    # equal within fp32 rounding (testkit.tolerances: 4 * 2**-24 * sqrt(terms per output summed
    # over the layers), here about 1e-5 relative to the largest logit).
    error = (scores.flatten(1) - logits).abs().max() / logits.abs().max()
    assert error < score_bound(model)


def test_full_vgg16_fully_conv_equals_torchvision_classifier():
    torch.manual_seed(2)
    reference = torchvision.models.vgg16(weights=None).eval()
    ours = on_meta(VGG, resolve_arch("vgg16"))
    ours.load_state_dict(reference.state_dict(), assign=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = reference(x)
        scores = to_fully_conv(ours).eval()(x).flatten(1)
    # FC6 is a 25088-term sum, as one matrix product here and a 7x7 convolution there: the
    # orders differ by CPU (1.35e-6 relative on an AMD EPYC). The worst case, 2 * 25088 *
    # 2**-24 * sum|terms|, is a 3e-3 relative bound per FC6 output that compounds through FC7
    # and FC8; rounding errors of either sign add like a random walk instead (testkit.tolerances:
    # 4 * 2**-24 * sqrt(66715 terms per output over the 16 layers) = 6.2e-5 relative to the
    # largest logit), far below what a transposed or mis-reshaped FC6 does (an O(1) change).
    error = (scores - logits).abs().max() / logits.abs().max()
    assert error < score_bound(ours)


def test_fully_conv_score_map_size_follows_input():
    fcn = to_fully_conv(build("vgg16", width=0.125, fc_width=64, crop=64)).eval()
    with torch.no_grad():
        out = fcn(torch.randn(1, 3, 256, 341))
    # floor(256/32) - 2 + 1 = 7 ; floor(341/32) - 2 + 1 = 9
    assert out.shape[2:] == (7, 9)


def test_classifier_to_conv_is_pure_and_reshapes_fc6():
    spec = resolve_arch("vgg16", width=0.125, fc_width=64, crop=64)
    state = VGG(spec).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    converted = classifier_to_conv(state, spec)
    assert converted["head.0.weight"].shape == (64, 64, 2, 2)
    assert converted["head.3.weight"].shape == (64, 64, 1, 1)
    assert converted["head.6.weight"].shape == (1000, 64, 1, 1)
    assert not any(k.startswith("classifier") for k in converted)
    assert all(torch.equal(state[k], before[k]) for k in before)
