"""Exact prefix attention: m extra keys/values (a prefix, as in prefix tuning) that every query
sees. The ground truth NTK-Attention approximates, and the baseline its cost is compared to."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .masks import combined_mask
from .validation import check_mask, check_qkv

__all__ = ["prefix_attention"]


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(s q [P_K; K]^T) [P_V; V] where the m prefix columns are always visible.

    q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; prefix_k, prefix_v [Hkv, m, D] (shared by the batch)
    or [B, Hkv, m, D]. ``attn_mask`` and ``is_causal`` (bottom-right) apply to the real keys
    only. Cost O(Lq (m + Lk)) per head.
    """
    check_qkv(q, k, v)
    attn_mask = check_mask(attn_mask, q, k)
    batch, kv_heads, k_len = k.shape[:3]
    for name, t, want_dim in (("prefix_k", prefix_k, k.shape[-1]), ("prefix_v", prefix_v, v.shape[-1])):
        ok = t.dim() in (3, 4) and t.shape[-3] == kv_heads and t.shape[-1] == want_dim
        ok = ok and (t.dim() == 3 or t.shape[0] == batch)
        if not ok:
            raise ValueError(
                f"{name} must be [Hkv, m, D] or [B, Hkv, m, D] with Hkv={kv_heads} and "
                f"D={want_dim}, got {tuple(t.shape)}"
            )
    if prefix_k.shape[-2] != prefix_v.shape[-2]:
        raise ValueError(
            f"prefix_k and prefix_v have different lengths: {tuple(prefix_k.shape)} vs "
            f"{tuple(prefix_v.shape)}"
        )
    prefix_len = prefix_k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def with_prefix(prefix: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        prefix = prefix.to(real.dtype).expand(batch, *prefix.shape[-3:])
        return torch.cat([prefix, real], dim=2)

    keys, values = with_prefix(prefix_k, k), with_prefix(prefix_v, v)
    mask = combined_mask(attn_mask, is_causal, q.shape[2], k_len, q.device)
    if mask is not None:
        visible = 1.0 if mask.dtype == torch.bool else 0.0
        mask = F.pad(mask, (prefix_len, 0), value=visible)
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != kv_heads
    )
