"""Shared test helpers: an independent float64 reference for the ops and tolerances that mean
something.

The references materialise every score and write the formula out once, in the most obvious
way, so the fast paths in ``ntk_attention.ops`` can be checked against them (the tests all
import them from here instead of pasting their own copy):

    out_i = (sum_j e^{l_ij} v_j + e^{c} phi(q_i)^T Z) / (sum_j e^{l_ij} + e^{c} phi(q_i)^T kappa)

with l_ij = s q_i.k_j (+ an additive mask, -inf where a bool mask, or bottom-right causality,
hides key j), and c = ``state_log_scale``. Every term is divided by e^{m_i}, m_i the largest of
the row's log-terms, so float64 holds logits of any size; the division changes nothing
mathematically. A row whose denominator is 0 (no visible key, no state mass) is 0.

Only the feature maps are shared with the code under test: a named map is built with
``ops.get_feature_map`` and evaluated in float64 (the maps are checked against their closed
forms in ``tests/test_feature_maps.py``).

Accuracy helpers:
  :func:`assert_close`  element-wise ``|a - e| <= atol + rtol |e|``; on failure reports the
                        worst element, the max relative error and the norm-wise relative error.
  :func:`assert_low_precision_close`  the flash-attention rule: in bf16/fp16 the fast path's
                        max error against the float64 reference must be at most ``factor``
                        (2) times the error of a plain PyTorch implementation computed in the
                        same low precision, plus a small ``eps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "assert_close",
    "assert_low_precision_close",
    "max_error",
    "reference_ntk_attention",
    "reference_prefix_attention",
    "relative_error",
]

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _visible_keys(
    q_len: int,
    k_len: int,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """Bool [.., Lq, Lk]: True where query i may see key j (bool mask and causality only)."""
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if is_causal:
        # Bottom-right aligned: query i sees keys j <= i + (Lk - Lq).
        for i in range(q_len):
            visible[i, max(0, i + k_len - q_len + 1) :] = False
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    return visible


def _logits(
    q: torch.Tensor,
    keys: torch.Tensor,
    attn_mask: torch.Tensor | None,
    visible: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """s q k^T (+ additive mask), -inf where a key is not visible. [B, H, Lq, Lk]."""
    logits = scale * (q @ keys.transpose(-1, -2))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        logits = logits + attn_mask.to(logits.dtype)
    return logits.masked_fill(~visible, float("-inf"))


def _merge(
    logits: torch.Tensor,
    values: torch.Tensor,
    log_state: torch.Tensor | None = None,
    state_mass: torch.Tensor | None = None,
    state_numer: torch.Tensor | None = None,
) -> torch.Tensor:
    """(sum_j e^{l_j} v_j + e^{c} b) / (sum_j e^{l_j} + e^{c} a), every term scaled by e^{-m}.

    logits [B, H, Lq, Lk], values [B, H, Lk, Dv]; optional state: log_state c [B, H, Lq],
    state_mass a [B, H, Lq], state_numer b [B, H, Lq, Dv].
    """
    row_max = logits.amax(-1)  # -inf for a row that sees no key
    if log_state is not None:
        # |a| so that a state whose mass is negative (Taylor features on a free kappa) still
        # gets a finite shift; the formula itself is used as written.
        state_log_max = log_state + state_mass.abs().log()
        row_max = torch.maximum(row_max, state_log_max)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()

    weights = (logits - row_max.unsqueeze(-1)).exp()
    numerator = weights @ values
    denominator = weights.sum(-1)
    if log_state is not None:
        state_weight = (log_state - row_max).exp()
        numerator = numerator + state_weight.unsqueeze(-1) * state_numer
        denominator = denominator + state_weight * state_mass
    empty = denominator == 0
    safe = torch.where(empty, torch.ones_like(denominator), denominator)
    return (numerator / safe.unsqueeze(-1)).masked_fill(empty.unsqueeze(-1), 0.0)


def _per_query_head(t: torch.Tensor, groups: int, head_dim_index: int) -> torch.Tensor:
    """Repeat a per-KV-head tensor for the G query heads of each KV head (h -> h // G)."""
    return t.repeat_interleave(groups, dim=head_dim_index)


def _features(
    q: torch.Tensor,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor],
    kv_heads: int,
    r: int,
    scale: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """phi(q) with queries grouped per KV head, as the ops do, as (features [B, Hq, Lq, r],
    log offset [B, Hq, Lq]): phi(q) = features * e^offset."""
    batch, q_heads, q_len, head_dim = q.shape
    if isinstance(feature_map, str):
        from ntk_attention.ops import get_feature_map

        feature_map = get_feature_map(feature_map, head_dim, r=r, scale=scale).to(q.device)
    grouped = q.to(dtype).reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, head_dim)
    if hasattr(feature_map, "log_forward"):
        # phi = features * e^offset: exponential maps (favor, exp) underflow even in float64 at
        # |q| ~ 60, where a row that sees no key still has the well-defined phi^T Z / phi^T kappa.
        features, offset = feature_map.log_forward(grouped)
        offset = offset.to(dtype).reshape(batch, q_heads, q_len)
    else:
        features = feature_map(grouped)
        offset = torch.zeros(batch, q_heads, q_len, dtype=dtype, device=q.device)
    return features.to(dtype).reshape(batch, q_heads, q_len, -1), offset


def reference_ntk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    z: State,
    kappa: torch.Tensor,
    *,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor],
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    state_log_scale: torch.Tensor | float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """NTK-Attention computed in ``dtype`` (float64 by default) with every score materialised.

    Same arguments and shapes as :func:`ntk_attention.ops.ntk_attention`; differentiable, so
    gradients can be compared too. ``dtype=torch.bfloat16`` (or float16) gives the plain
    PyTorch low-precision baseline of :func:`assert_low_precision_close`. Returns ``dtype``.
    """
    _, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    qc = q.to(dtype)
    keys = _per_query_head(k.to(dtype), groups, 1)  # [B, Hq, Lk, D]
    values = _per_query_head(v.to(dtype), groups, 1)  # [B, Hq, Lk, Dv]
    visible = _visible_keys(q_len, k_len, attn_mask, is_causal, q.device)
    logits = _logits(qc, keys, attn_mask, visible, scale)

    dense_z = z[0].to(dtype) @ z[1].to(dtype) if isinstance(z, tuple) else z.to(dtype)
    r = kappa.shape[-1]
    features, log_state = _features(q, feature_map, kv_heads, r, scale, dtype)
    kappa_h = _per_query_head(kappa.to(dtype), groups, -2)  # [(B,) Hq, r]
    z_h = _per_query_head(dense_z, groups, -3)  # [(B,) Hq, r, Dv]
    if kappa_h.dim() == 2:
        kappa_h, z_h = kappa_h.unsqueeze(0), z_h.unsqueeze(0)
    mass = (features * kappa_h.unsqueeze(-2)).sum(-1)  # [B, Hq, Lq]
    numer = features @ z_h  # [B, Hq, Lq, Dv]

    if state_log_scale is not None:
        c = torch.as_tensor(state_log_scale, dtype=dtype, device=q.device)
        if c.dim() >= 1:  # [Hkv] or [B, Hkv] -> [.., Hq, 1]
            c = _per_query_head(c, groups, -1).unsqueeze(-1)
        log_state = log_state + c
    return _merge(logits, values, log_state, mass, numer)


def reference_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Softmax attention over [prefix; real keys] in ``dtype``; the m prefix keys are visible to
    every query, the mask and bottom-right causality apply to the real keys only.

    prefix_k, prefix_v: [Hkv, m, D] or [B, Hkv, m, D].
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    def per_head(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        if t.dim() == 3:
            t = t.unsqueeze(0).expand(batch, *t.shape)
        return _per_query_head(t, groups, 1)

    qc = q.to(dtype)
    real = _logits(
        qc, per_head(k), attn_mask, _visible_keys(q_len, k_len, attn_mask, is_causal, q.device),
        scale,
    )
    prefix = scale * (qc @ per_head(prefix_k).transpose(-1, -2))  # [B, Hq, Lq, m]
    logits = torch.cat([prefix, real], dim=-1)
    values = torch.cat([per_head(prefix_v), per_head(v)], dim=-2)
    return _merge(logits, values)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64 (inf if actual has a non-finite entry)."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(torch.finfo(torch.float64).tiny))


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    atol: float = 0.0,
    msg: str = "",
) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| element-wise, shapes equal, and
    no NaN/inf where ``expected`` is finite. The failure message gives the worst element, the
    max relative error and the norm-wise relative error."""
    prefix = f"{msg}: " if msg else ""
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{prefix}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        )
    a, e = actual.detach().double(), expected.detach().double()
    if (~torch.isfinite(a) & torch.isfinite(e)).any():
        bad = int((~torch.isfinite(a) & torch.isfinite(e)).sum())
        raise AssertionError(f"{prefix}{bad} non-finite values where the reference is finite")
    diff = (a - e).abs()
    allowed = atol + rtol * e.abs()
    if diff.numel() == 0 or bool((diff <= allowed).all()):
        return
    excess = diff - allowed
    worst = int(excess.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    rel = diff / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    raise AssertionError(
        f"{prefix}{int((diff > allowed).sum())}/{diff.numel()} elements exceed "
        f"atol={atol:.3g} + rtol={rtol:.3g}*|expected|; worst at {index}: "
        f"actual {a[index].item():.8g}, expected {e[index].item():.8g}; "
        f"max abs error {diff.max().item():.3g}, max rel error {rel.max().item():.3g}, "
        f"norm-wise rel error {relative_error(a, e):.3g}"
    )


def assert_low_precision_close(
    actual: torch.Tensor,
    baseline: torch.Tensor,
    reference: torch.Tensor,
    *,
    factor: float = 2.0,
    eps: float = 1e-5,
    msg: str = "",
) -> None:
    """Flash-attention accuracy rule for bf16/fp16.

    ``reference``: float64 result on the same (already rounded) inputs; ``baseline``: a plain
    implementation computed in the same low precision (e.g. ``reference_ntk_attention(...,
    dtype=torch.bfloat16)``). Asserts max|actual - reference| <= factor * max|baseline -
    reference| + eps, and that ``actual`` is finite.
    """
    prefix = f"{msg}: " if msg else ""
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{prefix}non-finite values in the low-precision result")
    fast_error = max_error(actual, reference)
    base_error = max_error(baseline, reference)
    if fast_error > factor * base_error + eps:
        raise AssertionError(
            f"{prefix}max error {fast_error:.3g} vs float64 is more than {factor} x the plain "
            f"low-precision error {base_error:.3g} + {eps:.1g} "
            f"(norm-wise rel error {relative_error(actual, reference):.3g})"
        )
