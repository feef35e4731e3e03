"""Input checks shared by every attention op: one place that turns bad shapes into a
ValueError naming the argument, what was expected and what was received."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .feature_maps import FEATURE_MAPS, FeatureMap, get_feature_map

__all__ = ["check_mask", "check_qkv", "check_state", "resolve_feature_map"]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, Hq, Lq, D]; k [B, Hkv, Lk, D]; v [B, Hkv, Lk, Dv]; Hq a multiple of Hkv."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L, D], got {got}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must agree on [B, Hkv, Lk], got k {_shape(k)} and v {_shape(v)}"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: q {_shape(q)}, k {_shape(k)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: q {_shape(q)}, k {_shape(k)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}): "
            f"q {_shape(q)}, k {_shape(k)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_mask(
    attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor
) -> torch.Tensor | None:
    """attn_mask: bool (True = attend) or additive float, broadcastable to [B, Hq, Lq, Lk]."""
    if attn_mask is None:
        return None
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must be a tensor broadcastable to {target}")
    try:
        broadcast = torch.broadcast_shapes(attn_mask.shape, target)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(target):
        raise ValueError(
            f"attn_mask of shape {_shape(attn_mask)} is not broadcastable to "
            f"[B, Hq, Lq, Lk] = {target}"
        )
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    return attn_mask


def check_state(
    z: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    kappa: torch.Tensor,
    q: torch.Tensor,
    v: torch.Tensor,
) -> int:
    """z [(B,) Hkv, r, Dv] or (z_a [(B,) Hkv, r, s], z_b [(B,) Hkv, s, Dv]); kappa [(B,) Hkv, r].

    Returns r.
    """
    batch, kv_heads, value_dim = q.shape[0], v.shape[1], v.shape[-1]
    if not isinstance(kappa, torch.Tensor) or kappa.dim() not in (2, 3):
        got = _shape(kappa) if isinstance(kappa, torch.Tensor) else type(kappa).__name__
        raise ValueError(f"kappa must be [Hkv, r] or [B, Hkv, r], got {got}")
    per_row = kappa.dim() == 3
    if kappa.shape[-2] != kv_heads or (per_row and kappa.shape[0] != batch):
        expected = f"[{batch}, {kv_heads}, r]" if per_row else f"[{kv_heads}, r]"
        raise ValueError(f"kappa must be {expected} (Hkv from k), got {_shape(kappa)}")
    r = kappa.shape[-1]
    if r <= 0:
        raise ValueError(f"the state's feature dimension r must be positive, got kappa {_shape(kappa)}")
    lead = (batch, kv_heads) if per_row else (kv_heads,)

    def expect(name: str, t: torch.Tensor, tail: tuple[int | None, ...]) -> None:
        want = lead + tail
        ok = isinstance(t, torch.Tensor) and t.dim() == len(want)
        ok = ok and all(w is None or w == s for w, s in zip(want, t.shape, strict=False))
        if not ok:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            shown = ", ".join("s" if w is None else str(w) for w in want)
            raise ValueError(
                f"{name} must be [{shown}] to match kappa {_shape(kappa)} and v {_shape(v)}, "
                f"got {got}"
            )

    if isinstance(z, tuple):
        if len(z) != 2:
            raise ValueError(f"a low-rank z is a pair (z_a, z_b), got {len(z)} tensors")
        z_a, z_b = z
        expect("z_a", z_a, (r, None))
        expect("z_b", z_b, (z_a.shape[-1], value_dim))
        if z_a.shape[-1] <= 0:
            raise ValueError(f"the rank of z must be positive, got z_a {_shape(z_a)}")
    else:
        expect("z", z, (r, value_dim))
    return r


def resolve_feature_map(
    feature_map: str | FeatureMap | Callable[[torch.Tensor], torch.Tensor],
    head_dim: int,
    r: int,
    scale: float,
    device: torch.device,
) -> FeatureMap:
    """A FeatureMap for this call, built once per (name, shape, scale, device) for names."""
    if isinstance(feature_map, str):
        # A map with parameters of its own: a name alone cannot say what their values are.
        if feature_map in FEATURE_MAPS and FEATURE_MAPS[feature_map].trainable:
            raise ValueError(
                f"feature_map {feature_map!r} has trainable parameters: build it with "
                f"get_feature_map({feature_map!r}, head_dim, r=..., kv_heads=...) and pass the "
                "module"
            )
        return _cached_named_map(feature_map, head_dim, r, scale, device)
    return get_feature_map(feature_map, head_dim, r=r, scale=scale)


@functools.lru_cache(maxsize=64)
def _cached_named_map(
    name: str, head_dim: int, r: int, scale: float, device: torch.device
) -> FeatureMap:
    return get_feature_map(name, head_dim, r=r, scale=scale).to(device)
