"""CompressConfig: how a prompt or a prefix is turned into a state (which feature map, how big,
how it starts, how long it is distilled), and the sizing rule that keeps the state within a
fraction of the prefix's KV cache.

Size is counted in stored numbers, every tensor the adapter adds (parameters and buffers, all
layers), against the prefix's KV cache: 2 x layers x KV heads x head dim x m numbers.

    exp       r virtual tokens: W [r, D], b [r], Z [r, D], kappa [r] per KV head -> r (2D + 2),
              plus m x 2D for every exact (retrieval) head, which keeps the whole prompt (with
              ``exact_bits`` b: its codes count b / 16 of a number each, plus a range per
              group of 32; tuner.quantized_tokens.token_numbers)
    elu       the paper's map (r = D); with ``sink`` > 0 the adapter's map is "elu+exp":
              D ELU features plus ``sink`` exact tokens, Z low-rank when dense does not fit
    favor     r random features (the projection [r, D] is a buffer and counts)
    taylor    r = 1 + D + D^2, fixed: larger than the KV cache of any prompt under ~2100 tokens
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..ops import FEATURE_MAPS as MAP_CLASSES
from ..ops import FeatureMap
from ..tuner.quantized_tokens import check_bits, token_numbers

__all__ = ["EXACT_HEADS_SHARE", "FEATURE_MAPS", "INITS", "CompressConfig", "CompressError"]

# Feature maps a prompt can be compressed with, and the initialisation each uses by default
# (a policy table: what each map can do is asked of its class, ``_map_class``).
FEATURE_MAPS = {"exp": "select", "elu": "zeros", "favor": "closed_form", "taylor": "closed_form"}
# select: the prompt's own keys/values chosen by attention mass (exp only); closed_form:
# Z = sum phi(k_i) v_i^T, kappa = sum phi(k_i) over the prompt; zeros: Z = 0, kappa = 0
# (the prompt dropped). The first ``sink`` tokens are kept exactly with every init.
INITS = ("auto", "select", "closed_form", "zeros")
# With exact_heads=None (auto), an exp state spends up to this share of its budget on retrieval
# heads that keep every prompt token (each costs CompressConfig.exact_head_numel numbers).
EXACT_HEADS_SHARE = 0.4


class CompressError(ValueError):
    """A prompt, prefix, model or setting that cannot be compressed (the message says why)."""


def _map_class(name: str) -> type[FeatureMap]:
    """The feature-map class of a registry name (ops.FEATURE_MAPS)."""
    return MAP_CLASSES[name]


def _keeps_exact_tokens(name: str) -> bool:
    """Whether a state of feature map ``name`` can keep prompt tokens exactly (the sink): it
    has virtual tokens, or the adapter appends them (elu -> "elu+exp")."""
    cls = _map_class(name)
    return cls.has_virtual_tokens or cls.virtual_token_variant is not None


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """Settings of :func:`compress_prompt` and :func:`convert_prefix`.

    State:
      feature_map      "exp" (r trained virtual tokens), "elu" (linear-attention state),
                       "favor" or "taylor" (closed-form kernel approximations).
      r                exp/favor: feature dimension; None = the largest that fits
                       ``memory_fraction``. elu/taylor fix r themselves.
      rank             low-rank Z (s); None = dense, or for elu the largest rank that fits.
      memory_fraction  the state's size as a fraction of the prefix's KV cache (every tensor
                       counted); None = no limit (r and rank must then be given or natural).
      memory_bytes     instead of a fraction, a fixed size in bytes (the state is stored in
                       float32: memory_bytes / 4 numbers), whatever the prompt's length: a
                       longer prompt gets the same state size (fewer exact heads, which keep
                       every prompt token, fit; none once one head's share would not).
                       When given, memory_fraction is not used.
      sink             the first ``sink`` prompt tokens are kept exactly (the attention sink);
                       None = 1 for exp and elu, 0 for favor and taylor (no exact tokens).
      init             "auto" (exp: select, elu: zeros, favor/taylor: closed_form) or one of
                       INITS.
      exact_heads      exp only: how many KV heads (over all layers) keep every prompt token
                       exactly, chosen by how much they copy from the prompt when it is read
                       again (teacher.retrieval_scores): the heads that find a rare name or
                       acronym of the prompt when the text repeats it. None = as many as fit
                       in EXACT_HEADS_SHARE of the budget (0 without a budget or for a PEFT
                       prefix, which has no tokens to re-read); 0 = none.
      exact_bits       the exact heads' tokens kept in this many bits (2, 4, 8; keys per
                       channel, values per token over groups of 32, as KIVI quantises a KV
                       cache) or None = float; 4 (the default) keeps a head for 0.31 of its
                       float cost, so about 3x as many fit.
    Distillation inputs (never the evaluation text):
      samples, sample_length, top_p, temperature
                       continuations the model samples after the prompt.
      rereads          windows of ``sample_length`` prompt tokens read again after the prompt.
    Layer-wise distillation (attention-output matching, all layers at once):
      steps, lr, batch_size (rows per step; None = all).
    End-to-end distillation (KL on the logits of the same inputs, after the layer-wise stage):
      e2e_steps (0 = off), e2e_lr, e2e_batch_size.
    """

    feature_map: str = "exp"
    r: int | None = None
    rank: int | None = None
    memory_fraction: float | None = 1 / 8
    memory_bytes: int | None = None
    sink: int | None = None
    init: str = "auto"
    exact_heads: int | None = None
    exact_bits: int | None = 4
    samples: int = 8
    sample_length: int = 64
    top_p: float = 0.95
    temperature: float = 1.0
    rereads: int = 4
    steps: int = 200
    lr: float = 1e-2
    batch_size: int | None = 4
    e2e_steps: int = 0
    e2e_lr: float = 1e-3
    e2e_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise CompressError(
                f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}"
            )
        cls = _map_class(self.feature_map)  # what the map can do
        _positive_int("r", self.r, optional=True)
        _positive_int("rank", self.rank, optional=True)
        if self.r is not None and cls.fixed_r:
            raise CompressError(
                f"feature_map {self.feature_map!r} fixes its own r (elu: head dim, taylor: "
                f"1 + D + D^2); got r={self.r}: use feature_map 'exp' or 'favor' to choose r"
            )
        if self.memory_fraction is not None and not (
            isinstance(self.memory_fraction, (int, float))
            and math.isfinite(self.memory_fraction)
            and self.memory_fraction > 0
        ):
            raise CompressError(
                f"memory_fraction must be a number > 0 or None, got {self.memory_fraction!r}"
            )
        _positive_int("memory_bytes", self.memory_bytes, optional=True)
        if self.sink is not None:
            _non_negative_int("sink", self.sink)
        if self.init not in INITS:
            raise CompressError(f"init must be one of {INITS}, got {self.init!r}")
        if self.resolved_init == "select" and not cls.only_virtual_tokens():
            raise CompressError(
                f"init 'select' copies prompt tokens into virtual tokens: it needs feature_map "
                f"'exp', got {self.feature_map!r}"
            )
        if self.resolved_init == "closed_form" and not cls.has_kernel_features:
            raise CompressError(
                "init 'closed_form' is for kernel feature maps (elu, favor, taylor); with "
                f"feature_map {self.feature_map!r} copy the prompt's tokens in with init 'select'"
            )
        if self.exact_heads is not None:
            _non_negative_int("exact_heads", self.exact_heads)
            if self.exact_heads and not cls.only_virtual_tokens():
                raise CompressError(
                    f"exact_heads keep prompt tokens as exponential features: they need "
                    f"feature_map 'exp', got {self.feature_map!r}"
                )
            if self.exact_heads and self.rank is not None:
                raise CompressError("exact_heads need a dense Z: use rank=None with exact_heads")
        check_bits(self.exact_bits, CompressError)
        if self.resolved_sink and not _keeps_exact_tokens(self.feature_map):
            raise CompressError(
                f"an exact sink needs exponential features: use sink=0 with feature_map "
                f"{self.feature_map!r} (or feature_map 'exp' / 'elu')"
            )
        _positive_int("samples", self.samples)
        _positive_int("sample_length", self.sample_length)
        if not 0 < self.top_p <= 1:
            raise CompressError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.temperature > 0:
            raise CompressError(f"temperature must be > 0, got {self.temperature!r}")
        _non_negative_int("rereads", self.rereads)
        _non_negative_int("steps", self.steps)
        _non_negative_int("e2e_steps", self.e2e_steps)
        for name in ("lr", "e2e_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CompressError(f"{name} must be a number > 0, got {value!r}")
        _positive_int("batch_size", self.batch_size, optional=True)
        _positive_int("e2e_batch_size", self.e2e_batch_size)

    @property
    def resolved_init(self) -> str:
        return FEATURE_MAPS[self.feature_map] if self.init == "auto" else self.init

    @property
    def resolved_sink(self) -> int:
        if self.sink is not None:
            return self.sink
        return 1 if _keeps_exact_tokens(self.feature_map) else 0

    @property
    def limited(self) -> bool:
        """Whether the state's size is bounded (by memory_bytes or memory_fraction)."""
        return self.memory_bytes is not None or self.memory_fraction is not None

    def budget(self, kv_cache_numel: int) -> int | None:
        """The state's budget in stored numbers for a prefix whose KV cache holds
        ``kv_cache_numel`` numbers: memory_bytes / 4 (float32), else memory_fraction of the
        cache, else None (no limit)."""
        if self.memory_bytes is not None:
            return self.memory_bytes // 4
        if self.memory_fraction is not None:
            return int(self.memory_fraction * kv_cache_numel)
        return None

    def budget_text(self) -> str:
        """The setting that made the budget, for messages ("memory_fraction=0.125")."""
        if self.memory_bytes is not None:
            return f"memory_bytes={self.memory_bytes:,}"
        return f"memory_fraction={self.memory_fraction}"

    def exact_head_numel(self, tokens: int, head_dim: int) -> int:
        """Numbers one exact head stores to keep ``tokens`` tokens (at ``exact_bits``)."""
        return token_numbers(tokens, head_dim, self.exact_bits)

    def exact_head_count(self, heads: int, kv_cache_numel: int, head_dim: int) -> int:
        """How many of ``heads`` KV heads (layers x Hkv) keep the whole prefix exactly: as
        given, or (auto) as many as fit in EXACT_HEADS_SHARE of the budget, one head costing
        ``exact_head_numel`` (1 / heads of the prefix's KV cache of ``kv_cache_numel``
        numbers when kept in float)."""
        if not _map_class(self.feature_map).only_virtual_tokens():
            return 0
        if self.exact_heads is not None:
            return min(self.exact_heads, heads)
        budget = self.budget(kv_cache_numel)
        if budget is None or self.rank is not None:
            return 0
        tokens = kv_cache_numel // (heads * 2 * head_dim)
        head = self.exact_head_numel(tokens, head_dim)
        # (+1e-9: a share that is a whole number of heads in exact arithmetic stays one)
        return min(heads, math.floor(EXACT_HEADS_SHARE * budget / head + 1e-9))

    def replace(self, **changes: Any) -> CompressConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_int(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CompressError(f"{name} must be a positive int, got {name}={value!r}")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CompressError(f"{name} must be an int >= 0, got {name}={value!r}")
