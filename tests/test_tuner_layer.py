"""NTKState.op_state: the state the op receives, with and without autograd, follows every change
of the adapter's parameters (optimizer steps, in-place copies)."""

from __future__ import annotations

import torch

from ntk_attention import NTKConfig
from ntk_attention.tuner.layer import Geometry, NTKState


def _state(rank=None) -> NTKState:
    state = NTKState(Geometry(0, 4, 2, 8, 8**-0.5))
    state.add_adapter("a", NTKConfig(rank=rank), torch.device("cpu"))
    with torch.no_grad():
        for param in state.adapter_parameters("a").values():
            param.copy_(torch.rand(param.shape) - 0.3)  # some theta < 0: kappa clamps them
    return state


def _assert_same(a, b):
    za = a.z if isinstance(a.z, tuple) else (a.z,)
    zb = b.z if isinstance(b.z, tuple) else (b.z,)
    for x, y in zip(za, zb, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.kappa, b.kappa)
    assert a.feature_map is b.feature_map and a.implementation == b.implementation


def test_op_state_without_autograd_equals_the_autograd_one():
    for rank in (None, 3):
        state = _state(rank)
        with_grad = state.op_state("a")
        assert with_grad.kappa.grad_fn is not None  # gradients must reach theta
        with torch.no_grad():
            without = state.op_state("a")
        assert without.kappa.grad_fn is None
        _assert_same(with_grad, without)
        assert (without.kappa >= 0).all() and (without.kappa == 0).any()


def test_op_state_follows_optimizer_steps_and_copies():
    state = _state()
    with torch.no_grad():
        before = state.op_state("a").kappa.clone()
    optimizer = torch.optim.SGD(state.parameters(), lr=0.1)
    state.op_state("a").kappa.sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = state.op_state("a").kappa
        assert not torch.equal(after, before)
        state.ntk_kappa["a"].copy_(-torch.ones(2, 8))  # in place: kappa = max(theta, 0) = 0
        assert torch.equal(state.op_state("a").kappa, torch.zeros(2, 8))
