"""NTKConfig: validation names the field, round-trips through dicts, and never changes."""

from __future__ import annotations

import dataclasses

import pytest

from ntk_attention import NTKConfig


def test_defaults_and_roundtrip():
    config = NTKConfig(target_layers=[0, -1], modules_to_save=["score"], rank=4)
    assert config.target_layers == (0, -1) and config.modules_to_save == ("score",)
    data = config.to_dict()
    assert data["target_layers"] == [0, -1] and data["feature_map"] == "elu"
    assert NTKConfig.from_dict(data) == config
    assert hash(config) == hash(NTKConfig.from_dict(data))


def test_frozen_and_replace_returns_a_validated_copy():
    config = NTKConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 4
    other = config.replace(feature_map="favor", r=16)
    assert config.feature_map == "elu" and other.r == 16
    with pytest.raises(ValueError, match="rank must be a positive int"):
        config.replace(rank=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(feature_map="relu"), r"feature_map must be one of \['elu', 'elu\+exp', 'exp', 'favor', 'taylor'\], got 'relu'"),
        (dict(r=0), "r must be a positive int or None, got 0"),
        (dict(r=True), "r must be a positive int"),
        (dict(rank=-2), "rank must be a positive int or None, got -2"),
        (dict(feature_map="exp"), "feature_map 'exp' needs the feature dimension r"),
        (dict(target_layers=[]), "target_layers must be None"),
        (dict(target_layers=[1, 1]), "duplicates"),
        (dict(target_layers=["0"]), "target_layers must hold ints"),
        (dict(target_layers="0"), "target_layers must be a list"),
        (dict(init="ones"), r"init must be one of \('zeros', 'normal'\)"),
        (dict(init_std=float("nan")), "init_std must be a finite number"),
        (dict(position_offset=-1), "position_offset must be >= 0, got -1"),
        (dict(position_offset=1.5), "position_offset must be an int"),
        (dict(modules_to_save=[""]), "modules_to_save must hold module names"),
        (dict(seed="1"), "seed must be an int"),
        (dict(learn_log_scale=1), "learn_log_scale must be a bool"),
        (dict(implementation="flash"), "implementation must be one of"),
    ],
)
def test_invalid_fields_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NTKConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown NTKConfig fields \['rr'\]"):
        NTKConfig.from_dict({"rr": 3})
    with pytest.raises(ValueError, match="mapping"):
        NTKConfig.from_dict([("r", 3)])


def test_resolve_r_per_feature_map():
    assert NTKConfig().resolve_r(16) == 16
    assert NTKConfig(feature_map="favor").resolve_r(16) == 16
    assert NTKConfig(feature_map="favor", r=40).resolve_r(16) == 40
    assert NTKConfig(feature_map="taylor").resolve_r(4) == 21
    assert NTKConfig(feature_map="exp", r=7).resolve_r(16) == 7
    with pytest.raises(ValueError, match="feature_map 'elu' has r = head dim = 16, got r=8"):
        NTKConfig(r=8).resolve_r(16)
    with pytest.raises(ValueError, match="'taylor' has r = 1 \\+ D \\+ D\\^2 = 21"):
        NTKConfig(feature_map="taylor", r=5).resolve_r(4)
