"""Tests of ``ntk_attention.ops.decode_merge``: the compiled decoding merge against its torch twin
(``lse_inference(..., fused_merge=False)``), where it is taken, and the fallback when numba is
missing or fails to compile. Layout coverage against the float64 reference is in test_ops.py
(``test_lse_inference_*``, run with both merges)."""

from __future__ import annotations

import sys

import pytest
import torch

from ntk_attention.ops import decode_merge, get_feature_map
from ntk_attention.ops import lse as lse_module
from ntk_attention.ops.lse import lse_inference
from ntk_attention.ops.state import state_matrix

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(batch=2, q_heads=6, kv_heads=2, q_len=1, k_len=11, dim=16, per_row=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=generator) * 2
    k = torch.randn(batch, kv_heads, k_len, dim, generator=generator)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=generator)
    lead = (batch, kv_heads) if per_row else (kv_heads,)
    z = torch.randn(*lead, dim, dim, generator=generator)
    kappa = torch.rand(*lead, dim, generator=generator)
    return q, k, v, state_matrix(z, kappa)


@pytest.mark.parametrize(
    "layout",
    [
        dict(),  # decoding, GQA 6/2, batch 2
        dict(per_row=True),  # a state per row (adapter mixing)
        dict(q_heads=3, kv_heads=3, batch=1, k_len=1),  # one key
    ],
)
@pytest.mark.parametrize("log_scale", [None, "scalar", "per head", "per row"])
def test_compiled_merge_matches_its_torch_twin(layout, log_scale):
    q, k, v, matrix = _inputs(**layout)
    batch, kv_heads = q.shape[0], k.shape[1]
    scales = {
        None: None,
        "scalar": torch.tensor(-3.0),
        "per head": torch.linspace(-2.0, 5.0, kv_heads),
        "per row": torch.randn(batch, kv_heads, generator=torch.Generator().manual_seed(1)) * 3,
    }[log_scale]
    phi = get_feature_map("elu", q.shape[-1])
    options = dict(is_causal=True, scale=q.shape[-1] ** -0.5, state_log_scale=scales)
    with torch.no_grad():
        compiled = lse_inference(q, k, v, matrix, phi, **options)
        twin = lse_inference(q, k, v, matrix, phi, **options, fused_merge=False)
    torch.testing.assert_close(compiled, twin, rtol=1e-5, atol=1e-6)


def test_merge_is_taken_for_float32_elu_on_cpu_only():
    q, _, _, matrix = _inputs()
    elu = get_feature_map("elu", 16)
    assert decode_merge.merge_takes(q, matrix, elu, None)
    assert decode_merge.merge_takes(q, matrix, elu, torch.zeros(2))
    assert not decode_merge.merge_takes(q.bfloat16(), matrix, elu, None)
    assert not decode_merge.merge_takes(q, matrix.double(), elu, None)
    assert not decode_merge.merge_takes(q, matrix, elu, torch.zeros(2, dtype=torch.float64))
    assert not decode_merge.merge_takes(q, matrix, get_feature_map("favor", 16, r=16), None)
    assert not decode_merge.merge_takes(q.requires_grad_(), matrix, elu, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_run_the_torch_ops(dtype, monkeypatch):
    calls = []
    monkeypatch.setattr(lse_module, "merge_into", lambda *a: calls.append(a))
    q, k, v, matrix = _inputs()
    phi = get_feature_map("elu", 16)
    with torch.no_grad():
        out = lse_inference(q.to(dtype), k.to(dtype), v.to(dtype), matrix, phi, is_causal=True,
                            scale=0.25)
        expected = lse_inference(q, k, v, matrix, phi, is_causal=True, scale=0.25,
                                 fused_merge=False)
    assert not calls and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_without_numba_the_torch_ops_run(monkeypatch):
    """numba missing: merge_takes says no (nothing raises), lse_inference gives the same result."""
    q, k, v, matrix = _inputs()
    phi = get_feature_map("elu", 16)
    with torch.no_grad():
        expected = lse_inference(q, k, v, matrix, phi, is_causal=True, scale=0.25)
    monkeypatch.setattr(decode_merge, "_compiled", None)
    monkeypatch.setattr(decode_merge, "_broken", False)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    assert not decode_merge.merge_takes(q, matrix, phi, None)
    with torch.no_grad():
        out = lse_inference(q, k, v, matrix, phi, is_causal=True, scale=0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_compile_failure_warns_and_falls_back(monkeypatch):
    import numba

    def failing_njit(*args, **kwargs):
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(decode_merge, "_compiled", None)
    monkeypatch.setattr(decode_merge, "_broken", False)
    monkeypatch.setattr(numba, "njit", failing_njit)
    q, _, _, matrix = _inputs()
    with pytest.warns(RuntimeWarning, match="numba could not compile.*no LLVM here"):
        assert not decode_merge.merge_takes(q, matrix, get_feature_map("elu", 16), None)
