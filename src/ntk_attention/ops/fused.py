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

    With a = e^{o} mass (o the state's log offset) and b = e^{o} numer from ``terms``, pick a
    stabiliser lambda = max(o + log(mass + 1e-20), the logit of one key the query sees) (any
    finite value would do; this one keeps w and t from underflowing together) and run

        q' = [q, lambda / s]      k' = [[0..0, 1], [k, 0]]      v' = [[0..0, 1, 0], [v, 0, 1]]

    The extra key's logit is s q'.k'_0 = lambda, so SDPA returns, with S = sum_j e^{l_j}
    and E = sum_j e^{l_j} v_j,
        o = E / (S + e^lambda),   w = e^lambda / (S + e^lambda),   t = S / (S + e^lambda)
    in columns [:Dv], Dv and Dv + 1. With c = w e^{-lambda} = 1 / (S + e^lambda):

        out = (o + c b) / (t + c a) = (E + b) / (S + a)

    exactly, whatever lambda is: the mass the extra key takes is given back by t, which SDPA
    computes directly (no 1 - w cancellation). So lambda carries no gradient, a zero state
    takes no mass even when every logit is tiny, and Z still gets its gradient at kappa = 0
    through c (w >= e^{l_ref - lse} cannot underflow unless the reference key's weight
    does, in fp16 too). SDPA's
    own max subtraction includes lambda, so any logit range is stable. A row that sees no
    key gets b / a, or zeros when a = 0. With dropout, t would count dropped keys, so the
    state is merged as one more key instead, whose logit is its exact log mass lambda =
    o + log(a) with the gradient kept: out = o + c b / a (dropout semantics of SDPA).

    The extra key sits first, so it is visible under every causal layout. When Lq = Lk and
    no mask is given, a dummy query is put first too: then plain ``is_causal=True`` on
    length L + 1 is exactly bottom-right causal for the real queries (the fast kernel, no
    mask tensor). Other layouts pass an explicit [Lq, Lk + 1] mask. Head dims are padded
    with zeros to a multiple of 8, where SDPA's kernels are fastest (and CUDA's flash kernels
    apply).
    """
    _, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    dtype = q.dtype

    dummy_query = is_causal and attn_mask is None and q_len == k_len
    sees_every_key = is_causal and attn_mask is None and q_len == 1
    mask = None
    if not (dummy_query or sees_every_key):
        mask = combined_mask(attn_mask, is_causal, q_len, k_len, q.device)

    mass = terms.mass.clamp_min(0)  # [B, Hq, Lq]; a negative phi^T kappa counts as none
    if dropout_p > 0.0:
        # The state is one more key, dropped like the others: its logit must be its exact log
        # mass, with the gradient to kappa (and the offset) flowing through SDPA's query grad.
        stabiliser = terms.log_offset + (mass + MASS_FLOOR).log()
    else:
        stabiliser = torch.maximum(
            terms.log_offset.detach() + (mass + MASS_FLOOR).detach().log(),
            _visible_key_logit(q, k, mask, is_causal, scale).to(mass.dtype),
        )  # lambda, [B, Hq, Lq]
    # SDPA sees lambda / s rounded to the input dtype; the merge must undo that same value
    # (in bf16 the rounding is up to half a unit at |lambda / s| ~ 200: a factor e^{s/2}).
    query_column = (stabiliser / scale).to(dtype)
    stabiliser = query_column.to(stabiliser.dtype) * scale

    # Head dims padded to a multiple of 8: CUDA's flash kernels need it, and the CPU kernel
    # measured as fast at 72 as at 64 but ~7% slower at 65 (benchmarks/attention_speed.py).
    renormalise = dropout_p == 0.0  # with dropout the values need no column for t
    if q.is_cuda:
        qk_dim = v_dim = _round_up(max(head_dim, value_dim) + 2, 8)
    else:
        qk_dim, v_dim = _round_up(head_dim + 1, 8), _round_up(value_dim + 1 + renormalise, 8)
    if mask is not None:
        visible = 1.0 if mask.dtype == torch.bool else 0.0
        mask = F.pad(mask, (1, 0), value=visible)
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)

    # CUDA gives fp32 the memory-efficient kernel, which takes no enable_gqa: SDPA would fall
    # back to its math kernel and build [Lq, Lk] scores, so the KV heads are repeated instead.
    groups = q_heads // kv_heads
    repeat = groups if q.is_cuda and dtype == torch.float32 else 1
    q_aug = _AugmentQueries.apply(q, query_column, qk_dim, int(dummy_query))
    out_aug = F.scaled_dot_product_attention(
        q_aug,
        _AugmentKeys.apply(k, qk_dim, False, repeat),
        _AugmentKeys.apply(v, v_dim, renormalise, repeat),
        attn_mask=mask,
        is_causal=dummy_query,
        scale=scale,
        dropout_p=dropout_p,
        enable_gqa=groups != repeat,
    )
    # e^{o - lambda}, differentiable in the offset o (a trained state_log_scale): c' =
    # w e^{o - lambda} multiplies numer and mass directly. With dropout it is 1 / (mass +
    # floor), so c' numer = w b / a: the extra key's weight times its value.
    inverse = (terms.log_offset - stabiliser).exp()
    out = _MergeState.apply(
        out_aug, terms.numer, mass, inverse, int(dummy_query), value_dim, renormalise
    )
    return out.to(dtype)


def _visible_key_logit(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """s q_i.k_j (+ mask_ij) for one key j that query i sees, [B, Hq, Lq]; -inf for none.

    A lower bound of the row's log-sum-exp that costs O(Lq D): the bottom-right diagonal
    key without a mask, the key the mask favours most otherwise. Masks that differ per
    query head give -inf (the stabiliser then rests on the state alone). No gradient.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, kv_heads, q_heads // kv_heads, q_len, head_dim)
    if mask is None and k_len >= q_len:  # the diagonal keys are a slice: no gather
        with torch.no_grad():
            keys = k[:, :, k_len - q_len :].unsqueeze(2)  # [B, Hkv, 1, Lq, D]
            logit = torch.linalg.vecdot(grouped, keys).float() * scale
            return logit.reshape(batch, q_heads, q_len)
    if mask is None:
        diagonal = torch.arange(q_len, device=q.device) + (k_len - q_len)
        index = diagonal.clamp(0, k_len - 1).expand(batch, q_len)
        bonus = torch.zeros(batch, q_len, device=q.device)
        sees_none = (diagonal < 0).expand(batch, q_len) & is_causal
    else:
        mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if mask4.shape[1] != 1:
            return torch.full((batch, q_heads, q_len), float("-inf"), device=q.device)
        rows = mask4[:, :1]  # [b, 1, Lq or 1, Lk], a view, reduced before any broadcasting
        if rows.dtype == torch.bool:
            best, index = rows.max(-1)  # first True, or 0 when there is none
            sees_none, bonus = ~best, torch.zeros(best.shape, device=q.device)
        else:
            bonus, index = rows.max(-1)
            sees_none = bonus == float("-inf")
            bonus = bonus.float().masked_fill(sees_none, 0.0)
        index, bonus = index[:, 0].expand(batch, q_len), bonus[:, 0].expand(batch, q_len)
        sees_none = sees_none[:, 0].expand(batch, q_len)
    with torch.no_grad():
        gather = index[:, None, :, None].expand(batch, kv_heads, q_len, head_dim)
        keys = k.gather(2, gather).unsqueeze(2)  # [B, Hkv, 1, Lq, D]
        logit = torch.linalg.vecdot(grouped, keys).float() * scale
        logit = logit.reshape(batch, q_heads, q_len) + bonus[:, None]
        return logit.masked_fill(sees_none[:, None], float("-inf"))


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
    """Keys [[0..0, 1, 0..], [k, 0, 0..]] or, with ``ones_column``, values
    [[0..0, 1, 0, 0..], [v, 0, 1, 0..]]: one extra row in front, zero padding after D; with
    ``groups`` > 1 each KV head repeated for its query heads (GQA without enable_gqa)."""

    @staticmethod
    def forward(ctx, x, width, ones_column, groups=1):
        batch, heads, length, head_dim = x.shape
        out = x.new_empty(batch, heads * groups, length + 1, width)
        grouped = out.view(batch, heads, groups, length + 1, width)
        grouped[:, :, :, 1:, :head_dim].copy_(x.unsqueeze(2))  # KV head h -> heads h*G..h*G+G-1
        out[:, :, 1:, head_dim:].zero_()
        out[:, :, 0].zero_()
        out[:, :, 0, head_dim] = 1.0
        if ones_column:
            out[:, :, 1:, head_dim + 1] = 1.0
        ctx.dims = (head_dim, groups)
        return out

    @staticmethod
    def backward(ctx, grad):
        head_dim, groups = ctx.dims
        batch, heads, length, width = grad.shape
        if groups == 1:  # a view: summing over a group of one would copy the gradient
            return grad[:, :, 1:, :head_dim], None, None, None
        grouped = grad.view(batch, heads // groups, groups, length, width)
        return grouped[:, :, :, 1:, :head_dim].sum(2), None, None, None


class _MergeState(torch.autograd.Function):
    """out = (o + c' numer) / (t + c' mass), c' = w * inverse, from SDPA's augmented output
    (o: columns [:Dv], w: column Dv, t: column Dv + 1), dropping ``dummy_row`` leading rows.
    ``inverse`` = e^{offset - lambda} (lambda carries no gradient, the offset may). Rows with
    a zero denominator (no visible key, no state mass) are 0. Without ``renormalise``
    (dropout) the denominator is 1 and column Dv + 1 is not read: out = o + c' numer. The
    backward writes one gradient tensor for the augmented output instead of the zero-filled
    slices autograd would build."""

    @staticmethod
    def forward(ctx, out_aug, numer, mass, inverse, dummy_row, value_dim, renormalise):
        compute = numer.dtype
        body = out_aug[:, :, dummy_row:]
        exact = body[..., :value_dim].to(compute)
        raw_weight = body[..., value_dim].to(compute)  # w, [B, H, L]
        weight = raw_weight * inverse  # c'
        numerator = torch.addcmul(exact, weight.unsqueeze(-1), numer)
        ctx.layout = (out_aug.shape, out_aug.dtype, dummy_row, value_dim, renormalise)
        if not renormalise:  # dropout: the state is one more key, out = o + c' numer
            ctx.save_for_backward(numer, inverse, raw_weight, weight)
            return numerator
        denominator = torch.addcmul(body[..., value_dim + 1].to(compute), weight, mass)
        nonempty = denominator > 0
        reciprocal = torch.where(nonempty, denominator, 1.0).reciprocal() * nonempty
        out = numerator * reciprocal.unsqueeze(-1)
        ctx.save_for_backward(out, numer, mass, inverse, raw_weight, weight, reciprocal)
        return out

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, dummy_row, value_dim, renormalise = ctx.layout
        grad_denominator = grad_mass = None
        if renormalise:
            out, numer, mass, inverse, raw_weight, weight, reciprocal = ctx.saved_tensors
            grad_numerator = grad * reciprocal.unsqueeze(-1)  # dL/d(o + c' numer)
            grad_denominator = -torch.linalg.vecdot(grad, out) * reciprocal  # dL/d(t + c' mass)
            grad_weight = torch.linalg.vecdot(grad_numerator, numer) + grad_denominator * mass
            if ctx.needs_input_grad[2]:
                grad_mass = grad_denominator * weight
        else:  # out = o + c' numer
            numer, inverse, raw_weight, weight = ctx.saved_tensors
            grad_numerator = grad
            grad_weight = torch.linalg.vecdot(grad, numer)
        grad_aug = grad_numer = grad_inverse = None
        if ctx.needs_input_grad[0]:
            grad_aug = grad.new_empty(shape, dtype=dtype)
            grad_aug[:, :, :dummy_row].zero_()
            body = grad_aug[:, :, dummy_row:]
            body[..., :value_dim].copy_(grad_numerator)
            body[..., value_dim].copy_(grad_weight * inverse)
            tail = value_dim + 1
            if grad_denominator is not None:
                body[..., tail].copy_(grad_denominator)
                tail += 1
            body[..., tail:].zero_()
        if ctx.needs_input_grad[1]:
            grad_numer = grad_numerator * weight.unsqueeze(-1)
        if ctx.needs_input_grad[3]:
            grad_inverse = grad_weight * raw_weight
        return grad_aug, grad_numer, grad_mass, grad_inverse, None, None, None
