"""CUDA checks of the fused path: it matches the float64 reference on the GPU and runs on
SDPA's fused kernels (flash for bf16/fp16, memory-efficient for fp32). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ntk_attention.ops import ntk_attention

from support.testing import assert_close, assert_low_precision_close, reference_ntk_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KERNELS = {
    torch.float16: SDPBackend.FLASH_ATTENTION,
    torch.bfloat16: SDPBackend.FLASH_ATTENTION,
    torch.float32: SDPBackend.EFFICIENT_ATTENTION,
}


def _inputs(dtype, causal_layout, generator):
    batch, kv_heads, groups, length, head_dim = 2, 2, 3, 256, 64
    q_len = 1 if causal_layout == "decode" else length

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).cuda()

    q = randn(batch, kv_heads * groups, q_len, head_dim, std=2.0).to(dtype)
    k = randn(batch, kv_heads, length, head_dim).to(dtype)
    v = randn(batch, kv_heads, length, head_dim).to(dtype)
    z = randn(kv_heads, head_dim, head_dim)
    kappa = randn(kv_heads, head_dim).abs()
    return {"q": q, "k": k, "v": v, "z": z, "kappa": kappa, "feature_map": "elu", "is_causal": True}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal_layout", ["square", "decode"])
def test_fused_kernel_matches_reference(dtype, causal_layout):
    inputs = _inputs(dtype, causal_layout, torch.Generator().manual_seed(0))
    with sdpa_kernel([KERNELS[dtype]]):  # raises if the fused kernel cannot take the inputs
        out = ntk_attention(**inputs, implementation="fused")
    reference = reference_ntk_attention(**inputs)
    if dtype == torch.float32:
        assert_close(out.double(), reference, rtol=1e-3, atol=1e-4)
    else:
        baseline = reference_ntk_attention(**inputs, dtype=dtype)
        assert_low_precision_close(out, baseline, reference)


def test_fused_backward_on_flash_kernel():
    inputs = _inputs(torch.bfloat16, "square", torch.Generator().manual_seed(1))
    leaves = {name: inputs[name].clone().requires_grad_() for name in ("q", "k", "v", "z")}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = ntk_attention(**{**inputs, **leaves})
        out.float().square().sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
