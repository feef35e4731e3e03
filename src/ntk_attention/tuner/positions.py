"""position_offset: rows that use an adapter see their tokens at positions shifted by the
adapter's offset, as if the prefix its state stands for were still in front of them.

Implemented as forward pre-hooks on the modules that turn position ids into embeddings
(rotary embeddings, learned position embeddings), so every way a model computes its default
position ids (from the cache length, from the attention mask in ``generate()``, RoBERTa's
padding-aware ids) is shifted the same way, and calls with offset 0 are untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["PositionOffsetHooks"]

# Returns None (no shift), an int (every row) or a per-row tensor: [batch] when a batch size is
# given, else one entry per row of the call's adapter names.
OffsetProvider = Callable[[int | None, torch.device], "int | torch.Tensor | None"]


class PositionOffsetHooks:
    """Pre-hooks on a model's position modules that add the per-row offset to position ids."""

    def __init__(self, modules: list[tuple[str, nn.Module, str]], offsets: OffsetProvider) -> None:
        self._offsets = offsets
        self._handles = []
        for _, module, kind in modules:
            hook = self._rotary_hook if kind == "rotary" else self._embedding_hook
            if kind == "rotary":
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _rotary_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        # forward(x, position_ids): x [B, L, ...] gives the batch.
        x = args[0] if args else kwargs.get("x")
        if "position_ids" in kwargs:
            position_ids = kwargs["position_ids"]
        elif len(args) >= 2:
            position_ids = args[1]
        else:
            return None
        if position_ids is None or x is None:
            return None
        offsets = self._offsets(x.shape[0], position_ids.device)
        if offsets is None:
            return None
        shifted = _shift_rows(position_ids, offsets)
        if "position_ids" in kwargs:
            return args, {**kwargs, "position_ids": shifted}
        return (args[0], shifted, *args[2:]), kwargs

    def _embedding_hook(self, module: nn.Embedding, args: tuple):
        position_ids = args[0]
        batch = position_ids.shape[0] if position_ids.dim() >= 2 and position_ids.shape[0] > 1 else None
        offsets = self._offsets(batch, position_ids.device)
        if offsets is None:
            return None
        shifted = _shift_rows(position_ids, offsets)
        limit = module.num_embeddings
        if shifted.numel() and int(shifted.max()) >= limit:
            raise ValueError(
                f"position_offset pushes position ids up to {int(shifted.max())}, but the model "
                f"has {limit} learned position embeddings: use a smaller position_offset or "
                "shorter inputs"
            )
        return (shifted, *args[1:])


def _shift_rows(position_ids: torch.Tensor, offsets: int | torch.Tensor) -> torch.Tensor:
    """position_ids [b, L] (b = 1 or B) plus per-row offsets [B] (or one int)."""
    if isinstance(offsets, int):
        return position_ids + offsets
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2:
        raise ValueError(
            f"per-row position offsets need [B, L] position ids, got {tuple(position_ids.shape)}"
        )
    return position_ids + offsets.to(position_ids.dtype).unsqueeze(-1)
