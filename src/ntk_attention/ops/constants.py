"""Cached 0-dim tensors for the constants of the per-token ops.

An op called with a Python number wraps it in a fresh tensor on every call (~3 us of host
time on CPU); decoding runs a handful of such ops per layer and token. A 0-dim float32 tensor
takes part in the op like the number does (it does not promote the other operand's dtype, and
float16/bfloat16 operands give bit-identical results, as a test checks); float64 operands get a
float64 constant.
"""

from __future__ import annotations

import torch

__all__ = ["constant"]

_CACHE: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a cached 0-dim tensor to combine with ``like``: on its device, float64 for
    float64 operands and float32 otherwise. Never written to."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    key = (value, dtype, like.device)
    cached = _CACHE.get(key)
    if cached is None:
        cached = _CACHE[key] = torch.tensor(value, dtype=dtype, device=like.device)
    return cached
