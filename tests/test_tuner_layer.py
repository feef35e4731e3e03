"""NTKState: the cached op state used without autograd equals its uncached twin and follows
every change of the adapter's parameters."""

from __future__ import annotations

import torch

from ntk_attention import NTKConfig
from ntk_attention.tuner.layer import Geometry, NTKState


def _state(rank=None) -> NTKState:
    state = NTKState(Geometry(0, 4, 2, 8, 8**-0.5))
    state.add_adapter("a", NTKConfig(rank=rank), torch.device("cpu"))
    with torch.no_grad():
        for param in state.adapter_parameters("a").values():
            param.copy_(torch.rand(param.shape))
    return state


def _assert_same(a, b):
    za = a.z if isinstance(a.z, tuple) else (a.z,)
    zb = b.z if isinstance(b.z, tuple) else (b.z,)
    for x, y in zip(za, zb, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.kappa, b.kappa)
    assert a.feature_map is b.feature_map and a.implementation == b.implementation


def test_cached_op_state_equals_the_uncached_twin_and_is_reused():
    for rank in (None, 3):
        state = _state(rank)
        with torch.no_grad():
            first = state.op_state("a")
            assert state.op_state("a") is first  # reused while nothing changed
            _assert_same(first, state._make_op_state("a"))


def test_cache_follows_optimizer_steps_copies_and_deletion():
    state = _state()
    with torch.no_grad():
        before = state.op_state("a")
    optimizer = torch.optim.SGD(state.parameters(), lr=0.1)
    state.ntk_kappa["a"].sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = state.op_state("a")
        assert after is not before
        _assert_same(after, state._make_op_state("a"))
        state.ntk_kappa["a"].copy_(-torch.ones(2, 8))  # in place: kappa = nonnegative(.) = 0
        assert torch.equal(state.op_state("a").kappa, torch.zeros(2, 8))
    state.delete_adapter("a")
    assert "a" not in state._op_state_cache
    # With autograd every call builds a fresh state (gradients must reach the parameters).
    state.add_adapter("a", NTKConfig(), torch.device("cpu"))
    assert state.op_state("a").kappa.grad_fn is not None
