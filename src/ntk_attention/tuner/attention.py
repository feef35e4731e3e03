"""The attention functions transformers calls once a model is adapted, registered with
``AttentionInterface`` together with their mask functions (``AttentionMaskInterface``).

Each base kernel family gets its own NTK twin, so the real tokens keep the kernel the model was
loaded with:

    base "sdpa"  -> "ntk_sdpa":  masks from ``sdpa_mask`` (bool or None), op path "lse" (SDPA's
                                 kernel and its log-sum-exp; "fused" where that cannot run)
    base "eager" -> "ntk_eager": masks from ``eager_mask`` (additive), op path "naive" (matmuls)

The mask function must be registered under the same name: transformers builds no mask at all
for an attention name it has no mask function for, and padding and causality would silently
vanish. A layer without a state for the current call (not targeted, adapter disabled, a base
row) runs the base model's own function unchanged, so the base model is reproduced bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

from ..ops import ntk_attention_unchecked
from .layer import STATE_ATTR, OpState, RowGroup
from .routing import ADAPTER_NAMES_KWARG

__all__ = ["FAMILIES", "AttentionFamily", "family_for_base", "register"]

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

# Keyword arguments some models pass that NTK-Attention cannot honour: failing beats ignoring.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def _eager_base(module: nn.Module) -> AttentionFn:
    """The model's own eager attention (each modeling file defines one)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(
            f"{type(module).__module__} defines no eager_attention_forward; load the model with "
            "attn_implementation='sdpa'"
        )
    return fn


def _sdpa_base(module: nn.Module) -> AttentionFn:
    return sdpa_attention_forward


@dataclasses.dataclass(frozen=True)
class AttentionFamily:
    """One base kernel family and its NTK twin."""

    base: str  # the model's attn_implementation before the adapter
    name: str  # the registered NTK attention name
    op_implementation: str  # the ops path that keeps the family's kernel
    mask_function: Callable
    base_function: Callable[[nn.Module], AttentionFn]
    sdpa_causality: bool  # mask None + module.is_causal means causal (sdpa's convention)


FAMILIES: dict[str, AttentionFamily] = {
    "sdpa": AttentionFamily("sdpa", "ntk_sdpa", "lse", sdpa_mask, _sdpa_base, True),
    "eager": AttentionFamily("eager", "ntk_eager", "naive", eager_mask, _eager_base, False),
}
_BY_NAME = {family.name: family for family in FAMILIES.values()}


def family_for_base(attn_implementation: str | None) -> AttentionFamily:
    """The NTK family for a model loaded with ``attn_implementation`` (clear error otherwise)."""
    if attn_implementation in _BY_NAME:
        raise ValueError(
            f"the model already uses NTK attention ({attn_implementation!r}); "
            "unload() the other adapter model first"
        )
    if attn_implementation not in FAMILIES:
        raise ValueError(
            f"NTK-Attention wraps the attention implementations {sorted(FAMILIES)}, but the "
            f"model uses {attn_implementation!r}: load it with attn_implementation='sdpa'"
        )
    return FAMILIES[attn_implementation]


_AUTOCAST_OFF = contextlib.nullcontext()  # reusable: it holds no state


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off, or a no-op context when it is off already (entering
    ``torch.autocast`` costs tens of microseconds, twice per layer and call)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _AUTOCAST_OFF


def _one_dtype(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in the dtype the attention kernel runs in. Under autocast models hand them over
    mixed (RoPE returns q, k in float32 while v stays in bf16/fp16 without a cache that casts
    it): SDPA would run in the autocast dtype, so the op does too. Outside autocast they
    already agree (nothing is copied)."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    elif q.dtype == k.dtype == v.dtype:
        return q, k, v
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))


def _run(
    family: AttentionFamily,
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    op_state: OpState | None,
    is_causal: bool,
    scaling: float | None,
    dropout: float,
    kwargs: dict,
) -> torch.Tensor:
    """One group of rows through the NTK op with ``op_state`` (None: the base attention)
    -> [b, Lq, Hq, D]. A module-level function, not a closure: decoding calls it per layer
    and token."""
    if op_state is None:
        base = family.base_function(module)
        return base(module, q, k, v, mask, scaling=scaling, dropout=dropout, **kwargs)[0]
    implementation = op_state.implementation
    if implementation == "auto":
        implementation = family.op_implementation
    # The op picks its own precisions (state terms in float32, the kernel in q's dtype);
    # autocast would recast its einsums to bf16 and break its backward. Shapes are right by
    # construction (the model's q, k, v; a state built for this layer's geometry), so the op's
    # input checks are skipped: they cost ~40 us per layer and token when decoding.
    q, k, v = _one_dtype(q, k, v)
    with _no_autocast(q.device.type):
        out = ntk_attention_unchecked(
            q, k, v, op_state.z, op_state.kappa,
            feature_map=op_state.feature_map,
            attn_mask=mask,
            is_causal=is_causal,
            scale=q.shape[-1] ** -0.5 if scaling is None else float(scaling),
            state_log_scale=op_state.log_scale,
            dropout_p=dropout,
            implementation=implementation,
            matrix=op_state.matrix,  # kept for a generate call, else None
            sink_tokens=op_state.sink_tokens,
        )  # [b, Hq, Lq, D]
    return out.transpose(1, 2)


def _make_attention_function(family: AttentionFamily) -> AttentionFn:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] -> ([B, Lq, Hq, D], None)."""
        row_names = kwargs.pop(ADAPTER_NAMES_KWARG, None)
        state = module._modules.get(STATE_ATTR)
        if state is None:
            groups = [RowGroup(None, None)]
        elif row_names is None:  # one state for every row: nothing is stacked
            groups = state.plan(None, query.shape[0])
        else:
            with _no_autocast(query.device.type):  # stacked states in fp32
                groups = state.plan(row_names, query.shape[0])
        if len(groups) == 1 and groups[0].state is None:
            base = family.base_function(module)
            return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

        for name in _UNSUPPORTED_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{type(module).__name__} passes {name}=..., which NTK-Attention does not support"
                )
        dropout = dropout if module.training else 0.0
        is_causal = False
        if family.sdpa_causality:
            # sdpa's rule: no mask and a causal module -> causal, top-left aligned. Keys past
            # the queries are then never visible (an empty static cache): crop them, after which
            # the op's bottom-right causality is the same mask.
            flag = kwargs.get("is_causal")
            causal_module = flag if flag is not None else getattr(module, "is_causal", True)
            is_causal = bool(query.shape[2] > 1 and attention_mask is None and causal_module)
            if is_causal and key.shape[2] > query.shape[2]:
                key = key[:, :, : query.shape[2]]
                value = value[:, :, : query.shape[2]]

        if len(groups) == 1:
            out = _run(family, module, query, key, value, attention_mask, groups[0].state,
                       is_causal, scaling, dropout, kwargs)
        else:
            parts = []
            for group in groups:
                rows = group.rows
                mask = attention_mask
                if mask is not None and mask.shape[0] == query.shape[0] and query.shape[0] > 1:
                    mask = mask[rows]
                parts.append(_run(family, module, query[rows], key[rows], value[rows], mask,
                                  group.state, is_causal, scaling, dropout, kwargs))
            inverse = torch.argsort(torch.cat([group.rows for group in groups]))
            out = torch.cat(parts)[inverse]
        return out.contiguous(), None

    attention.__name__ = attention.__qualname__ = f"{family.name}_attention_forward"
    return attention


def register() -> None:
    """Register every family's attention and mask function (idempotent)."""
    for family in FAMILIES.values():
        AttentionInterface.register(family.name, _make_attention_function(family))
        AttentionMaskInterface.register(family.name, family.mask_function)


register()
