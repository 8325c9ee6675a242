"""ZayaConfig: dict round trip, presets, parameter count, errors."""
import pytest

from zaya.config import ConfigError, ZayaConfig, preset


def test_num_params():
    assert preset("zaya1-8b").num_params() == 8_840_488_784
    assert preset("zaya1-base").num_params() == 8_840_488_784


def test_num_params_matches_param_tree():
    from zaya.model.params import abstract_params, count
    for name in ("tiny", "small-100m", "zaya1-8b"):
        c = preset(name)
        # The tree also holds the balancing-bias buffers and layer 0's unused router_states_scale slot.
        assert count(abstract_params(c)) == c.num_params() + c.num_layers * (c.num_experts + 1) + c.router_hidden_size


def test_dict_round_trip():
    c = preset("tiny")
    assert ZayaConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="bogus"):
        ZayaConfig.from_dict({**c.to_dict(), "bogus": 1})


def test_preset_overrides_and_unknown():
    assert preset("tiny", num_layers=2).num_layers == 2
    with pytest.raises(ConfigError, match="nope"):
        preset("nope")


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
