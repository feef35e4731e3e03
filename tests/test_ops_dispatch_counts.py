"""How many aten operations one NTK-Attention call dispatches (forward and backward, per path
and layout), counted on CPU with a TorchDispatchMode. On a GPU each is at least one kernel
launch, and at decoding and training sizes the op is host-bound: these counts are its cost
there. The ceilings are today's counts (``src/ntk_attention/ops/README.md`` lists them): a
change that adds operations fails here and has to say why; one that removes some lowers them."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ntk_attention.ops import nonnegative, ntk_attention

# (path, layout) -> (forward ceiling, backward ceiling); B=1, Hq=8, Hkv=2, D=64, elu, causal
CEILINGS = {
    ("lse", "decode"): (40, None),  # Lq = 1 against 64 cached keys, no autograd
    ("lse", "prefill"): (39, None),  # Lq = Lk = 64, no autograd
    ("lse", "train"): (41, 55),  # Lq = Lk = 64, autograd
    ("fused", "decode"): (103, None),
    ("fused", "prefill"): (103, None),
    ("fused", "train"): (106, 83),
}
LAYOUTS = {"decode": (1, 64, False), "prefill": (64, 64, False), "train": (64, 64, True)}


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("path", "layout"), list(CEILINGS))
def test_dispatch_counts_stay_within_their_ceilings(path, layout):
    q_len, k_len, grad = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, q_len, 64, generator=generator).requires_grad_(grad)
    k, v = (torch.randn(1, 2, k_len, 64, generator=generator).requires_grad_(grad) for _ in range(2))
    z = (torch.randn(2, 64, 64, generator=generator) * 0.1).requires_grad_(grad)
    theta = torch.rand(2, 64, generator=generator).requires_grad_(grad)
    forward_ceiling, backward_ceiling = CEILINGS[(path, layout)]
    with torch.set_grad_enabled(grad):
        with _Count() as forward:
            out = ntk_attention(q, k, v, z, nonnegative(theta), feature_map="elu", is_causal=True,
                                implementation=path)
    assert 0 < forward.calls <= forward_ceiling, forward.calls
    if backward_ceiling is not None:
        with _Count() as backward:
            out.sum().backward()
        assert 0 < backward.calls <= backward_ceiling, backward.calls
        assert all(t.grad is not None for t in (q, k, v, z, theta))
