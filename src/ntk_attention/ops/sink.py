"""The attention-sink exemption: which queries read the state.

A causal model's first token attends only to itself, and in some heads its one logit is very
low (about -11 in SmolLM2-135M), so its real attention mass is ~1e-5: any state mass above
~1e-4 takes that row over, and every later token reads the first token (the attention sink).
A state that starts at zero gets, after one Adam step, a mass ~lr for *every* query and a value
b / a of norm O(1) whatever the lr, so the first step wrecks the sink (docs/results/REPORT.md, section 4). Queries at the first ``sink_tokens`` positions of the sequence therefore read
only the real keys (the base attention) and send no gradient to the state.

The position of query i is read off what it can see, so that left padding, chunked prefill and
decoding need no position ids: with keys aligned bottom-right (query i sits at key index
p_i = Lk - Lq + i),

    position(i) = #{ j <= p_i : key j visible to query i } - 1

i.e. the number of real tokens before it. Without a mask every key up to p_i counts, so
position(i) = p_i. With left padding the first real token has position 0; a decoding step or
a later prefill chunk sees the earlier tokens, so it exempts nothing. A query is exempt iff
position(i) < sink_tokens, i.e. it sees at most ``sink_tokens`` keys up to its own.
"""

from __future__ import annotations

import weakref

import torch

from .masks import causal_mask

__all__ = ["check_sink_tokens", "state_readers"]


def check_sink_tokens(sink_tokens: object, *, auto: bool = False) -> int | str:
    """``sink_tokens`` as an int >= 0 (or "auto" where ``auto`` allows it: a setting resolved
    per layer, as NTKConfig and the finetune CLI take it), else a ValueError naming it."""
    if auto and sink_tokens == "auto":
        return sink_tokens
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        allowed = "'auto' or an int >= 0" if auto else "an int >= 0"
        raise ValueError(f"sink_tokens must be {allowed}, got {sink_tokens!r}")
    return sink_tokens


def state_readers(
    attn_mask: torch.Tensor | None,
    q_len: int,
    k_len: int,
    sink_tokens: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Which queries read the state: bool [.., Lq] (True = reads it), broadcastable against
    [B, Hq, Lq]; None when every query does (``sink_tokens`` = 0, or no mask and the first
    query already sits at key index >= ``sink_tokens``). ``attn_mask``: bool (True = attend) or
    additive float [.., Lq, Lk]; causality need not be folded in (only keys up to the query's
    own index count), and a call without a mask counts every key up to it.

    A model passes the same mask to every layer of one forward, and counting it costs
    O(B Lq Lk) (84 ms per layer at B = 4, L = 2048 on one CPU thread): the result for the last
    mask is kept (by a weak reference and the mask's version counter, so a new or modified
    mask is counted afresh) and every layer after the first reuses it."""
    global _LAST
    if sink_tokens == 0:
        return None
    first_position = k_len - q_len  # p_0
    if attn_mask is None:
        if first_position >= sink_tokens:
            return None
        positions = torch.arange(first_position, k_len, device=device)
        return positions >= sink_tokens  # [Lq]
    # No cache inside a traced graph, nor for inference-mode tensors (no version counter).
    cacheable = not torch.compiler.is_compiling() and not attn_mask.is_inference()
    key = (attn_mask._version, q_len, k_len, sink_tokens, device) if cacheable else None
    if cacheable and _LAST is not None and _LAST[0]() is attn_mask and _LAST[1] == key:
        return _LAST[2]
    if attn_mask.dtype == torch.bool:
        visible = attn_mask
    else:  # additive: masked keys are -inf or the dtype's most negative value
        visible = attn_mask > torch.finfo(attn_mask.dtype).min / 2
    up_to_own = causal_mask(q_len, k_len, device)  # [Lq, Lk]: key j <= p_i
    readers = (visible & up_to_own).sum(-1) > sink_tokens  # [.., Lq]
    if cacheable:
        _LAST = (weakref.ref(attn_mask), key, readers)
    return readers


# (weak reference to the last mask, (its version, Lq, Lk, sink_tokens, device), its readers)
_LAST: tuple | None = None
