"""The public NTK-Attention op: validates its inputs, evaluates the state's query-side terms,
and runs one of its paths: "lse" (the kernel's log-sum-exp merge, CPU), "fused" (one public
SDPA call on augmented inputs, any device) or their naive twin."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .feature_maps import FeatureMap
from .fused import fused_attention
from .lse import lse_attention, lse_inference, lse_inference_takes
from .naive import naive_attention
from .sink import check_sink_tokens, state_readers
from .state import State, state_matrix, state_terms
from .validation import check_mask, check_qkv, check_state, resolve_feature_map

__all__ = [
    "IMPLEMENTATIONS",
    "ntk_attention",
    "ntk_attention_fused",
    "ntk_attention_lse",
    "ntk_attention_naive",
    "ntk_attention_unchecked",
]

# "lse" hands the calls its kernel cannot take (GPU, dropout, Dv != D) to "fused" itself.
IMPLEMENTATIONS = {"lse": lse_attention, "fused": fused_attention, "naive": naive_attention}


def ntk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    z: State,
    kappa: torch.Tensor,
    *,
    feature_map: str | FeatureMap | Callable[[torch.Tensor], torch.Tensor],
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    state_log_scale: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    implementation: str = "auto",
    sink_tokens: int = 0,
) -> torch.Tensor:
    """Attention over the real keys plus a constant-size state standing for a prefix.

        out_i = (sum_j e^{s q_i.k_j} v_j + phi(q_i)^T Z) / (sum_j e^{s q_i.k_j} + phi(q_i)^T kappa)

    Shapes: q [B, Hq, Lq, D]; k [B, Hkv, Lk, D]; v [B, Hkv, Lk, Dv] with Hq a multiple of Hkv
    (GQA: one state per KV head, query head h uses KV head h // (Hq / Hkv)).
    z [Hkv, r, Dv] or a low-rank pair (z_a [Hkv, r, s], z_b [Hkv, s, Dv]); kappa [Hkv, r],
    non-negative (see :func:`nonnegative`). A leading batch dim ([B, Hkv, ...]) gives each row
    its own state. ``state_log_scale`` ([Hkv] or [B, Hkv]) multiplies the state by
    e^{state_log_scale}, for states whose raw values would overflow.

    ``feature_map``: "elu", "favor", "taylor", a FeatureMap, or a callable [..., D] -> [..., r].
    ``attn_mask``: bool (True = attend) or additive float, broadcastable to [B, Hq, Lq, Lk].
    ``is_causal``: bottom-right aligned (query i sees keys j <= Lk - Lq + i). The state is
    visible to every query. ``scale`` defaults to 1/sqrt(D). z = 0, kappa = 0 is plain
    attention. A row with every key masked returns phi^T Z / phi^T kappa, or zeros when
    phi^T kappa = 0. ``implementation``: "auto" (= "lse"), "lse", "fused" or "naive".
    ``sink_tokens``: queries at the first that many positions of the sequence (counted in the
    keys they see, so left padding and decoding steps count right: see ``sink.py``) read only
    the real keys and send no gradient to the state, which protects a causal model's
    attention sink.
    """
    check_qkv(q, k, v)
    attn_mask = check_mask(attn_mask, q, k)
    r = check_state(z, kappa, q, v)
    if implementation == "auto":
        implementation = "lse"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be 'auto' or one of {sorted(IMPLEMENTATIONS)}, "
            f"got {implementation!r}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    phi = resolve_feature_map(feature_map, q.shape[-1], r, scale, q.device)
    return ntk_attention_unchecked(
        q, k, v, z, kappa, feature_map=phi, attn_mask=attn_mask, is_causal=is_causal,
        scale=scale, state_log_scale=state_log_scale, dropout_p=dropout_p,
        implementation=implementation, sink_tokens=check_sink_tokens(sink_tokens),
    )


def ntk_attention_unchecked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    z: State,
    kappa: torch.Tensor,
    *,
    feature_map: FeatureMap,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    state_log_scale: torch.Tensor | None,
    dropout_p: float,
    implementation: str,
    matrix: torch.Tensor | None = None,
    sink_tokens: int = 0,
) -> torch.Tensor:
    """:func:`ntk_attention` after its input checks, which it runs; for callers whose inputs
    are right by construction (the adapter: q, k, v come from the model and the state was
    built for the layer's geometry at injection), where the checks' host cost counts (one call
    per layer and token when decoding). ``feature_map`` is a FeatureMap, ``scale`` a float and
    ``implementation`` one of IMPLEMENTATIONS. ``matrix``: the state's [Z | kappa]
    (``state_matrix(z, kappa)``) for the no-grad lse path, from a caller that keeps it across
    calls (the adapter, for a ``generate`` call); built here when needed and not given.
    ``sink_tokens`` an int >= 0."""
    readers = None
    if sink_tokens:
        if attn_mask is None and k.shape[2] <= sink_tokens and _state_trains(z, kappa):
            raise ValueError(
                f"sink_tokens={sink_tokens} exempts every query of a call with {k.shape[2]} "
                "keys, so the state would get no gradient: train on longer sequences or "
                "lower sink_tokens"
            )
        # Causality needs no folding in: a position counts the keys up to the query's own.
        readers = state_readers(attn_mask, q.shape[2], k.shape[2], sink_tokens, q.device)
    if (
        readers is None and implementation == "lse" and attn_mask is None
        and lse_inference_takes(q, k, v, is_causal, dropout_p)
    ):
        return lse_inference(
            q, k, v, state_matrix(z, kappa) if matrix is None else matrix, feature_map,
            is_causal=is_causal, scale=scale, state_log_scale=state_log_scale,
            dropout_p=dropout_p,
        )
    terms = state_terms(q, z, kappa, feature_map, state_log_scale, readers)
    return IMPLEMENTATIONS[implementation](
        q, k, v, terms, attn_mask=attn_mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p
    )


def _state_trains(z: State, kappa: torch.Tensor) -> bool:
    """Whether this call would send the state a gradient."""
    parts = z if isinstance(z, tuple) else (z,)
    return torch.is_grad_enabled() and any(t.requires_grad for t in (*parts, kappa))


def ntk_attention_fused(*args, **kwargs) -> torch.Tensor:
    """:func:`ntk_attention` forced onto the fused (SDPA) path."""
    return ntk_attention(*args, **kwargs, implementation="fused")


def ntk_attention_lse(*args, **kwargs) -> torch.Tensor:
    """:func:`ntk_attention` on the log-sum-exp merge path (the fused path where it cannot run)."""
    return ntk_attention(*args, **kwargs, implementation="lse")


def ntk_attention_naive(*args, **kwargs) -> torch.Tensor:
    """:func:`ntk_attention` forced onto the naive path (materialises the scores)."""
    return ntk_attention(*args, **kwargs, implementation="naive")
