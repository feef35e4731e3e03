"""What a feature-map class says it can do (ops.feature_maps: ``trainable``, ``needs_r``,
``fixed_r``, ``resolve_r``, kernel features and virtual tokens) is what its instances do, and
the ops, NTKConfig and CompressConfig decide by asking the class, not by the map's name."""

from __future__ import annotations

import re

import pytest
import torch

from ntk_attention import NTKConfig, ntk_attention
from ntk_attention.compress import CompressConfig, CompressError
from ntk_attention.ops import FEATURE_MAPS, FeatureMap, get_feature_map
from ntk_attention.ops.feature_maps import (
    EluFeatureMap,
    ExpFeatureMap,
    ExpFeatureView,
    FavorFeatureMap,
)
from ntk_attention.ops.validation import resolve_feature_map

D, KV_HEADS = 4, 2

# name: (trainable, needs_r, fixed_r, has_kernel_features, has_virtual_tokens, variant)
EXPECTED = {
    "elu": (False, False, True, True, False, "elu+exp"),
    "favor": (False, False, False, True, False, None),
    "taylor": (False, False, True, True, False, None),
    "exp": (True, True, False, False, True, None),
    "elu+exp": (True, True, False, True, True, None),
}


def _build(name: str, r: int | None = None) -> FeatureMap:
    cls = FEATURE_MAPS[name]
    if r is None and cls.needs_r:
        r = D + 3
    return get_feature_map(name, D, r=r, seed=1, kv_heads=KV_HEADS)


def test_the_table_covers_the_registry():
    assert set(EXPECTED) == set(FEATURE_MAPS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_declared_capabilities(name):
    cls = FEATURE_MAPS[name]
    got = (
        cls.trainable, cls.needs_r, cls.fixed_r, cls.has_kernel_features,
        cls.has_virtual_tokens, cls.virtual_token_variant,
    )
    assert got == EXPECTED[name]
    assert cls.only_virtual_tokens() == (name == "exp")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trainable_means_parameters_of_its_own(name):
    phi = _build(name)
    assert FEATURE_MAPS[name].trainable == any(True for _ in phi.parameters())


def test_a_view_over_given_tensors_is_not_trainable_but_has_virtual_tokens():
    weight, bias = torch.randn(KV_HEADS, 3, D), torch.zeros(KV_HEADS, 3)
    view = ExpFeatureView(weight, bias, scale=0.5)
    assert not view.trainable and not list(view.parameters())
    keys, biases = view.virtual_token_tensors()
    assert keys is weight and biases is bias


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_needs_r_means_no_natural_r(name):
    cls = FEATURE_MAPS[name]
    if cls.needs_r:
        with pytest.raises(ValueError):
            cls.resolve_r(D)
        with pytest.raises(ValueError):
            get_feature_map(name, D, kv_heads=KV_HEADS)
    else:
        assert cls.resolve_r(D) == get_feature_map(name, D).r


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("r", [None, 1, D - 1, D, D + 1, D + 5, 1 + D + D * D])
def test_resolve_r_is_what_the_constructor_does(name, r):
    cls = FEATURE_MAPS[name]
    try:
        built = get_feature_map(name, D, r=r, kv_heads=KV_HEADS)
    except ValueError as error:
        with pytest.raises(ValueError) as resolved:
            cls.resolve_r(D, r)
        assert str(resolved.value) == str(error)
    else:
        assert cls.resolve_r(D, r) == built.r


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixed_r_refuses_any_other_r(name):
    cls = FEATURE_MAPS[name]
    natural = cls.resolve_r(D, D + 3 if cls.needs_r else None)
    if cls.fixed_r:
        with pytest.raises(ValueError):
            cls.resolve_r(D, natural + 1)
    else:
        assert cls.resolve_r(D, natural + 1) == natural + 1


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_features_are_kernel_features_then_virtual_tokens(name):
    phi = _build(name).double()
    cls = type(phi)
    slots = cls.virtual_token_slots(D, phi.r)
    assert slots.stop == phi.r or len(slots) == 0
    x = torch.randn(3, KV_HEADS, 5, D, dtype=torch.float64)
    features = phi(x)
    kernel = phi.kernel_map()
    assert (kernel is not None) == cls.has_kernel_features
    if kernel is not None:
        assert kernel.r == (slots.start if cls.has_virtual_tokens else phi.r)
        torch.testing.assert_close(features[..., : kernel.r], kernel(x))
    tensors = phi.virtual_token_tensors()
    assert (tensors is not None) == cls.has_virtual_tokens == (len(slots) > 0)
    if tensors is not None:
        weight, bias = tensors
        assert weight.shape == (KV_HEADS, len(slots), D) and bias.shape == (KV_HEADS, len(slots))
        assert any(weight is p for p in phi.parameters())  # the map's own tensor, not a copy
        expected = torch.exp(phi.scale * x @ weight.transpose(-1, -2) + bias.unsqueeze(-2))
        torch.testing.assert_close(features[..., slots.start : slots.stop], expected)


def test_the_virtual_token_variant_is_the_map_plus_virtual_tokens():
    for name, cls in FEATURE_MAPS.items():
        if cls.virtual_token_variant is None:
            continue
        variant = FEATURE_MAPS[cls.virtual_token_variant]
        n = 3
        r = variant.resolve_r(D, cls.resolve_r(D) + n)
        phi = get_feature_map(cls.virtual_token_variant, D, r=r, kv_heads=KV_HEADS)
        assert type(phi.kernel_map()) is cls
        assert len(variant.virtual_token_slots(D, r)) == n
        assert variant.has_virtual_tokens and not cls.has_virtual_tokens, name


# ---------------------------------------------------------------- the deciders ask the class
class _TrainableKernel(EluFeatureMap):
    """An ELU map that claims parameters of its own, under a name the code cannot know."""

    trainable = True


class _FreeExp(ExpFeatureMap):
    """An exp map that claims a natural r (the head dim)."""

    needs_r = False

    @classmethod
    def resolve_r(cls, head_dim, r=None, *, head_dim_name="head_dim"):
        return head_dim if r is None else r


class _DoubleR(FavorFeatureMap):
    """Random features whose natural r is twice the head dim."""

    @classmethod
    def resolve_r(cls, head_dim, r=None, *, head_dim_name="head_dim"):
        return 2 * head_dim if r is None else r


class _NeedsR(FavorFeatureMap):
    """Random features without a natural r."""

    needs_r = True


def test_the_ops_refuse_a_name_by_the_class_trainable_flag(monkeypatch):
    q = k = v = torch.randn(1, 2, 3, D)
    state = (torch.zeros(2, D, D), torch.zeros(2, D))
    ntk_attention(q, k, v, *state, feature_map="elu")  # a name is fine for a plain map
    monkeypatch.setitem(FEATURE_MAPS, "custom", _TrainableKernel)
    with pytest.raises(ValueError, match="'custom' has trainable parameters"):
        resolve_feature_map("custom", D, D, 0.5, torch.device("cpu"))
    for name in ("exp", "elu+exp"):
        with pytest.raises(ValueError, match="trainable parameters"):
            resolve_feature_map(name, D, D + 2, 0.5, torch.device("cpu"))


def test_ntk_config_asks_the_class_for_r(monkeypatch):
    for name, cls in FEATURE_MAPS.items():
        if cls.needs_r:
            with pytest.raises(ValueError, match=re.escape(f"feature_map {name!r} needs the feature")):
                NTKConfig(feature_map=name)
        else:
            assert NTKConfig(feature_map=name).resolve_r(D) == cls.resolve_r(D)
    monkeypatch.setitem(FEATURE_MAPS, "double", _DoubleR)
    assert NTKConfig(feature_map="double").resolve_r(6) == 12
    monkeypatch.setitem(FEATURE_MAPS, "needs-r", _NeedsR)
    with pytest.raises(ValueError, match="'needs-r' needs the feature dimension r"):
        NTKConfig(feature_map="needs-r")
    assert NTKConfig(feature_map="needs-r", r=5).resolve_r(6) == 5
    # elu+exp's r is checked when the config resolves it, with the constructor's rule
    with pytest.raises(ValueError, match=r"needs r > head dim = 16, got r=16"):
        NTKConfig(feature_map="elu+exp", r=16).resolve_r(16)
    assert NTKConfig(feature_map="elu+exp", r=17).resolve_r(16) == 17


def test_exact_heads_need_a_map_of_virtual_tokens_only(monkeypatch):
    fields = dict(exact_heads=[(0, 0)], exact_tokens=3, r=4)
    for name, cls in FEATURE_MAPS.items():
        if cls.only_virtual_tokens():
            NTKConfig(feature_map=name, **fields)
        else:
            with pytest.raises(ValueError, match="exact_heads keep tokens"):
                NTKConfig(feature_map=name, **{**fields, "r": None if cls.fixed_r else 4})
    monkeypatch.setitem(FEATURE_MAPS, "free-exp", _FreeExp)
    NTKConfig(feature_map="free-exp", **fields)  # the class decides, not the name


def test_compress_config_asks_the_class():
    for name in ("exp", "elu", "favor", "taylor"):
        cls = FEATURE_MAPS[name]
        keeps_tokens = cls.has_virtual_tokens or cls.virtual_token_variant is not None
        assert CompressConfig(feature_map=name).resolved_sink == (1 if keeps_tokens else 0)
        if not keeps_tokens:
            with pytest.raises(CompressError, match="exact sink needs exponential features"):
                CompressConfig(feature_map=name, sink=1)
        if cls.fixed_r:
            with pytest.raises(CompressError, match="fixes its own r"):
                CompressConfig(feature_map=name, r=8)
        else:
            CompressConfig(feature_map=name, r=8)
        if cls.only_virtual_tokens():
            CompressConfig(feature_map=name, init="select", exact_heads=1)
            with pytest.raises(CompressError, match="closed_form' is for kernel"):
                CompressConfig(feature_map=name, init="closed_form")
        else:
            CompressConfig(feature_map=name, init="closed_form", sink=0)
            with pytest.raises(CompressError, match="init 'select'"):
                CompressConfig(feature_map=name, init="select", sink=0)
            with pytest.raises(CompressError, match="exact_heads keep prompt tokens"):
                CompressConfig(feature_map=name, exact_heads=1, sink=0)
            assert CompressConfig(feature_map=name, sink=0).exact_head_count(8, 8 * 1024, 64) == 0
