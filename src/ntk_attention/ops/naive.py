"""Naive NTK-Attention: the math written out, scores materialised. Slow and obvious; the fused
path in ``fused.py`` is trusted because tests compare it with this one."""

from __future__ import annotations

import torch

from .masks import combined_mask
from .state import StateTerms

__all__ = ["naive_attention"]

# e^x for x above this overflows float32; the state's weight is clipped there (a state whose
# mass is 0 but whose numerator is not is the only case that reaches it).
_MAX_EXPONENT = 80.0


def naive_attention(
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
    """out = (sum_j e^{l_j} v_j + b) / (sum_j e^{l_j} + a), l_j = s q.k_j (+ additive mask).

    Written as the base attention o = softmax(l) v (computed as transformers' eager attention
    computes it) merged with the state, every term scaled by e^{-c}, c = max(lse, log a) with
    lse = log sum_j e^{l_j}, so nothing overflows for logits up to 1e4:

        out = (o e^{lse - c} + e^{o - c} numer) / (e^{lse - c} + e^{o - c} mass)

    (a = e^{o} mass and b = e^{o} numer from :class:`StateTerms`). For a zero state c = lse, so
    out = (o * 1 + 0) / (1 + 0) = o bit for bit: the adapted eager model equals the base model
    exactly at init. Masked keys have l_j = -inf. A row whose keys are all masked gets
    numer / mass, and zeros when mass = 0 too. Computed in float32 (float64 for float64
    inputs). Dropout drops normalised weights, the state counting as one key, as in the fused
    path.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    _, q_heads, q_len, _ = q.shape
    kv_heads = k.shape[1]
    groups = q_heads // kv_heads
    keys = k.to(dtype).repeat_interleave(groups, dim=1)  # [B, Hq, Lk, D]
    values = v.to(dtype).repeat_interleave(groups, dim=1)  # [B, Hq, Lk, Dv]

    logits = scale * (q.to(dtype) @ keys.transpose(-1, -2))  # [B, Hq, Lq, Lk]
    mask = combined_mask(attn_mask, is_causal, q_len, k.shape[2], q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(dtype)

    empty = logits.amax(-1) == float("-inf")  # [B, Hq, Lq]: rows that see no key
    logits = logits.masked_fill(empty.unsqueeze(-1), 0.0)  # finite; their weight is set to 0
    probs = torch.softmax(logits, dim=-1)
    lse = torch.logsumexp(logits, dim=-1).masked_fill(empty, float("-inf"))
    mass = terms.mass.clamp_min(0)  # a negative phi^T kappa (taylor) counts as no mass
    log_mass = terms.log_offset + mass.log()  # -inf where mass = 0
    # The shift only keeps exp() in range; the result does not depend on it, so no gradient.
    shift = torch.maximum(lse, log_mass).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    exact_weight = (lse - shift).exp()  # S e^{-c}: 1 for a zero state, 0 for an empty row
    state_weight = (terms.log_offset - shift).clamp_max(_MAX_EXPONENT).exp()
    denominator = exact_weight + state_weight * mass
    if dropout_p > 0.0:  # dropout of the normalised weights, the state counting as one key
        probs = torch.nn.functional.dropout(probs, dropout_p)
        state_weight = torch.nn.functional.dropout(state_weight, dropout_p)
    numerator = (probs @ values) * exact_weight.unsqueeze(-1) + state_weight.unsqueeze(-1) * terms.numer
    empty = denominator <= 0
    out = numerator / torch.where(empty, torch.ones_like(denominator), denominator).unsqueeze(-1)
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out.to(q.dtype)
