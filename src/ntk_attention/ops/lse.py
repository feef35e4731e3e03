"""NTK-Attention by the log-sum-exp merge (as ring attention merges blocks): exact attention over
the real keys with its log-sum-exp, then the state merged in closed form. No augmented copies of
q, k, v, no extra key, the head dim untouched.

    o, lse = attention(q, k, v)                  o = E / S,  lse = log S
    lse'   = logaddexp(lse, o_s + log mass)      o_s the state's log offset: a = e^{o_s} mass
    out    = e^{lse - lse'} o + e^{o_s - lse'} numer = (E + b) / (S + a)

Backward: the kernel's own backward, given the *merged* output and lse', is the gradient of the
merged attention for q, k, v (it forms P_ij = e^{l_ij - lse'} and D_i = dO_i . out_i, which
already count the state); the state terms get, with c = e^{o_s - lse'} = 1 / (S + a) e^{o_s},

    d numer = c dO,   d mass = -c (dO . out),   d o_s = c (dO . numer - (dO . out) mass).

Public SDPA returns no lse, so this path calls CPU SDPA's flash kernel and its backward
(``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu[_backward]``, private ops of
torch). Where they do not apply it hands the call to the fused path: another device, dropout
(SDPA's flash kernel has none), a value dim that differs from the head dim, or a torch without
the ops. ``naive.py`` is the twin both are tested against.
"""

from __future__ import annotations

import torch

from .decode_merge import MIN_SCALED_LOG_SUM, merge_into, merge_takes
from .feature_maps import FeatureMap
from .fused import fused_attention
from .masks import combined_mask
from .state import StateTerms, state_features

__all__ = ["lse_attention", "lse_inference", "lse_inference_takes", "lse_supported"]

# e^x above this overflows float32: the state's weight is clipped there, as in the naive path
# (only a state with zero mass but a non-zero numerator reaches it).
_MAX_EXPONENT = 80.0
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _kernels():
    """(forward, backward) of CPU SDPA's flash kernel, or None on a torch without them. The
    forward through its ``torch._...`` binding: a few microseconds less per call than the
    ``torch.ops`` overload, which counts at one call per layer and token."""
    try:
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
        forward = getattr(
            torch, "_scaled_dot_product_flash_attention_for_cpu",
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        )
    except (AttributeError, RuntimeError):
        return None
    return forward, backward


_KERNELS = _kernels()


def _kernel_groups_heads() -> bool:
    """Whether the kernel (forward and backward) takes fewer key/value heads than query heads
    (GQA) itself, as public SDPA's ``enable_gqa`` does: probed once on a tiny causal input
    against repeated keys, so a torch without it falls back to folding the query heads or
    repeating the keys."""
    if _KERNELS is None:
        return False
    forward, backward = _KERNELS
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, h, 2, 4, generator=generator) for h in (2, 1, 1, 2))
    k2, v2 = k.expand(1, 2, 2, 4).contiguous(), v.expand(1, 2, 2, 4).contiguous()
    try:
        out, lse = forward(q, k, v, 0.0, True, scale=0.5)
        grads = backward(grad, q, k, v, out, lse, 0.0, True, scale=0.5)
    except RuntimeError:
        return False
    out2, lse2 = forward(q, k2, v2, 0.0, True, scale=0.5)
    grads2 = backward(grad, q, k2, v2, out2, lse2, 0.0, True, scale=0.5)
    return bool(
        torch.allclose(out, out2) and torch.allclose(grads[0], grads2[0])
        and all(torch.allclose(g, g2.sum(1, keepdim=True)) for g, g2 in zip(grads[1:], grads2[1:], strict=True))
    )


_KERNEL_GROUPS_HEADS = _kernel_groups_heads()


def lse_inference_takes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, dropout_p: float
) -> bool:
    """Whether :func:`lse_inference` takes a maskless call (else it returns None): autograd
    off, what :func:`lse_supported` accepts, and any layout but a causal block of several
    queries against a longer key list."""
    return (
        not torch.is_grad_enabled()
        and lse_supported(q, v, dropout_p)
        and (not is_causal or q.shape[2] == 1 or q.shape[2] == k.shape[2])
    )


def lse_supported(q: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    """Whether :func:`lse_attention` runs the merge itself (else it runs the fused path)."""
    return (
        _KERNELS is not None
        and q.device.type == "cpu"
        and dropout_p == 0.0
        and q.dtype in _KERNEL_DTYPES
        and v.shape[-1] == q.shape[-1]
    )


def lse_attention(
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
    """out = (sum_j e^{l_j} v_j + b) / (sum_j e^{l_j} + a) through the kernel's lse (see the
    module docstring). Layouts, fastest first:

      * no mask, not causal or Lq = 1 (decoding);
      * causal with Lq = Lk and no mask: the kernel's causal flag (top-left = bottom-right);
      * otherwise an explicit additive [.., Lq, Lk] mask (bottom-right causality folded in).

    GQA: the kernel groups query heads over the un-repeated keys itself (forward and backward;
    probed at import). Without that, the first layout folds the query heads into the query
    length, [B, Hq, Lq, D] -> [B, Hkv, G * Lq, D], and the others repeat keys and values per
    query head (autograd sums their gradients).

    A row that sees no key gets b / a, or zeros when a = 0.
    """
    if not lse_supported(q, v, dropout_p):
        return fused_attention(
            q, k, v, terms, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
            dropout_p=dropout_p,
        )
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    kernel_causal = is_causal and attn_mask is None and q_len == k_len
    if is_causal and not kernel_causal and not (attn_mask is None and q_len == 1):
        attn_mask = combined_mask(attn_mask, True, q_len, k_len, q.device)

    mask, empty = None, None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            empty = ~attn_mask.any(-1)  # [.., Lq], rows that see no key
            mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
            mask.masked_fill_(~attn_mask, float("-inf"))
        else:
            empty = (attn_mask == float("-inf")).all(-1)
            mask = attn_mask.to(q.dtype)
        if mask.dim() < 4:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            empty = empty.reshape((1,) * (3 - empty.dim()) + tuple(empty.shape))

    mass = terms.mass.clamp_min(0)  # a negative phi^T kappa (taylor) counts as no mass
    log_offset, numer = terms.log_offset, terms.numer
    # GQA: the kernel groups the heads itself where it can (forward and backward); else the
    # query heads are folded into the query length, or the keys and values repeated.
    fold = groups > 1 and attn_mask is None and not kernel_causal and not _KERNEL_GROUPS_HEADS
    if fold:
        # [B, Hq, Lq, .] -> [B, Hkv, G * Lq, .]: query head h = kv head h // G, the same order.
        folded = (batch, kv_heads, groups * q_len)
        q = q.reshape(*folded, head_dim)
        log_offset, mass = log_offset.reshape(folded), mass.reshape(folded)
        numer = numer.reshape(*folded, numer.shape[-1])
    elif groups > 1 and not _KERNEL_GROUPS_HEADS:
        k = k[:, :, None].expand(batch, kv_heads, groups, k_len, head_dim).reshape(
            batch, q_heads, k_len, head_dim
        )
        v = v[:, :, None].expand(batch, kv_heads, groups, k_len, v.shape[-1]).reshape(
            batch, q_heads, k_len, v.shape[-1]
        )
    args = (q, k, v, log_offset, mass, numer, mask, empty, kernel_causal, scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:6]):
        out = _LseMerge.apply(*args)
    else:  # no autograd (decoding): skip the Function's bookkeeping
        out = _merge(*args)[0]
    return out.reshape(batch, q_heads, q_len, out.shape[-1]) if fold else out


def lse_inference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    matrix: torch.Tensor,
    feature_map: FeatureMap,
    *,
    is_causal: bool,
    scale: float,
    state_log_scale: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    fused_merge: bool = True,
) -> torch.Tensor | None:
    """The lse path without autograd and without a mask (decoding, ``generate``), in the fewest
    ops: at one query per step the op's host cost, not its FLOPs, is what decoding pays. With
    ``fused_merge`` (the default) a decoding step (Lq = 1) merges the state by one compiled
    call where :func:`~.decode_merge.merge_takes` holds (float32 CPU, the elu map); the torch
    ops below are its twin and run everywhere else (a prefill block too: from ~16 queries per
    head on, the bmm beats the compiled loop's product).

    The state comes as one matrix [Z | kappa] (:func:`~.state.state_matrix`, which the adapter
    keeps for a whole ``generate`` call), so one matmul gives b = phi^T Z and a = phi^T kappa,
    evaluated per KV head (see GQA below). The merge is done in direct space: with the kernel's o = E / S and lse = log S, and the
    state's terms a e^{o_s}, b e^{o_s},

        out = (E + e^{o_s} b) / (S + e^{o_s} a) = o + (b - a o) / (S e^{-o_s} + a),

    four tensor ops (against ten for the log-space merge), and exactly o for the zero state.
    It runs in place in the kernel's output, over chunks of query positions, so the state's
    temporaries stay a fraction of one [B, Hq, Lq, D] tensor: the peak memory of a long
    prefill is close to the kernel's own (L = 8192: 1.27x SDPA's, against 4.9x when the
    terms and the result were whole tensors).
    S e^{-o_s} = e^{lse - o_s} is floored at e^-60 (a row whose exact part is e^-60 of the
    state's: the result is b / a to float32 precision unless a is that small too); where it
    overflows to inf the state's share is below float precision and the result is o.

    GQA: the state terms are evaluated per KV head ([B * Hkv, G * Lq, D], one bmm) and viewed
    as [B, Hq, Lq, .]; the kernel takes the query heads as they are where it groups them itself
    (as public SDPA's ``enable_gqa``; probed at import), else the query heads are folded into
    the query length, or for a causal block (a prompt's prefill, Lq = Lk) the keys and values
    are repeated. Returns None for calls it does not take (a mask, autograd, a causal
    block with Lq != Lk > 1, what :func:`lse_supported` rejects): :func:`lse_attention`
    computes those. Tests compare it with the naive twin like every path."""
    if not lse_inference_takes(q, k, v, is_causal, dropout_p):
        return None
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = q_heads // kv_heads
    causal = is_causal and q_len > 1  # one query sees every key (bottom-right alignment)
    if fused_merge and q_len == 1 and merge_takes(q, matrix, feature_map, state_log_scale):
        exact, lse = _kernel_on_query_heads(q, k, v, causal, scale)
        return merge_into(exact, lse, q, matrix, feature_map, state_log_scale)
    # The kernel on q's own heads where it groups them itself (or where causality needs them
    # apart: then k, v are repeated); else on the folded [B, Hkv, G * Lq, D] layout, whose
    # memory is the same as [B, Hq, Lq, D] (query head h = kv head h // G).
    if groups > 1 and not (_KERNEL_GROUPS_HEADS or causal):
        grouped = q.reshape(batch, kv_heads, groups * q_len, head_dim)
        exact, lse = _KERNELS[0](grouped, k, v, 0.0, causal, scale=scale)
    else:
        exact, lse = _kernel_on_query_heads(q, k, v, causal, scale)
    exact = exact.reshape(batch, q_heads, q_len, exact.shape[-1])  # views of the kernel's output
    lse = lse.reshape(batch, q_heads, q_len)
    compute = matrix.dtype
    if exact.dtype != compute:  # merged in the state's precision, then cast back
        exact = exact.to(compute)
    log_scale = None
    if state_log_scale is not None:  # [(B,) Hkv] -> [(B,) Hq, 1, 1], or a 0-dim scalar
        log_scale = state_log_scale.to(compute)
        if log_scale.dim():
            log_scale = log_scale.repeat_interleave(groups, dim=-1)[..., None, None]
    # Query positions in chunks: the state's temporaries (features, [b | a]) stay ~1/8 of a
    # [B, Hq, Lq, D] tensor, and the merge writes into the kernel's output in place.
    chunk = max(1, _MERGE_CHUNK_ROWS // max(1, batch * q_heads))
    for first in range(0, q_len, chunk):
        last = min(q_len, first + chunk)
        _merge_in_place(
            exact[:, :, first:last], lse[:, :, first:last], q[:, :, first:last], matrix,
            feature_map, kv_heads, log_scale,
        )
    return exact if exact.dtype == q.dtype else exact.to(q.dtype)


# Query rows (over batch and heads) whose state terms lse_inference evaluates at once.
_MERGE_CHUNK_ROWS = 1 << 14


def _merge_in_place(exact, lse, q, matrix, feature_map, kv_heads, log_scale):
    """out = o + (b - a o) / (S e^{-o_s} + a) written into ``exact`` (o, [B, Hq, n, Dv], a
    view of the kernel's output in the compute dtype) for queries ``q`` [B, Hq, n, D] with the
    kernel's ``lse`` [B, Hq, n]; see :func:`lse_inference`. ``log_scale``: the state's log
    scale per query head [(B,) Hq, 1, 1], a 0-dim tensor or None."""
    batch, q_heads, rows, head_dim = q.shape
    groups = q_heads // kv_heads
    grouped = q.reshape(batch, kv_heads, groups * rows, head_dim)  # [B, Hkv, G * n, D]
    compute = matrix.dtype
    features, log_weight = state_features(grouped, feature_map, matrix.shape[-2], compute)
    if matrix.dim() == 3:  # one state for every row: [Hkv, r, Dv + 1]
        terms = features @ matrix
    else:  # a state per row: [B, Hkv, r, Dv + 1]
        terms = torch.matmul(features, matrix.reshape(batch, kv_heads, *matrix.shape[-2:]))
    del features
    terms = terms.reshape(batch, q_heads, rows, terms.shape[-1])
    numer, mass = terms[..., :-1], terms[..., -1:]  # b, a (they broadcast against o)
    scaled_sum = lse.unsqueeze(-1).to(compute)  # log S, then log(S e^{-o_s})
    if log_weight is not None:  # the feature map's offset
        scaled_sum -= log_weight.reshape(batch, q_heads, rows, 1).to(compute)
    if log_scale is not None:
        scaled_sum -= log_scale
    denominator = scaled_sum.clamp_min_(MIN_SCALED_LOG_SUM).exp_()  # S e^{-o_s}
    mass = mass.clamp_min(0)  # a negative phi^T kappa (taylor features) counts as no mass
    denominator += mass
    numer.addcmul_(mass, exact, value=-1)  # b - a o, in place
    exact.addcdiv_(numer, denominator)


def _kernel_on_query_heads(q, k, v, causal, scale):
    """The kernel's (o, lse) on q's own heads [B, Hq, Lq, .]: GQA keys as they are where the
    kernel groups heads itself, else repeated per query head."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _KERNEL_GROUPS_HEADS:
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return _KERNELS[0](q, k, v, 0.0, causal, scale=scale)


def _merge(q, k, v, log_offset, mass, numer, mask, empty, causal, scale, for_backward=False):
    """Forward of :class:`_LseMerge`: out, and with ``for_backward`` what its backward needs.
    Temporaries are updated in place (no autograd runs here)."""
    forward_kernel, _ = _KERNELS
    exact, lse = forward_kernel(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    compute = numer.dtype
    log_sum = lse if lse.dtype == compute else lse.to(compute)
    if empty is not None:  # rows that see no key: the kernel says lse = 0, the truth is -inf
        log_sum = log_sum.masked_fill(empty, float("-inf"))
    log_mass = mass.log().add_(log_offset)  # log a
    merged = torch.logaddexp(log_sum, log_mass)  # log(S + a)
    finite = None
    if empty is not None:  # merged = -inf where a row sees no key and a = 0
        finite = merged > float("-inf")
        merged = torch.where(finite, merged, 0.0)  # any finite shift: both weights are 0 there
    # Without a mask every row sees a key (lse finite), so merged is finite.
    exact_weight = (log_sum - merged).exp_()  # S / (S + a)
    state_weight = (log_offset - merged).clamp_max_(_MAX_EXPONENT).exp_()  # c = e^{o_s}/(S + a)
    if finite is not None:
        state_weight *= finite
    result = exact.to(compute, copy=True) if exact.dtype != compute else exact
    result.mul_(exact_weight.unsqueeze(-1)).addcmul_(state_weight.unsqueeze(-1), numer)
    out = result if result.dtype == q.dtype else result.to(q.dtype)
    if not for_backward:
        return out, None, None
    # The kernel's backward reads P_ij = e^{l_ij - lse'}: +inf where the row is empty.
    backward_lse = merged if finite is None else merged.masked_fill(~finite, float("inf"))
    return out, backward_lse.to(lse.dtype), state_weight


class _LseMerge(torch.autograd.Function):
    """The kernel's (o, lse), the state merged in; backward as in the module docstring.

    q [B, H, N, D], k, v [B, H, Lk, D] (heads already matched), log_offset and mass [B, H, N],
    numer [B, H, N, D] in the compute dtype, mask additive in q's dtype or None, ``empty``
    [.., N] bool rows that see no key (their kernel lse is not -inf) or None.

    Saved for backward beyond what SDPA's own backward keeps (q, k, v, out, lse, mask): two
    numbers per query (mass and the state's weight c), and numer [B, H, N, D] only when
    log_offset needs a gradient (a trainable state log scale; the feature maps' offsets are
    detached stabilisers). dO . out is formed from ``out`` in q's dtype, as the kernel's
    backward forms D_i, not from a float32 copy."""

    @staticmethod
    def forward(ctx, q, k, v, log_offset, mass, numer, mask, empty, causal, scale):
        out, backward_lse, state_weight = _merge(
            q, k, v, log_offset, mass, numer, mask, empty, causal, scale, for_backward=True
        )
        kept_numer = numer if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(q, k, v, out, backward_lse, mask, kept_numer, mass, state_weight)
        ctx.options = (causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, backward_lse, mask, numer, mass, state_weight = ctx.saved_tensors
        causal, scale = ctx.options
        _, backward_kernel = _KERNELS
        grad_q = grad_k = grad_v = grad_offset = grad_mass = grad_numer = None
        if any(ctx.needs_input_grad[:3]):
            grad_q, grad_k, grad_v = backward_kernel(
                grad.to(q.dtype), q, k, v, out, backward_lse, 0.0, causal,
                attn_mask=mask, scale=scale,
            )
        grad = grad.to(state_weight.dtype)
        grad_dot_out = torch.linalg.vecdot(grad, out.to(grad.dtype))  # dO . out, [B, H, N]
        if ctx.needs_input_grad[3]:
            grad_offset = state_weight * (torch.linalg.vecdot(grad, numer) - grad_dot_out * mass)
        if ctx.needs_input_grad[4]:
            grad_mass = -grad_dot_out * state_weight
        if ctx.needs_input_grad[5]:
            grad_numer = grad * state_weight.unsqueeze(-1)
        return grad_q, grad_k, grad_v, grad_offset, grad_mass, grad_numer, None, None, None, None
