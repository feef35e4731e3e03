"""Tests of ``ntk_attention.ops.prefix``/``state.prefix_to_state``: exact prefix attention
against the float64 reference, NTK-Attention reproducing a prefix exactly with an exact kernel
feature map, and the closed-form conversion of a prefix with FAVOR+ / Taylor features
approaching the exact result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ntk_attention.ops import (
    get_feature_map,
    ntk_attention_fused,
    ntk_attention_naive,
    prefix_attention,
    prefix_to_state,
)

from support.testing import (
    assert_close,
    reference_ntk_attention,
    reference_prefix_attention,
    relative_error,
)

# Tiny tensors: one thread is faster and immune to a busy neighbour (see conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")

PATHS = {"fused": ntk_attention_fused, "naive": ntk_attention_naive}


def close(actual, expected, tol, msg=""):
    assert_close(actual, expected, rtol=tol, atol=tol * float(expected.detach().abs().max()), msg=msg)


def make_prefix_inputs(*, batch=2, q_heads=4, kv_heads=2, q_len=5, k_len=5, prefix_len=6,
                       head_dim=8, per_row=False, mask=None, std=1.0,
                       dtype=torch.float32) -> dict:
    lead = (batch, kv_heads) if per_row else (kv_heads,)
    tensors = {
        "q": torch.randn(batch, q_heads, q_len, head_dim),
        "k": torch.randn(batch, kv_heads, k_len, head_dim),
        "v": torch.randn(batch, kv_heads, k_len, head_dim),
        "prefix_k": torch.randn(*lead, prefix_len, head_dim),
        "prefix_v": torch.randn(*lead, prefix_len, head_dim),
    }
    inputs = {name: (std * t if name in ("q", "k", "prefix_k") else t).to(dtype)
              for name, t in tensors.items()}
    if mask == "bool":
        keep = torch.ones(batch, 1, 1, k_len, dtype=torch.bool)
        keep[-1, ..., -2:] = False
        inputs["attn_mask"] = keep
    elif mask == "float_empty_row":  # query 0 sees no real key, only the prefix
        bias = torch.zeros(batch, q_heads, q_len, k_len, dtype=dtype)
        bias[:, :, 0] = float("-inf")
        bias[:, :, 1:] = -0.5 * torch.arange(k_len, dtype=dtype)
        inputs["attn_mask"] = bias
    return inputs


def call(fn, inputs, **overrides):
    kwargs = {**inputs, **overrides}
    tensors = [kwargs.pop(name) for name in ("q", "k", "v", "prefix_k", "prefix_v")]
    return fn(*tensors, **kwargs)


PREFIX_CASES = {
    "bidirectional": {},
    "causal_gqa": {"is_causal": True},
    "causal_lq<lk": {"is_causal": True, "q_len": 2, "k_len": 7},
    "causal_lq>lk_prefix_only_rows": {"is_causal": True, "q_len": 7, "k_len": 3},
    "bool_padding": {"mask": "bool", "is_causal": True},
    "float_mask_empty_row": {"mask": "float_empty_row"},
    "per_row_prefix": {"per_row": True, "is_causal": True},
    "explicit_scale": {"scale": 0.2},
}


@pytest.mark.parametrize("name", PREFIX_CASES)
def test_prefix_attention_matches_float64_reference(name):
    options = dict(PREFIX_CASES[name])
    is_causal, scale = options.pop("is_causal", False), options.pop("scale", None)
    inputs = make_prefix_inputs(**options)
    leaves = [inputs[n].requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    out = call(prefix_attention, inputs, is_causal=is_causal, scale=scale)
    reference_inputs = {n: (t.detach().double().requires_grad_() if t.requires_grad else t)
                        for n, t in inputs.items()}
    expected = call(reference_prefix_attention, reference_inputs, is_causal=is_causal,
                    scale=scale)
    assert torch.isfinite(out).all()
    close(out, expected, 2e-5, name)

    weight = torch.randn_like(expected)
    (out * weight.float()).sum().backward()
    (expected * weight).sum().backward()
    for leaf_name, leaf in zip(("q", "k", "v", "prefix_k", "prefix_v"), leaves, strict=False):
        close(leaf.grad, reference_inputs[leaf_name].grad, 1e-4, f"{name} d/d{leaf_name}")


def test_prefix_attention_gradcheck_float64():
    inputs = make_prefix_inputs(batch=1, q_heads=2, kv_heads=1, q_len=3, k_len=3,
                                prefix_len=2, head_dim=4, mask="bool", dtype=torch.float64)
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    leaves = tuple(inputs[n].requires_grad_() for n in names)
    mask = inputs["attn_mask"]

    def fn(*tensors):
        return prefix_attention(*tensors, attn_mask=mask, is_causal=True)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_empty_prefix_is_plain_attention():
    inputs = make_prefix_inputs(prefix_len=0, q_heads=2, kv_heads=2)
    expected = F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"],
                                              is_causal=True)
    close(call(prefix_attention, inputs, is_causal=True), expected, 1e-6)


def exact_kernel_map(prefix_k: torch.Tensor, scale: float):
    """phi(q) = e^{s q.p_K}: r = m features whose inner product with one-hot 'keys' is exactly
    each prefix key's softmax weight. Receives queries grouped per KV head [B, Hkv, N, D]."""
    return lambda x: torch.exp(scale * x @ prefix_k.transpose(-1, -2).to(x.dtype))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_ntk_attention_with_an_exact_kernel_reproduces_the_prefix(path, per_row):
    """Z = P_V, kappa = 1 with phi(q) = e^{s q P_K^T} is exactly prefix attention: the NTK
    formula and prefix attention are the same computation."""
    inputs = make_prefix_inputs(per_row=per_row, mask="bool", q_len=4, k_len=6)
    prefix_k, prefix_v = inputs["prefix_k"], inputs["prefix_v"]
    expected = call(prefix_attention, inputs, is_causal=True)
    out = PATHS[path](
        inputs["q"], inputs["k"], inputs["v"], prefix_v, torch.ones(prefix_k.shape[:-1]),
        feature_map=exact_kernel_map(prefix_k, 8**-0.5), attn_mask=inputs["attn_mask"],
        is_causal=True,
    )
    close(out, expected, 1e-5, path)


@pytest.mark.parametrize("name", ["elu", "taylor"])
def test_prefix_to_state_is_the_closed_form_sum(name):
    prefix_k = torch.randn(2, 7, 4, dtype=torch.float64)
    prefix_v = torch.randn(2, 7, 4, dtype=torch.float64)
    z, kappa = prefix_to_state(prefix_k, prefix_v, name)
    features = get_feature_map(name, 4)(prefix_k)  # [Hkv, m, r]
    assert_close(kappa, features.sum(1), rtol=1e-12)
    assert_close(z, features.transpose(1, 2) @ prefix_v, rtol=1e-12, atol=1e-12)


def conversion_error(feature_map, *, std: float, r: int | None = None) -> float:
    """Relative error of NTK-Attention with the closed-form state of a 64-key prefix against
    exact prefix attention (float64; the prefix holds most of the attention mass)."""
    torch.manual_seed(1)
    inputs = make_prefix_inputs(batch=1, q_heads=4, kv_heads=2, q_len=16, k_len=4,
                                prefix_len=64, head_dim=16, std=std, dtype=torch.float64)
    phi = get_feature_map(feature_map, 16, r=r)
    z, kappa = prefix_to_state(inputs["prefix_k"], inputs["prefix_v"], phi)
    exact = call(reference_prefix_attention, inputs, is_causal=True)
    approx = ntk_attention_fused(inputs["q"], inputs["k"], inputs["v"], z, kappa,
                                 feature_map=phi, is_causal=True)
    return relative_error(approx, exact)


def test_favor_conversion_error_decreases_with_r():
    errors = {r: conversion_error("favor", std=0.5, r=r) for r in (16, 256, 4096)}
    assert errors[16] > errors[256] > errors[4096], errors
    assert errors[4096] < 0.05, errors
    # Monte-Carlo rate: 256x more features should cut the error by roughly 16x.
    assert errors[4096] < errors[16] / 4, errors


def test_taylor_conversion_is_close_for_small_logits_only():
    small = conversion_error("taylor", std=0.25)
    assert small < 1e-3, small
    large = conversion_error("taylor", std=2.0)  # logits of std ~4: 1 + t + t^2/2 is poor
    assert large > 100 * small, (small, large)


def test_prefix_to_state_with_the_same_favor_map_gives_the_ntk_reference():
    """The state is used with the very W it was built with: reference and op agree."""
    prefix_k, prefix_v = torch.randn(2, 2, 9, 8, dtype=torch.float64).unbind(0)
    phi = get_feature_map("favor", 8, r=32)
    z, kappa = prefix_to_state(prefix_k, prefix_v, phi)
    q, k, v = torch.randn(3, 1, 2, 5, 8, dtype=torch.float64).unbind(0)
    expected = reference_ntk_attention(q, k, v, z, kappa, feature_map=phi)
    close(ntk_attention_fused(q, k, v, z, kappa, feature_map=phi), expected, 1e-10)


def bad(**overrides):
    inputs = make_prefix_inputs(batch=1)
    inputs.update(overrides)
    return inputs


BAD_INPUTS = {
    "prefix_k Hkv differs from k": (lambda: bad(prefix_k=torch.randn(3, 6, 8)),
                                    r"prefix_k.*Hkv=2.*\(3, 6, 8\)"),
    "prefix_v head dim differs": (lambda: bad(prefix_v=torch.randn(2, 6, 5)),
                                  r"prefix_v.*D=8.*\(2, 6, 5\)"),
    "prefix lengths differ": (lambda: bad(prefix_v=torch.randn(2, 4, 8)),
                              r"prefix_k.*prefix_v.*\(2, 4, 8\)"),
    "prefix rank 2": (lambda: bad(prefix_k=torch.randn(6, 8)), r"prefix_k.*\(6, 8\)"),
    "per-row prefix batch differs": (lambda: bad(prefix_k=torch.randn(3, 2, 6, 8),
                                                 prefix_v=torch.randn(3, 2, 6, 8)),
                                     r"prefix_k.*\(3, 2, 6, 8\)"),
    "q rank 3": (lambda: bad(q=torch.randn(4, 5, 8)), r"\bq\b.*\(4, 5, 8\)"),
    "Hq not a multiple of Hkv": (lambda: bad(q=torch.randn(1, 3, 5, 8)), r"multiple"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_prefix_attention_bad_input_raises_value_error(name):
    make, match = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=match):
        call(prefix_attention, make())


@pytest.mark.parametrize(
    "prefix_k, prefix_v, feature_map, match",
    [
        (torch.randn(2, 6, 8), torch.randn(2, 5, 8), "elu", r"prefix_k.*prefix_v.*\(2, 5, 8\)"),
        (torch.randn(6, 8), torch.randn(6, 8), "elu", r"prefix_k.*\(6, 8\)"),
        (torch.randn(2, 6, 8), torch.randn(2, 6, 8), "relu", r"unknown feature_map 'relu'"),
    ],
    ids=["lengths differ", "rank 2", "unknown feature map"],
)
def test_prefix_to_state_bad_input_raises_value_error(prefix_k, prefix_v, feature_map, match):
    with pytest.raises(ValueError, match=match):
        prefix_to_state(prefix_k, prefix_v, feature_map)
