"""Attention masks: bottom-right causal masks and their combination with user masks.

Causal alignment is bottom-right, as in flash-attention, so a decoding step (Lq = 1) sees every
key and equals the last row of the full call. ``1`` = attend, ``0`` = masked::

    Lq = 2, Lk = 5            Lq = 5, Lk = 2 (queries 0-2 see no key)
    1 1 1 1 0                 0 0
    1 1 1 1 1                 0 0
                              0 0
                              1 0
                              1 1
"""

from __future__ import annotations

import torch

__all__ = ["causal_mask", "combined_mask"]


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[Lq, Lk] bool, True where key j <= Lk - Lq + i (bottom-right aligned)."""
    rows = torch.arange(q_len, device=device).unsqueeze(-1)
    cols = torch.arange(k_len, device=device)
    return cols <= rows + (k_len - q_len)


def combined_mask(
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    q_len: int,
    k_len: int,
    device: torch.device,
) -> torch.Tensor | None:
    """The user's mask (bool or additive float) AND the causal mask, or None if neither."""
    if not is_causal:
        return attn_mask
    causal = causal_mask(q_len, k_len, device)
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))
