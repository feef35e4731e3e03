"""Finding what the adapter attaches to in a transformers model: its self-attention modules and
their shapes, and the modules that turn position ids into position embeddings.

A module counts as an attention layer when its class's ``forward`` dispatches through
``ALL_ATTENTION_FUNCTIONS`` (transformers' AttentionInterface): only those can be routed to the
NTK attention function. Cross-attention modules (keys from another sequence) are left alone.
"""

from __future__ import annotations

import functools
import inspect
import math

from torch import nn

from .layer import Geometry

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError",
    "find_attention_modules",
    "find_position_modules",
    "geometry_of",
]

# Tested architectures (tests/test_tuner_models.py); others whose attention goes through
# AttentionInterface usually work as well.
SUPPORTED_ARCHITECTURES = (
    "llama", "qwen2", "mistral", "gemma", "gpt2", "bert", "roberta", "vit", "dinov2",
)

_INTERFACE_MARKERS = ("ALL_ATTENTION_FUNCTIONS", "AttentionInterface")


class UnsupportedModelError(ValueError):
    """The model cannot carry an NTK-Attention adapter (the message says why)."""


@functools.cache
def _dispatches_through_interface(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return any(marker in source for marker in _INTERFACE_MARKERS)


def _is_cross_attention(name: str, module: nn.Module) -> bool:
    if getattr(module, "is_cross_attention", False):
        return True
    cls_name = type(module).__name__.lower()
    return "crossattention" in cls_name or name.rsplit(".", 1)[-1] in ("crossattention", "encoder_attn")


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of ``model`` that dispatch through AttentionInterface, in
    module order, as (qualified name, module). Raises :class:`UnsupportedModelError` if none."""
    found = []
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.") or not hasattr(module, "config"):
            continue
        if not _dispatches_through_interface(type(module)):
            continue
        if _is_cross_attention(name, module):
            continue
        found.append((name, module))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no self-attention module that dispatches through "
            "transformers' AttentionInterface (ALL_ATTENTION_FUNCTIONS), so NTK-Attention cannot "
            "be routed into it. Supported (tested) architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; other transformers models whose attention "
            "uses AttentionInterface usually work too."
        )
    return found


def _first_int(*values) -> int | None:
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def geometry_of(module: nn.Module, layer_index: int) -> Geometry:
    """Heads, KV heads, head dim and softmax scale of one attention module."""
    config = module.config
    q_heads = _first_int(
        getattr(module, "num_heads", None),
        getattr(module, "num_attention_heads", None),
        getattr(config, "num_attention_heads", None),
        getattr(config, "n_head", None),
    )
    hidden = _first_int(getattr(config, "hidden_size", None), getattr(config, "n_embd", None))
    head_dim = _first_int(
        getattr(module, "head_dim", None),
        getattr(module, "attention_head_size", None),
        getattr(config, "head_dim", None),
        hidden // q_heads if (hidden and q_heads) else None,
    )
    if q_heads is None or head_dim is None:
        raise UnsupportedModelError(
            f"cannot read the number of heads and the head dim of {type(module).__name__} "
            f"(got heads={q_heads}, head_dim={head_dim})"
        )
    groups = _first_int(getattr(module, "num_key_value_groups", None)) or 1
    kv_heads = _first_int(getattr(config, "num_key_value_heads", None)) or q_heads // groups
    if q_heads % kv_heads != 0 or q_heads // kv_heads != groups and groups != 1:
        raise UnsupportedModelError(
            f"{type(module).__name__}: {q_heads} query heads, {kv_heads} KV heads and "
            f"{groups} groups do not agree"
        )
    scale = getattr(module, "scaling", None)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        scale = head_dim**-0.5
    causal = getattr(module, "is_causal", False) is True
    return Geometry(layer_index, q_heads, kv_heads, head_dim, float(scale), causal)


# Learned absolute position embeddings, by the attribute name models give them.
_POSITION_EMBEDDING_NAMES = ("position_embeddings", "wpe", "embed_positions")


def find_position_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Modules that map position ids to position embeddings, as (name, module, kind) with kind
    "rotary" (forward(x, position_ids)) or "embedding" (an nn.Embedding over positions)."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            params = list(inspect.signature(module.forward).parameters)
            if "position_ids" in params:
                found.append((name, module, "rotary"))
        elif isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_EMBEDDING_NAMES:
            found.append((name, module, "embedding"))
    return found
