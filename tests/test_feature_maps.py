"""Tests of ``ntk_attention.ops.feature_maps``: each named map against its closed form, the
kernel each one approximates, the registry and ``get_feature_map``'s validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ntk_attention.ops import FEATURE_MAPS, FeatureMap, get_feature_map

from support.testing import assert_close

# Tiny tensors: one thread is faster and immune to a busy neighbour (see conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def build(name: str, head_dim: int = 8) -> FeatureMap:
    """A registered map with its own r where it fixes one, else r = 24."""
    try:
        return get_feature_map(name, head_dim)
    except ValueError:
        return get_feature_map(name, head_dim, r=24)


def test_registry_names_the_papers_and_the_kernel_maps():
    assert {"elu", "favor", "taylor"} <= set(FEATURE_MAPS)
    for cls in FEATURE_MAPS.values():
        assert issubclass(cls, FeatureMap)


@pytest.mark.parametrize(
    "name, r, expected_r", [("elu", None, 8), ("taylor", None, 1 + 8 + 64), ("favor", 48, 48)]
)
def test_get_feature_map_builds_a_module_with_r(name, r, expected_r):
    phi = get_feature_map(name, head_dim=8, r=r)
    assert isinstance(phi, FeatureMap) and isinstance(phi, torch.nn.Module)
    assert phi.r == expected_r
    assert phi(torch.randn(2, 3, 5, 8)).shape == (2, 3, 5, expected_r)


def test_elu_is_the_papers_map():
    x = torch.randn(3, 16, dtype=torch.float64)
    expected = F.elu(x / 16**0.25) + 1  # ELU(x / D^(1/4)) + 1 at the default scale
    assert_close(get_feature_map("elu", 16)(x), expected, rtol=1e-15)
    custom = get_feature_map("elu", 16, scale=0.3)(x)
    assert_close(custom, F.elu(x * math.sqrt(0.3)) + 1, rtol=1e-15)
    assert (get_feature_map("elu", 16)(100 * x) >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_elu_backward_is_the_composites_gradient(dtype):
    """The map's own backward (c min(phi, 1)) against autograd through F.elu's formula, the
    kink at 0 and features far below the dtype's epsilon included; second derivatives too."""
    x = torch.randn(6, 16, dtype=torch.float64) * 40
    x[0, :4] = torch.tensor([0.0, -1e-9, 1e-9, -200.0])
    x = x.to(dtype)
    phi = get_feature_map("elu", 16, scale=0.3)
    grad = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    mine, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    phi(mine).backward(grad)
    y = reference * math.sqrt(0.3)
    (torch.exp(y.clamp(max=0.0)) + torch.relu(y)).backward(grad)  # d/dy = 1 at y = 0
    tolerance = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert_close(mine.grad, reference.grad, rtol=tolerance, atol=0)
    if dtype == torch.float64:
        leaf = torch.randn(3, 16, dtype=dtype, requires_grad=True)
        assert torch.autograd.gradgradcheck(phi, (leaf,))


def test_taylor_kernel_is_the_second_order_expansion_of_exp():
    d = 6
    phi = get_feature_map("taylor", d)
    x, y = torch.randn(2, 10, d, dtype=torch.float64).unbind(0)
    t = (x * y).sum(-1) / math.sqrt(d)  # s x.y
    kernel = (phi(x) * phi(y)).sum(-1)
    assert_close(kernel, 1 + t + t**2 / 2, rtol=1e-13)
    assert (kernel > 0).all()


def test_favor_is_positive_and_approximates_the_softmax_kernel():
    """phi(x)^T phi(y) estimates e^{s x.y}: over 200 pairs the ratio averages ~1 and its
    worst error shrinks with r."""
    d = 16
    x, y = (0.5 * torch.randn(2, 200, d, dtype=torch.float64)).unbind(0)
    exact = torch.exp((x * y).sum(-1) / math.sqrt(d))
    worst = {}
    for r in (512, 8192):
        phi = get_feature_map("favor", d, r=r)
        features_x, features_y = phi(x), phi(y)
        assert (features_x > 0).all() and (features_y > 0).all()
        ratio = (features_x * features_y).sum(-1) / exact
        worst[r] = float((ratio - 1).abs().max())
    assert abs(float(ratio.mean()) - 1) < 0.02, float(ratio.mean())
    assert worst[8192] < 0.25 and worst[8192] < worst[512] / 2, worst


def test_favor_is_deterministic_per_seed_and_its_projection_is_saved():
    x = torch.randn(4, 8)
    torch.testing.assert_close(get_feature_map("favor", 8, r=32)(x),
                               get_feature_map("favor", 8, r=32)(x), rtol=0, atol=0)
    other_seed = get_feature_map("favor", 8, r=32, seed=1)
    assert not torch.allclose(other_seed(x), get_feature_map("favor", 8, r=32)(x))
    assert not list(other_seed.parameters()), "the random projection must not be trained"
    restored = get_feature_map("favor", 8, r=32, seed=0)
    restored.load_state_dict(other_seed.state_dict())
    torch.testing.assert_close(restored(x), other_seed(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_log_forward_is_forward_in_log_space(name):
    phi = build(name).double()
    x = torch.randn(3, 1, 5, 8, dtype=torch.float64)  # queries as the ops pass them: [B, Hkv, N, D]
    features, offset = phi.log_forward(x)
    assert offset.shape == (3, 1, 5, 1)
    assert_close(features * offset.exp(), phi(x), rtol=1e-12)


def test_favor_log_forward_survives_keys_whose_features_underflow():
    phi = get_feature_map("favor", 64, r=64)
    x = 40 * torch.randn(4, 64)  # s|x|^2 / 2 ~ 6000: every plain feature underflows to 0
    assert (phi(x) == 0).all()
    features, offset = phi.log_forward(x)
    assert torch.isfinite(offset).all() and torch.isfinite(features).all()
    torch.testing.assert_close(features.amax(-1), torch.ones(4))


def test_a_feature_map_instance_is_passed_through():
    phi = get_feature_map("favor", 8, r=32)
    assert get_feature_map(phi, 8) is phi
    assert get_feature_map(phi, 8, r=32) is phi


def test_a_callable_is_wrapped_with_its_r():
    phi = get_feature_map(lambda x: F.relu(x), 8, r=8)
    assert isinstance(phi, FeatureMap) and phi.r == 8
    x = torch.randn(3, 8)
    torch.testing.assert_close(phi(x), F.relu(x))


BAD = {
    "unknown name": (lambda: get_feature_map("relu", 8), r"unknown feature_map 'relu'.*elu"),
    "zero r": (lambda: get_feature_map("favor", 8, r=0), r"\br\b.*positive.*r=0"),
    "negative r": (lambda: get_feature_map("favor", 8, r=-3), r"\br\b.*positive.*r=-3"),
    "elu with r != D": (lambda: get_feature_map("elu", 8, r=4), r"elu.*head_dim = 8.*r=4"),
    "taylor with wrong r": (lambda: get_feature_map("taylor", 4, r=20), r"taylor.*21.*r=20"),
    "zero head_dim": (lambda: get_feature_map("elu", 0), r"head_dim.*0"),
    "callable without r": (lambda: get_feature_map(torch.exp, 8), r"callable.*\br\b"),
    "instance head_dim mismatch": (
        lambda: get_feature_map(get_feature_map("elu", 8), 16), r"head_dim=8.*head_dim=16"),
    "instance r mismatch": (
        lambda: get_feature_map(get_feature_map("favor", 8, r=16), 8, r=32), r"r=16.*r=32"),
    "not a map": (lambda: get_feature_map(3, 8), r"feature_map.*int"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_feature_map_raises_value_error(name):
    make, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cached_constants_act_like_python_numbers(dtype):
    """ops.constants: a cached 0-dim tensor in place of a Python number changes no bit and no
    dtype (decoding uses them to save the per-call wrapping of the number)."""
    from ntk_attention.ops.constants import constant

    x = torch.randn(1000, dtype=torch.float64).to(dtype)
    for value in (math.sqrt(0.125), 1.0):
        with_number, with_constant = x * value, x * constant(value, x)
        assert with_constant.dtype == dtype
        assert torch.equal(with_number, with_constant)
        assert torch.equal(x + value, x + constant(value, x))
