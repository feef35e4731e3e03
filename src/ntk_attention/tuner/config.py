"""NTKConfig: what one NTK-Attention adapter is (feature map, state size, which layers), validated
once at construction and never mutated afterwards (derive a changed copy with ``replace``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["INITS", "NTKConfig", "PEFT_TYPE"]

# The name written into adapter_config.json, in PEFT's style.
PEFT_TYPE = "NTK_ATTENTION"

# How the state starts. "zeros": Z = 0, kappa = 0, the adapted model equals the base model
# (low rank: Z_A random, Z_B = 0, so Z = 0 and Z_B still gets a gradient, as LoRA's B).
# "normal": Z ~ N(0, init_std^2) and kappa = 0 (not the base model at init; for experiments).
INITS = ("zeros", "normal")

# The op paths ("auto" follows the base model: its sdpa kernel -> "lse", eager -> "naive").


@dataclasses.dataclass(frozen=True)
class NTKConfig:
    """Configuration of one NTK-Attention adapter.

    Every targeted attention layer gets, per KV head, a state ``Z`` [r, D] (or ``Z_A Z_B`` with
    ``rank`` s: [r, s] x [s, D]) and ``kappa`` [r] (stored as ``theta``, kappa = max(theta, 0)
    with a projected gradient), so each query sees, besides its real keys,

        out = (sum_j e^{s q.k_j} v_j + phi(q)^T Z) / (sum_j e^{s q.k_j} + phi(q)^T kappa).

    Fields:
      feature_map      "elu" (the paper's, r = head dim), "favor" (any r), "taylor"
                       (r = 1 + D + D^2) or "exp" (learnable exponential features, r required;
                       the state is then r trained virtual tokens), or "elu+exp" (elu
                       features plus r - D virtual tokens, e.g. an exact attention sink).
      r                feature dimension; None = the map's natural size (head dim for elu and
                       favor). Resolved per layer from the model's head dim at injection.
      rank             None: dense Z. An int s: low-rank Z = Z_A Z_B.
      target_layers    None: every self-attention layer. Else indices into the model's
                       self-attention layers in module order (negative counts from the end).
      init             one of INITS; ``init_std`` its scale.
      position_offset  added to the position ids of every token of a row that uses this
                       adapter (a state standing for a prefix of that many tokens: the real
                       tokens keep the positions they had after the prefix). Decoders with rotary
                       embeddings and models with learned position embeddings (GPT-2, BERT).
      modules_to_save  names (or dotted-name suffixes) of modules trained and saved with the
                       adapter as full copies, e.g. ["classifier"] or ["score"].
      seed             draws random feature maps ("favor", "exp") and low-rank Z_A.
      learn_log_scale  add a trainable per-KV-head log scale of the state (``ntk_log_scale``):
                       a state whose features overflow float32 keeps its scale in log space.
      implementation   "auto", "lse", "fused" or "naive" (ops.IMPLEMENTATIONS, or "auto": the op picks).
      exact_heads      ((layer, kv_head), ...): KV heads that also keep ``exact_tokens`` tokens
                       exactly (keys ``ntk_exact_keys`` and values ``ntk_exact_values``
                       [n, exact_tokens, D] in the layers that have such heads), e.g. the
                       retrieval heads of a compressed prompt. "exp" features only.
      exact_tokens     how many tokens each exact head keeps (required with ``exact_heads``).
      exact_bits       None (float) or 2, 4, 8: keep those tokens quantised to that many bits
                       (keys per channel, values per token, KIVI's layout;
                       ``tuner.quantized_tokens``), a fraction of the memory. Not trained.
      sink_tokens      "auto" or an int >= 0: queries at the first that many positions of the
                       sequence (the first real tokens, whatever the padding; a decoding step
                       or a later prefill chunk exempts nothing) read only the real keys and
                       send no gradient to the state. This keeps a decoder's attention sink
                       (its first token, which sees only itself) from being taken over by the
                       state on the first optimizer step. "auto": 1 in causal self-attention
                       layers (decoders), 0 elsewhere (encoders, ViTs). A state that stands
                       for real tokens before the sequence (a compressed prompt, a converted
                       prefix) uses 0: it holds the sink itself.
      gated            False: Z is a free parameter (the paper's). True: ``ntk_z`` holds each
                       feature's value U and the state reads Z = diag(kappa) U, so
                       b / a = sum_i phi_i kappa_i U_i / sum_i phi_i kappa_i is a weighted mean of
                       U's rows. With a free Z, Adam's first step makes both b and a ~lr, so
                       b / a has a norm O(1) whatever the lr; gated, the value moves by ~lr per
                       step like the mass, so the lr sets how fast the state grows. At "zeros"
                       U ~ N(0, init_std^2) and kappa = 0: still Z = 0, the base model.
    """

    feature_map: str = "elu"
    r: int | None = None
    rank: int | None = None
    target_layers: tuple[int, ...] | None = None
    init: str = "zeros"
    init_std: float = 0.02
    position_offset: int = 0
    modules_to_save: tuple[str, ...] | None = None
    seed: int = 0
    learn_log_scale: bool = False
    implementation: str = "auto"
    exact_heads: tuple[tuple[int, int], ...] | None = None
    exact_tokens: int | None = None
    exact_bits: int | None = None
    sink_tokens: int | str = "auto"
    gated: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted and frozen into tuples, so the config stays hashable and immutable.
        for name in ("target_layers", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                    raise ValueError(f"{name} must be a list of values or None, got {value!r}")
                object.__setattr__(self, name, tuple(value))
        if self.exact_heads is not None and not isinstance(self.exact_heads, (str, bytes)):
            try:
                heads = tuple(tuple(pair) for pair in self.exact_heads)
            except TypeError:
                heads = self.exact_heads
            object.__setattr__(self, "exact_heads", heads)
        self._validate()

    def _validate(self) -> None:
        from ..ops import FEATURE_MAPS  # the registry is the source of truth for names
        from ..ops.sink import check_sink_tokens

        if not isinstance(self.feature_map, str) or self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}"
            )
        _check_positive_int("r", self.r, optional=True)
        _check_positive_int("rank", self.rank, optional=True)
        if FEATURE_MAPS[self.feature_map].needs_r and self.r is None:
            raise ValueError(f"feature_map {self.feature_map!r} needs the feature dimension r")
        if self.target_layers is not None:
            if not self.target_layers:
                raise ValueError("target_layers must be None (all layers) or a non-empty list")
            for index in self.target_layers:
                if isinstance(index, bool) or not isinstance(index, int):
                    raise ValueError(f"target_layers must hold ints, got {self.target_layers!r}")
            if len(set(self.target_layers)) != len(self.target_layers):
                raise ValueError(f"target_layers has duplicates: {self.target_layers!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not (isinstance(self.init_std, (int, float)) and math.isfinite(self.init_std)) or (
            self.init_std < 0
        ):
            raise ValueError(f"init_std must be a finite number >= 0, got {self.init_std!r}")
        if isinstance(self.position_offset, bool) or not isinstance(self.position_offset, int):
            raise ValueError(f"position_offset must be an int, got {self.position_offset!r}")
        if self.position_offset < 0:
            raise ValueError(f"position_offset must be >= 0, got {self.position_offset}")
        if self.modules_to_save is not None:
            for name in self.modules_to_save:
                if not isinstance(name, str) or not name or name.startswith("."):
                    raise ValueError(
                        f"modules_to_save must hold module names, got {self.modules_to_save!r}"
                    )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.learn_log_scale, bool):
            raise ValueError(f"learn_log_scale must be a bool, got {self.learn_log_scale!r}")
        if not isinstance(self.gated, bool):
            raise ValueError(f"gated must be a bool, got {self.gated!r}")
        from ..ops import IMPLEMENTATIONS

        choices = ("auto", *sorted(IMPLEMENTATIONS))
        if self.implementation not in choices:
            raise ValueError(
                f"implementation must be one of {choices}, got {self.implementation!r}"
            )
        check_sink_tokens(self.sink_tokens, auto=True)
        self._validate_exact_heads()

    def resolve_sink_tokens(self, causal: bool) -> int:
        """sink_tokens for a layer: "auto" is 1 for causal self-attention, else 0."""
        if self.sink_tokens == "auto":
            return 1 if causal else 0
        return self.sink_tokens

    def _validate_exact_heads(self) -> None:
        from .quantized_tokens import check_bits

        check_bits(self.exact_bits)
        if self.exact_heads is None:
            if self.exact_tokens is not None:
                raise ValueError("exact_tokens is set but exact_heads is None: give both or neither")
            if self.exact_bits is not None:
                raise ValueError("exact_bits is set but exact_heads is None: it quantises their tokens")
            return
        heads = self.exact_heads
        if (
            not isinstance(heads, tuple)
            or not heads
            or not all(
                isinstance(pair, tuple) and len(pair) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair)
                for pair in heads
            )
        ):
            raise ValueError(
                f"exact_heads must be a non-empty list of (layer, kv_head) pairs of ints >= 0, "
                f"got {self.exact_heads!r}"
            )
        if len(set(heads)) != len(heads):
            raise ValueError(f"exact_heads has duplicates: {heads!r}")
        _check_positive_int("exact_tokens", self.exact_tokens, optional=False)
        from ..ops import FEATURE_MAPS

        # The kept tokens join the map's virtual tokens as more of them (NTKState reads them
        # through an ExpFeatureView), which needs a map made of virtual tokens only.
        if not FEATURE_MAPS[self.feature_map].only_virtual_tokens():
            raise ValueError(
                f"exact_heads keep tokens as exponential features: they need feature_map 'exp', "
                f"got {self.feature_map!r}"
            )
        if self.rank is not None or self.learn_log_scale:
            raise ValueError(
                "exact_heads need a dense Z and no learned log scale (rank=None, "
                "learn_log_scale=False): either would change the kept tokens"
            )

    def exact_heads_of(self, layer_index: int) -> tuple[int, ...]:
        """The KV heads of layer ``layer_index`` that keep exact tokens (sorted)."""
        if self.exact_heads is None:
            return ()
        return tuple(sorted(head for layer, head in self.exact_heads if layer == layer_index))

    def resolve_r(self, head_dim: int) -> int:
        """The feature dimension for a layer whose head dim is ``head_dim``: the r the feature
        map's constructor will use (its class's ``resolve_r``), raising what it would raise."""
        from ..ops import FEATURE_MAPS

        return FEATURE_MAPS[self.feature_map].resolve_r(head_dim, self.r, head_dim_name="head dim")

    def replace(self, **changes: Any) -> NTKConfig:
        """A copy with ``changes`` applied (validated again); this config is left as it is."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for name in ("target_layers", "modules_to_save"):
            if out[name] is not None:
                out[name] = list(out[name])
        if out["exact_heads"] is not None:
            out["exact_heads"] = [list(pair) for pair in out["exact_heads"]]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NTKConfig:
        """Inverse of :meth:`to_dict`. Unknown keys are an error (a typo must not be ignored)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an NTKConfig is read from a mapping, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NTKConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**dict(data))


def _check_positive_int(name: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
