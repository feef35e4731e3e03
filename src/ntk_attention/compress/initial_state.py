"""The state a prefix is compressed into: its adapter config sized to a memory budget, and its
initial values written into an :class:`NTKModel`.

Sizing counts every tensor the adapter stores (parameters and buffers) by building one layer's
state and counting it, so the count cannot drift from what ``save_pretrained`` writes.

Initialisation, per layer and KV head (a state is attention over virtual tokens plus, for
kernel maps, a linear-attention part):

    exp       slot i = prompt token idx_i exactly: W_i = k_idx, b_i = 0, kappa_i = 1, Z_i = v_idx
              (idx: the sink, then by attention mass); spare slots get kappa = 0. Exact
              (retrieval) heads keep every prompt token in ntk_exact_keys / ntk_exact_values,
              and their virtual-token slots start empty (kappa = 0, Z = 0)
    elu       ELU part: 0 ("zeros") or the closed form over the non-sink tokens; the exp part
              ("elu+exp") holds the sink tokens exactly
    favor/taylor  closed form Z = sum phi(k_i) v_i^T, kappa = sum phi(k_i) (or zeros)

A low-rank Z = Z_A Z_B is set from the dense one by a truncated SVD (exact when its rank
allows); directions with a zero singular value get a random Z_A column and a zero Z_B row, so
both factors train (as LoRA's A and B).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from ..ops import FEATURE_MAPS as MAP_CLASSES
from ..ops import prefix_to_state
from ..tuner import NTKConfig, NTKModel, NTKState, adapter_feature_map, read_state, write_state
from ..tuner.layer import Geometry
from ..tuner.quantized_tokens import stored_numbers
from .config import CompressConfig, CompressError
from .teacher import PrefixKV, attention_layers
from .token_selection import by_mass

__all__ = ["adapter_numel", "initialise", "ntk_config_for"]


def adapter_numel(config: NTKConfig, geometry: Geometry, layers: int) -> int:
    """Numbers the adapter stores for ``layers`` layers of this geometry (parameters + buffers),
    the exact heads' kept tokens (in the layers that have them) included; a byte of quantised
    codes counts half a number (tuner.quantized_tokens.stored_numbers)."""

    def stored(layer_config: NTKConfig, layer_index: int) -> int:
        state = NTKState(dataclasses.replace(geometry, layer_index=layer_index))
        state.add_adapter("size", layer_config, torch.device("cpu"))
        return math.ceil(sum(stored_numbers(t) for t in state.adapter_tensors("size").values()))

    plain = config.replace(exact_heads=None, exact_tokens=None, exact_bits=None)
    total = layers * stored(plain, 0)
    for layer in sorted({layer for layer, _ in config.exact_heads or ()}):
        total += stored(config, layer) - stored(plain, layer)
    return total


def ntk_config_for(
    config: CompressConfig,
    prefix: PrefixKV,
    seed: int = 0,
    exact_heads: tuple[tuple[int, int], ...] | None = None,
) -> NTKConfig:
    """The adapter config for compressing ``prefix`` as ``config`` says, within its budget.
    ``exact_heads`` ((layer, KV head), ...) keep all m prefix tokens (exp only); the virtual
    tokens get what is left of the budget."""
    g, layers, m = prefix.geometry, prefix.layers, prefix.length
    sink = config.resolved_sink
    # sink_tokens=0: the state stands for real tokens before the sequence, the sink among them
    # (kept exactly), so every query must read it, the first one included.
    base = {"position_offset": prefix.position_offset, "seed": seed, "sink_tokens": 0}
    if exact_heads:  # NTKConfig checks they fit the feature map
        base.update(exact_heads=tuple(exact_heads), exact_tokens=m, exact_bits=config.exact_bits)
    name, r = config.feature_map, config.r
    cls = MAP_CLASSES[name]
    if sink and not cls.has_virtual_tokens and cls.virtual_token_variant is not None:
        # elu: its D features, then the sink tokens as virtual tokens ("elu+exp")
        name, r = cls.virtual_token_variant, cls.resolve_r(g.head_dim) + sink
    elif cls.only_virtual_tokens() and r is None and not config.limited:
        r = m  # no limit: every prompt token (the exact prefix)
    cls = MAP_CLASSES[name]
    budget = config.budget(prefix.kv_cache_numel())

    def size(**changes) -> int:
        return adapter_numel(NTKConfig(feature_map=name, **{**base, "r": r, "rank": config.rank, **changes}), g, layers)

    if budget is not None and exact_heads and r is None:  # r is sized from what they leave
        kept = len(exact_heads) * config.exact_head_numel(m, g.head_dim)
        if kept >= budget:
            raise CompressError(
                f"{len(exact_heads)} exact heads keep {kept:,} numbers, the whole memory budget "
                f"({budget:,}, {config.budget_text()}): lower exact_heads or raise the budget"
            )
    if budget is not None and r is None and not cls.fixed_r:  # r is the size to fit
        r = _largest(lambda value: size(r=value), budget, f"one {name} feature")
        slots = len(cls.virtual_token_slots(g.head_dim, r))
        if cls.has_virtual_tokens and slots < sink:
            raise CompressError(
                f"{config.budget_text()} leaves room for {slots} virtual tokens, fewer than "
                f"sink={sink}: raise the budget or lower sink"
            )
    rank = config.rank
    # Compression's sizing rule for the ELU state (CompressConfig's docstring): its r is the
    # head dim, so a low-rank Z is what fits it to the budget. Taylor's r = 1 + D + D^2 is left
    # dense and reported as too large below, so this is a choice about elu, not a capability.
    if budget is not None and rank is None and config.feature_map == "elu" and size() > budget:
        rank = _largest(lambda value: size(rank=value), budget, "a rank-1 Z")
    ntk_config = NTKConfig(feature_map=name, r=r, rank=rank, **base)
    total = adapter_numel(ntk_config, g, layers)
    if budget is not None and total > budget and config.r is None and config.rank is None:
        raise CompressError(
            f"a {name!r} state takes {total:,} numbers = {total / prefix.kv_cache_numel():.3g} of "
            f"the prefix's KV cache ({prefix.kv_cache_numel():,}); {config.budget_text()} allows "
            f"{budget:,}. Pass memory_fraction=None (and no memory_bytes) to use it anyway"
        )
    return ntk_config


def _largest(size_of, budget: int, what: str) -> int:
    """The largest n >= 1 with size_of(n) <= budget (size_of is affine in n)."""
    one, two = size_of(1), size_of(2)
    if one > budget:
        raise CompressError(
            f"the memory budget ({budget:,} numbers) is smaller than {what} needs ({one:,}): "
            "raise memory_fraction or memory_bytes"
        )
    step = two - one
    n = 1 + (budget - one) // step if step > 0 else 1
    while n > 1 and size_of(n) > budget:  # guard against any non-affine term
        n -= 1
    return n


@torch.no_grad()
def initialise(
    ntk: NTKModel,
    prefix: PrefixKV,
    config: CompressConfig,
    mass: torch.Tensor | None,
    adapter_name: str = "default",
    selection: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the initial state of ``adapter_name`` (see the module docstring). ``mass``
    [layers, Hkv, m] ranks the prompt's tokens for exp's "select"; ``selection`` [layers, Hkv,
    n] overrides the choice. Returns the exactly kept token indices [layers, Hkv, n]."""
    layers, g = attention_layers(ntk.base_model)
    ntk_config = ntk.peft_config[adapter_name]
    name = ntk_config.feature_map
    cls = MAP_CLASSES[name]
    r = ntk_config.resolve_r(g.head_dim)
    init, sink, m = config.resolved_init, config.resolved_sink, prefix.length
    if len(layers) != prefix.layers:
        raise CompressError(f"the prefix has {prefix.layers} layers, the model {len(layers)}")

    slots = cls.virtual_token_slots(g.head_dim, r)  # where exactly kept tokens go
    slot_count = len(slots)
    if selection is None:
        if cls.only_virtual_tokens() and init == "select":
            if mass is None:
                raise CompressError("init 'select' needs the attention mass of the prompt's tokens")
            selection = by_mass(mass, slot_count, sink)
        else:
            kept = torch.arange(min(sink, m, slot_count))
            selection = kept.expand(prefix.layers, g.kv_heads, -1)
    if selection.shape[-1] > slot_count:
        raise CompressError(
            f"{selection.shape[-1]} exact tokens do not fit the {slot_count} exponential slots "
            f"of a {name!r} state with r={r}"
        )

    for layer, (_, module) in enumerate(layers):
        current = read_state(module, adapter_name)
        keys = prefix.keys[layer].float().cpu()  # [Hkv, m, D]
        values = prefix.values[layer].float().cpu()
        z = torch.zeros(g.kv_heads, r, g.head_dim)
        kappa = torch.zeros(g.kv_heads, r)
        kernel = adapter_feature_map(module, adapter_name).kernel_map()
        if init == "closed_form" and kernel is not None:
            # The kernel features (the first kernel.r) over the tokens not kept exactly in
            # virtual tokens (those come first; none for a map without virtual tokens).
            phi = copy.deepcopy(kernel).cpu().float()
            rest = slice(selection.shape[-1], m)
            z_kernel, kappa_kernel = prefix_to_state(keys[:, rest], values[:, rest], phi)
            z[:, : phi.r], kappa[:, : phi.r] = z_kernel, kappa_kernel
        index = selection[layer].cpu()  # [Hkv, n]
        n = index.shape[-1]
        virtual = {}
        if n:
            gather = index.unsqueeze(-1).expand(-1, -1, g.head_dim)
            start = slots.start
            z[:, start : start + n] = values.gather(1, gather)
            kappa[:, start : start + n] = 1.0
            weight = current["virtual_keys"]
            weight[:, :n] = keys.gather(1, gather).to(weight)
            virtual = {
                "virtual_keys": weight, "virtual_bias": torch.zeros_like(current["virtual_bias"])
            }
        heads = ntk_config.exact_heads_of(layer)
        if heads:
            if ntk_config.exact_tokens != m:
                raise CompressError(
                    f"the adapter's exact heads keep {ntk_config.exact_tokens} tokens, the prefix "
                    f"has {m}"
                )
            index = torch.tensor(heads)
            write_state(module, adapter_name, exact_keys=keys[index], exact_values=values[index])
            z[index], kappa[index] = 0.0, 0.0  # their virtual tokens start empty
        z_fields = _z_fields(current, z, ntk_config, seed=ntk_config.seed * 7919 + layer)
        write_state(module, adapter_name, {**virtual, **z_fields}, kappa=kappa)
    return selection


def _z_fields(current: dict, z: torch.Tensor, config: NTKConfig, seed: int) -> dict:
    """The state fields that set Z: dense ``z``, or ``z_a``/``z_b`` by a truncated SVD."""
    if "z" in current:
        return {"z": z}
    rank = config.rank
    u, s, vh = torch.linalg.svd(z.double(), full_matrices=False)  # [H, r, k], [H, k], [H, k, D]
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    keep = min(rank, s.shape[-1])
    z_a = torch.zeros(z.shape[0], z.shape[1], rank, dtype=torch.float64)
    z_b = torch.zeros(z.shape[0], rank, z.shape[2], dtype=torch.float64)
    root = s.clamp_min(0).sqrt()
    z_a[..., :keep] = u * root.unsqueeze(-2)
    z_b[..., :keep, :] = vh * root.unsqueeze(-1)
    # Zero directions (and ranks beyond min(r, D)): random Z_A column, zero Z_B row.
    dead = torch.ones(z.shape[0], rank, dtype=torch.bool)
    dead[..., :keep] = s <= s.amax(-1, keepdim=True).clamp_min(1e-30) * 1e-12
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(z_a.shape, generator=generator, dtype=torch.float64) / math.sqrt(z.shape[1])
    z_a = torch.where(dead.unsqueeze(-2), noise, z_a)
    z_b = torch.where(dead.unsqueeze(-1), torch.zeros_like(z_b), z_b)
    return {"z_a": z_a, "z_b": z_b}
