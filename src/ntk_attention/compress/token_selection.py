"""Which prefix tokens to keep: per layer and KV head, index tensors [layers, Hkv, n] into the
prefix's m tokens (sorted by position). Used to initialise a state from the prompt's own
keys/values, and as the training-free KV-cache eviction baselines at equal memory.

    by_mass          the ``sink`` first tokens, then the tokens that received the most
                     attention mass from the distillation queries
    sink_and_recent  StreamingLLM: the ``sink`` first tokens and the most recent ones
    snapkv           SnapKV: the tokens the prompt's last ``window`` queries attend to most
                     (scores max-pooled over ``kernel`` neighbours), plus the window itself
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["by_mass", "sink_and_recent", "snapkv"]


def _check(count: int, length: int) -> None:
    if count <= 0:
        raise ValueError(f"the number of kept tokens must be positive, got {count}")
    if length <= 0:
        raise ValueError(f"the prefix must hold at least one token, got m={length}")


def by_mass(mass: torch.Tensor, count: int, sink: int = 1) -> torch.Tensor:
    """mass [layers, Hkv, m] -> indices [layers, Hkv, min(count, m)]: tokens 0..sink-1, then
    the rest by decreasing mass."""
    _layers, _kv_heads, length = mass.shape
    _check(count, length)
    count = min(count, length)
    sink = min(sink, count)
    score = mass.float().clone()
    score[..., :sink] = torch.inf
    chosen = score.topk(count, dim=-1).indices
    return chosen.sort(dim=-1).values


def sink_and_recent(length: int, count: int, layers: int, kv_heads: int, sink: int = 4) -> torch.Tensor:
    """Indices [layers, Hkv, min(count, m)]: the first ``sink`` tokens and the last count - sink."""
    _check(count, length)
    count = min(count, length)
    sink = min(sink, count)
    kept = list(range(sink)) + list(range(length - (count - sink), length))
    index = torch.tensor(sorted(set(kept)), dtype=torch.long)
    return index.expand(layers, kv_heads, -1).clone()


def snapkv(
    window_mass: torch.Tensor, count: int, window: int = 32, kernel: int = 7
) -> torch.Tensor:
    """window_mass [layers, Hkv, m] (attention mass from the prompt's last ``window`` queries) ->
    indices [layers, Hkv, min(count, m)]. The last min(window, count // 2) tokens are kept (the
    observation window, shrunk for small budgets); the rest are the best tokens before it by the
    max-pooled score."""
    layers, kv_heads, length = window_mass.shape
    _check(count, length)
    count = min(count, length)
    keep_window = min(window, count // 2, length)
    pooled = F.max_pool1d(
        window_mass.float().reshape(-1, 1, length), kernel, stride=1, padding=kernel // 2
    ).reshape(layers, kv_heads, length)
    pooled[..., length - keep_window :] = torch.inf
    chosen = pooled.topk(count, dim=-1).indices
    return chosen.sort(dim=-1).values
