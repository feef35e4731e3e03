"""The learnable exponential feature map: a state with these features is a trained KV prefix,
so copying a prefix's keys/values in must reproduce prefix attention exactly."""

from __future__ import annotations

import pytest
import torch

from ntk_attention.ops import get_feature_map, ntk_attention, prefix_attention

from support.testing import assert_close

B, HQ, HKV, L, D, M = 2, 6, 2, 9, 16, 7


def _prefix_as_state(prefix_k, prefix_v):
    phi = get_feature_map("exp", D, r=M, kv_heads=HKV).to(prefix_k.dtype)
    with torch.no_grad():
        phi.weight.copy_(prefix_k)
    kappa = torch.ones(HKV, M, dtype=prefix_k.dtype)
    return phi, prefix_v, kappa


@pytest.mark.parametrize("implementation", ["fused", "naive"])
@pytest.mark.parametrize("q_len", [L, 1])
def test_prefix_copied_into_exp_state_is_exact(implementation, q_len):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, q_len, D, generator=g, dtype=torch.float64) * 3
    k, v = (torch.randn(B, HKV, L, D, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    prefix_k = torch.randn(HKV, M, D, generator=g, dtype=torch.float64) * 3
    prefix_v = torch.randn(HKV, M, D, generator=g, dtype=torch.float64)
    phi, z, kappa = _prefix_as_state(prefix_k, prefix_v)
    out = ntk_attention(q, k, v, z, kappa, feature_map=phi, is_causal=True,
                        implementation=implementation)
    exact = prefix_attention(q, k, v, prefix_k, prefix_v, is_causal=True)
    assert_close(out, exact, rtol=1e-10, atol=1e-12)


def test_huge_logits_stay_finite_in_fp32_and_match():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, HQ, L, D, generator=g) * 40  # logits of several hundred
    k, v = torch.randn(B, HKV, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    prefix_k, prefix_v = torch.randn(HKV, M, D, generator=g) * 40, torch.randn(HKV, M, D, generator=g)
    phi, z, kappa = _prefix_as_state(prefix_k, prefix_v)
    out = ntk_attention(q, k, v, z, kappa, feature_map=phi, is_causal=True)
    exact = prefix_attention(q.double(), k.double(), v.double(), prefix_k.double(),
                             prefix_v.double(), is_causal=True)
    assert torch.isfinite(out).all()
    assert_close(out.double(), exact, rtol=1e-3, atol=1e-4)


def test_gradients_reach_the_feature_parameters():
    phi = get_feature_map("exp", D, r=M, kv_heads=HKV)
    q, k, v = torch.randn(1, HQ, L, D), torch.randn(1, HKV, L, D), torch.randn(1, HKV, L, D)
    out = ntk_attention(q, k, v, torch.randn(HKV, M, D), torch.ones(HKV, M), feature_map=phi)
    out.square().sum().backward()
    assert phi.weight.grad.abs().sum() > 0 and phi.bias.grad.abs().sum() > 0


def test_name_alone_is_rejected_and_head_count_checked():
    q, k, v = torch.randn(1, HQ, L, D), torch.randn(1, HKV, L, D), torch.randn(1, HKV, L, D)
    with pytest.raises(ValueError, match="trainable parameters"):
        ntk_attention(q, k, v, torch.zeros(HKV, M, D), torch.zeros(HKV, M), feature_map="exp")
    wrong_heads = get_feature_map("exp", D, r=M, kv_heads=HKV + 1)
    with pytest.raises(ValueError, match="KV heads"):
        ntk_attention(q, k, v, torch.zeros(HKV, M, D), torch.zeros(HKV, M), feature_map=wrong_heads)
    with pytest.raises(ValueError, match="needs the number of features"):
        get_feature_map("exp", D)


@pytest.mark.parametrize("implementation", ["fused", "naive"])
def test_elu_plus_exp_keeps_its_virtual_tokens_exact_beside_a_linear_state(implementation):
    """'elu+exp' with a zero linear-attention part and the prefix copied into its exponential
    part is prefix attention; a non-zero linear part adds phi_elu(q)^T Z_elu to both sums."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, HQ, L, D, generator=g, dtype=torch.float64) * 3
    k, v = (torch.randn(B, HKV, L, D, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    prefix_k = torch.randn(HKV, M, D, generator=g, dtype=torch.float64) * 3
    prefix_v = torch.randn(HKV, M, D, generator=g, dtype=torch.float64)
    phi = get_feature_map("elu+exp", D, r=D + M, kv_heads=HKV).double()
    with torch.no_grad():
        phi.exp.weight.copy_(prefix_k)
    z = torch.cat([torch.zeros(HKV, D, D, dtype=torch.float64), prefix_v], dim=1)
    kappa = torch.cat([torch.zeros(HKV, D, dtype=torch.float64), torch.ones(HKV, M, dtype=torch.float64)], 1)
    out = ntk_attention(q, k, v, z, kappa, feature_map=phi, is_causal=True,
                        implementation=implementation)
    assert_close(out, prefix_attention(q, k, v, prefix_k, prefix_v, is_causal=True), rtol=1e-10, atol=1e-12)

    z_elu = torch.rand(HKV, D, D, generator=g, dtype=torch.float64)
    kappa_elu = torch.rand(HKV, D, generator=g, dtype=torch.float64)
    z[:, :D], kappa[:, :D] = z_elu, kappa_elu
    out = ntk_attention(q, k, v, z, kappa, feature_map=phi, is_causal=True,
                        implementation=implementation)
    # The same state split in two: the exp part as a prefix, the elu part through the naive op.
    elu = get_feature_map("elu", D).double()
    features = elu(q.reshape(B, HKV, -1, D)).reshape(B, HQ, L, D)
    group = HQ // HKV
    numer = torch.einsum("bhld,hde->bhle", features, z_elu.repeat_interleave(group, 0))
    mass = torch.einsum("bhld,hd->bhl", features, kappa_elu.repeat_interleave(group, 0))
    keys = torch.cat([prefix_k.expand(B, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    values = torch.cat([prefix_v.expand(B, -1, -1, -1), v], 2).repeat_interleave(group, 1)
    logits = q @ keys.transpose(-1, -2) / D**0.5
    logits[..., M:] = logits[..., M:].masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -torch.inf)
    weights = logits.exp()
    expected = (weights @ values + numer) / (weights.sum(-1) + mass).unsqueeze(-1)
    assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_elu_plus_exp_needs_more_features_than_the_head_dim():
    with pytest.raises(ValueError, match=r"elu\+exp.*r > head_dim = 16, got r=16"):
        get_feature_map("elu+exp", D, r=D)
