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
    mask tensor). Other layouts pass an explicit [Lq, Lk + 1] mask. On CUDA the head dims
    are padded to a multiple of 8 so the flash kernels apply.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    dtype = q.dtype

    mass = terms.mass.clamp_min(0) + MASS_FLOOR  # [B, Hq, Lq]
    log_mass = terms.log_offset + mass.log()
    state_value = terms.numer / mass.unsqueeze(-1)  # u, [B, Hq, Lq, Dv]

    multiple = 8 if q.is_cuda else 1
    if multiple == 1:
        qk_dim, v_dim = head_dim + 1, value_dim + 1
    else:
        qk_dim = v_dim = _round_up(max(head_dim, value_dim) + 1, multiple)

    q_aug = F.pad(q, (0, qk_dim - head_dim))
    q_aug[..., head_dim] = (log_mass / scale).to(dtype)
    k_aug = F.pad(k, (0, qk_dim - head_dim, 1, 0))  # extra key at position 0
    k_aug[:, :, 0, head_dim] = 1.0
    v_aug = F.pad(v, (0, v_dim - value_dim, 1, 0))
    v_aug[:, :, 0, value_dim] = 1.0

    mask = combined_mask(attn_mask, is_causal, q_len, k_len, q.device)
    dummy_query = is_causal and attn_mask is None and q_len == k_len
    if dummy_query:
        q_aug = F.pad(q_aug, (0, 0, 1, 0))
        mask = None
    elif is_causal and attn_mask is None and q_len == 1:
        mask = None  # bottom-right causal with one query sees every key
    if mask is not None:
        visible = 1.0 if mask.dtype == torch.bool else 0.0
        mask = F.pad(mask, (1, 0), value=visible)
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)

    out_aug = F.scaled_dot_product_attention(
        q_aug,
        k_aug,
        v_aug,
        attn_mask=mask,
        is_causal=dummy_query,
        scale=scale,
        dropout_p=dropout_p,
        enable_gqa=q_heads != kv_heads,
    )
    if dummy_query:
        out_aug = out_aug[:, :, 1:]
    exact = out_aug[..., :value_dim]
    state_weight = out_aug[..., value_dim : value_dim + 1]
    out = exact.to(state_value.dtype) + state_weight.to(state_value.dtype) * state_value

    if mask is not None:
        # A row that sees no key returns u; with no state mass either, it returns zeros.
        key_mask = mask[..., 1:]
        sees_key = key_mask.any(-1) if key_mask.dtype == torch.bool else (
            key_mask > float("-inf")
        ).any(-1)
        empty = ~sees_key & (terms.mass <= 0)
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out.to(dtype)
