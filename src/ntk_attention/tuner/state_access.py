"""Reading and writing an adapter's state from outside the tuner (prompt compression, data-
parallel training) without knowing how :class:`NTKState` stores it.

A layer's state of one adapter is a set of named tensors (*fields*):

    z                 [Hkv, r, D]   dense Z                 (or, with a rank s, instead:)
    z_a, z_b          [Hkv, r, s], [Hkv, s, D]              Z = Z_A Z_B
    kappa             [Hkv, r]      the stored theta: kappa = nonnegative(theta), so a kappa
                                    >= 0 written here is kappa itself
    log_scale         [Hkv]         with ``learn_log_scale``
    exact_keys, exact_values  [n, T, D]  the tokens the config's ``exact_heads`` of this layer keep
                                    (with ``exact_bits``: read dequantised, quantised when
                                    written)
    virtual_keys      [Hkv, n, D]   the feature map's virtual tokens (``exp`` / ``elu+exp``):
    virtual_bias      [Hkv, n]      keys W and biases b of exp(s x.W_i + b_i)
    feature_map.<key>               any other tensor of the feature map, under its own
                                    state_dict key (e.g. favor's buffer ``feature_map.projection``)

An adapter has only the fields its config gives it. ``layer`` below is an attention module
that carries the adapter's states, or its :class:`NTKState` itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..ops import FeatureMap
from .layer import PARAMETER_KINDS, STATE_ATTR, NTKState

__all__ = [
    "adapter_feature_map",
    "kappa_parameters",
    "layer_state",
    "read_state",
    "write_state",
]

_FEATURE_MAP_PREFIX = "feature_map."


def layer_state(layer: nn.Module) -> NTKState | None:
    """The :class:`NTKState` of an attention module (the states of every adapter that targets
    it), ``layer`` itself when it is one, or None when no adapter targets the module."""
    if isinstance(layer, NTKState):
        return layer
    state = layer._modules.get(STATE_ATTR)
    return state if isinstance(state, NTKState) else None


def _adapter_state(layer: nn.Module, adapter_name: str) -> NTKState:
    state = layer_state(layer)
    if state is None:
        raise ValueError(f"{type(layer).__name__} carries no NTK-Attention state")
    if adapter_name not in state.configs:
        raise ValueError(
            f"adapter {adapter_name!r} does not target this layer (it has {sorted(state.configs)})"
        )
    return state


def adapter_feature_map(layer: nn.Module, adapter_name: str) -> FeatureMap:
    """The feature map adapter ``adapter_name`` uses in ``layer`` (the module itself, not a
    copy: copy it before changing it)."""
    return _adapter_state(layer, adapter_name).ntk_feature_map[adapter_name]


def _fields(layer: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors in ``layer`` by field name (the stored tensors themselves)."""
    state = _adapter_state(layer, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for kind in PARAMETER_KINDS:
        table = getattr(state, kind)
        if adapter_name in table:
            out[kind.removeprefix("ntk_")] = table[adapter_name]
    if adapter_name in state.ntk_exact_quantized:  # dequantised: write_state quantises
        out["exact_keys"], out["exact_values"] = state.exact_tokens(adapter_name)
    feature_map = state.ntk_feature_map[adapter_name]
    virtual = feature_map.virtual_token_tensors() or ()
    for key, tensor in feature_map.state_dict(keep_vars=True).items():
        if len(virtual) == 2 and tensor is virtual[0]:
            out["virtual_keys"] = tensor
        elif len(virtual) == 2 and tensor is virtual[1]:
            out["virtual_bias"] = tensor
        else:
            out[_FEATURE_MAP_PREFIX + key] = tensor
    return out


def read_state(layer: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The state of adapter ``adapter_name`` in ``layer``: every field it has (see the module
    docstring), as detached copies in the stored dtype and device. Change them and hand them
    to :func:`write_state` to change the state."""
    return {key: tensor.detach().clone() for key, tensor in _fields(layer, adapter_name).items()}


@torch.no_grad()
def write_state(
    layer: nn.Module,
    adapter_name: str,
    values: Mapping[str, torch.Tensor] | None = None,
    /,
    **fields: torch.Tensor | None,
) -> None:
    """Copy tensors into the state of adapter ``adapter_name`` in ``layer``, by field name (see
    the module docstring), given as a mapping and/or keywords (a keyword None is skipped).
    Each is converted to the stored tensor's dtype and device and must have its shape; the
    fields not given keep their values. Raises ValueError for a field the adapter does not
    have or a wrong shape, before anything is written."""
    given = {**(values or {}), **{k: v for k, v in fields.items() if v is not None}}
    targets = _fields(layer, adapter_name)
    for key, value in given.items():
        if key not in targets:
            raise ValueError(
                f"adapter {adapter_name!r} has no state field {key!r} in this layer; it has "
                f"{sorted(targets)}"
            )
        if tuple(value.shape) != tuple(targets[key].shape):
            raise ValueError(
                f"state field {key!r} of adapter {adapter_name!r} is "
                f"{tuple(targets[key].shape)}, got {tuple(value.shape)}"
            )
    quantized = layer_state(layer).ntk_exact_quantized
    for key, value in given.items():
        if adapter_name in quantized and key in ("exact_keys", "exact_values"):
            quantized[adapter_name].set(**{key.removeprefix("exact_"): value})
        else:
            targets[key].copy_(value.to(targets[key]))


def kappa_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every stored kappa (theta, kappa = nonnegative(theta)) in ``module`` (an NTKModel, its
    base model, or anything wrapping them such as DistributedDataParallel), of every adapter,
    in module order: the parameters whose gradient gets the non-negative projection
    (``ops.state.project_nonnegative_grad``)."""
    return [
        param
        for sub in module.modules()
        if isinstance(sub, NTKState)
        for param in sub.ntk_kappa.values()
    ]
