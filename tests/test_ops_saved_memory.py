"""What one training call of the lse path (the CPU default) keeps for its backward, beyond what
plain SDPA keeps (its output and log-sum-exp; q, k, v are the caller's): at most the features
phi(q) and a few numbers per query (issue 19's training-memory rule), with the sink
exemption on, for the elu and exp maps. Counted through saved-tensor hooks, distinct storages
of the tensors the graph still holds after the forward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from ntk_attention.ops import ntk_attention
from ntk_attention.ops.feature_maps import get_feature_map

B, HQ, HKV, L, D = 2, 8, 2, 128, 64
ONE = B * HQ * L * D * 4  # bytes of one float32 [B, Hq, L, D] tensor


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def _saved_bytes(attention) -> int:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, L, D, generator=generator, requires_grad=True)
    k, v = (torch.randn(B, HKV, L, D, generator=generator, requires_grad=True) for _ in range(2))
    held = []

    def pack(tensor):
        item = _Held(tensor)
        held.append(weakref.ref(item))
        return item

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda item: item.tensor):
        out = attention(q, k, v)
    gc.collect()
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    storages = {}
    for ref in held:
        item = ref()
        if item is not None and item.tensor.untyped_storage().data_ptr() not in inputs:
            storages[item.tensor.untyped_storage().data_ptr()] = item.tensor.untyped_storage().nbytes()
    out.sum().backward()  # the graph is whole: the backward runs
    assert q.grad is not None
    return sum(storages.values())


@pytest.mark.parametrize(("name", "r"), [("elu", None), ("exp", 64)])
def test_lse_training_keeps_at_most_the_features_beyond_sdpa(name, r):
    sdpa = _saved_bytes(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))
    feature_map = get_feature_map(name, D, r=r, kv_heads=HKV) if r else get_feature_map(name, D)
    z = torch.zeros(HKV, feature_map.r, D, requires_grad=True)
    kappa = torch.zeros(HKV, feature_map.r, requires_grad=True)
    ntk = _saved_bytes(lambda q, k, v: ntk_attention(
        q, k, v, z, kappa, feature_map=feature_map, is_causal=True, implementation="lse",
        sink_tokens=1))
    features = B * HQ * L * feature_map.r * 4
    # mass, the state's weight, the merged lse, the sink readers: a few numbers per query
    per_query_numbers = 6 * B * HQ * L * 4
    # Z, kappa and the map's parameters, and the copies matmul broadcasts them to per batch row
    parameters = z.numel() + kappa.numel() + sum(p.numel() for p in feature_map.parameters())
    state = (1 + B) * parameters * 4
    assert sdpa >= ONE  # SDPA keeps its output
    assert ntk - sdpa <= features + per_query_numbers + state, (ntk - sdpa) / ONE
