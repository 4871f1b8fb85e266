"""The classify model's request parameters: typed as KServe sends them, or as strings (curl)."""

from __future__ import annotations

import pytest

from inference import ClassifyOptions, OptionError
from inference.kserve import options_from_parameters, parameters_from_options


def test_options_go_there_and_back():
    options = ClassifyOptions(
        scales=(256, 384), flip=False, models=("m19",), top_k=3, heatmap=True, mode="both"
    )
    parameters = parameters_from_options(options, jpeg_draft=True)
    assert parameters == {
        "flip": False,
        "mode": "both",
        "scales": "256,384",
        "models": "m19",
        "top_k": 3,
        "heatmap": True,
        "jpeg_draft": True,
    }
    assert options_from_parameters(parameters) == (options, True)


def test_none_given_means_the_http_api_defaults():
    assert options_from_parameters({}) == (ClassifyOptions(), False)
    # Names the model does not know are ignored, as unknown HTTP query parameters are.
    assert options_from_parameters({"binary_data_output": True}) == (ClassifyOptions(), False)


def test_strings_as_a_curl_user_writes_them():
    options, draft = options_from_parameters(
        {"flip": "false", "top_k": "3", "scales": 256, "heatmap": "1", "jpeg_draft": "yes"}
    )
    assert (options.flip, options.top_k, options.scales, options.heatmap, draft) == (
        False,
        3,
        (256,),
        True,
        True,
    )


def test_resolved_per_model_scales_are_left_to_the_model():
    """Models with different serving scales: a request that named none must not pin one set."""
    resolved = ClassifyOptions(
        scales=(64, 96, 128, 256), model_scales={"a": (64, 96, 128), "b": (256,)}, models=("a", "b")
    )
    assert "scales" not in parameters_from_options(resolved)
    same = ClassifyOptions(scales=(256,), model_scales={"a": (256,), "b": (256,)})
    assert parameters_from_options(same)["scales"] == "256"


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"scales": "256,,512"}, "scales: '256,,512' is not a comma-separated list"),
        ({"scales": True}, "scales: must be a string"),
        ({"models": "a,,b"}, "models: 'a,,b' is not a comma-separated list"),
        ({"flip": 2}, "flip: must be true or false, got 2"),
        ({"top_k": 2.5}, "top_k: must be an integer, got 2.5"),
        ({"mode": "dense-ish"}, "mode: Input should be 'dense', 'multicrop' or 'both'"),
    ],
)
def test_a_bad_parameter_is_named(parameters, message):
    with pytest.raises(OptionError) as refused:
        options_from_parameters(parameters)
    assert str(refused.value).startswith(message)
