"""Fused NTK-Attention: one ``scaled_dot_product_attention`` call on augmented inputs.

No Lq x Lk tensor is built here (SDPA's fused kernels run the softmax blockwise); the state
costs one extra key and one extra head-dim coordinate. See ``ops/README.md`` for the
derivation and ``naive.py`` for the twin it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import combined_mask
from .state import MASS_FLOOR, StateTerms

__all__ = ["fused_attention"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: StateTerms,
    *,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """NTK-Attention by augmenting SDPA with one key that carries the state's mass.

    With a = phi(q)^T kappa (floored at 1e-12 so its log is finite) and u = phi(q)^T Z / a:

        q' = [q, log(a) / s]    k' = [[0..0, 1], [k, 0]]    v' = [[0..0, 1], [v, 0]]

    The extra key's logit is s * q'.e = log a, so SDPA returns
        o = sum_j e^{l_j} v_j / (sum_j e^{l_j} + a)   and   w = a / (sum_j e^{l_j} + a)
    in the first Dv columns and column Dv, and out = o + w * u. SDPA's own max subtraction
    includes log a, which makes the merge stable for any logit range.

    The extra key sits first, so it is visible under every causal layout. When Lq = Lk and
    no mask is given, a dummy query is put first too: then plain ``is_causal=True`` on
    length L + 1 is exactly bottom-right causal for the real queries (the fast kernel, no
    mask tensor). Other layouts pass an explicit [Lq, Lk + 1] mask. Head dims are padded
    with zeros to a multiple of 8, where SDPA's kernels are fastest (and CUDA's flash kernels
    apply).
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    dtype = q.dtype

    mass = terms.mass.clamp_min(0) + MASS_FLOOR  # [B, Hq, Lq]
    log_mass = terms.log_offset + mass.log()
    state_value = terms.numer / mass.unsqueeze(-1)  # u, [B, Hq, Lq, Dv]

    # Head dims padded to a multiple of 8: CUDA's flash kernels need it, and the CPU kernel
    # measured as fast at 72 as at 64 but ~7% slower at 65 (benchmarks/attention_speed.py).
    if q.is_cuda:
        qk_dim = v_dim = _round_up(max(head_dim, value_dim) + 1, 8)
    else:
        qk_dim, v_dim = _round_up(head_dim + 1, 8), _round_up(value_dim + 1, 8)

    mask = combined_mask(attn_mask, is_causal, q_len, k_len, q.device)
    dummy_query = is_causal and attn_mask is None and q_len == k_len
    if dummy_query or (is_causal and attn_mask is None and q_len == 1):
        mask = None  # bottom-right causal with one query sees every key
    if mask is not None:
        visible = 1.0 if mask.dtype == torch.bool else 0.0
        mask = F.pad(mask, (1, 0), value=visible)
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)

    q_aug = _AugmentQueries.apply(q, (log_mass / scale).to(dtype), qk_dim, int(dummy_query))
    out_aug = F.scaled_dot_product_attention(
        q_aug,
        _AugmentKeys.apply(k, qk_dim),
        _AugmentKeys.apply(v, v_dim),
        attn_mask=mask,
        is_causal=dummy_query,
        scale=scale,
        dropout_p=dropout_p,
        enable_gqa=q_heads != kv_heads,
    )
    out = _MergeState.apply(out_aug, state_value, int(dummy_query), value_dim)

    if mask is not None:
        # A row that sees no key returns u; with no state mass either, it returns zeros.
        key_mask = mask[..., 1:]
        sees_key = key_mask.any(-1) if key_mask.dtype == torch.bool else (
            key_mask > float("-inf")
        ).any(-1)
        empty = ~sees_key & (terms.mass <= 0)
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out.to(dtype)


class _AugmentQueries(torch.autograd.Function):
    """[q, column, 0...] of width ``width``, with ``dummy_row`` zero rows in front; one
    allocation forward, views backward (F.pad + cat would allocate and zero-fill several
    full-size tensors, which dominates the op's overhead on CPU)."""

    @staticmethod
    def forward(ctx, q, column, width, dummy_row):
        batch, heads, length, head_dim = q.shape
        out = q.new_empty(batch, heads, length + dummy_row, width)
        body = out[:, :, dummy_row:]
        body[..., :head_dim].copy_(q)
        body[..., head_dim].copy_(column)
        body[..., head_dim + 1 :].zero_()
        out[:, :, :dummy_row].zero_()
        ctx.dims = (head_dim, dummy_row)
        return out

    @staticmethod
    def backward(ctx, grad):
        head_dim, dummy_row = ctx.dims
        body = grad[:, :, dummy_row:]
        return body[..., :head_dim], body[..., head_dim], None, None


class _AugmentKeys(torch.autograd.Function):
    """[[0..0, 1, 0..], [x, 0, 0..]]: one extra row e_D in front, zero columns after D."""

    @staticmethod
    def forward(ctx, x, width):
        batch, heads, length, head_dim = x.shape
        out = x.new_empty(batch, heads, length + 1, width)
        out[:, :, 1:, :head_dim].copy_(x)
        out[:, :, 1:, head_dim:].zero_()
        out[:, :, 0].zero_()
        out[:, :, 0, head_dim] = 1.0
        ctx.head_dim = head_dim
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad[:, :, 1:, : ctx.head_dim], None


class _MergeState(torch.autograd.Function):
    """out = o + w * u from SDPA's augmented output (o: first Dv columns, w: column Dv),
    dropping ``dummy_row`` leading rows; the backward writes one gradient tensor in place of
    the zero-filled slices autograd would build."""

    @staticmethod
    def forward(ctx, out_aug, state_value, dummy_row, value_dim):
        body = out_aug[:, :, dummy_row:]
        exact = body[..., :value_dim].to(state_value.dtype)
        weight = body[..., value_dim : value_dim + 1].to(state_value.dtype)
        ctx.save_for_backward(weight, state_value)
        ctx.layout = (out_aug.shape, out_aug.dtype, dummy_row, value_dim)
        return torch.addcmul(exact, weight, state_value)

    @staticmethod
    def backward(ctx, grad):
        weight, state_value = ctx.saved_tensors
        shape, dtype, dummy_row, value_dim = ctx.layout
        grad_aug = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_aug = grad.new_empty(shape, dtype=dtype)
            grad_aug[:, :, :dummy_row].zero_()
            body = grad_aug[:, :, dummy_row:]
            body[..., :value_dim].copy_(grad)
            body[..., value_dim].copy_(torch.linalg.vecdot(grad, state_value))
            body[..., value_dim + 1 :].zero_()
        if ctx.needs_input_grad[1]:
            grad_value = grad * weight
        return grad_aug, grad_value, None, None
