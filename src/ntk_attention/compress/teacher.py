"""The teacher side of distillation: the prefix a state stands for, inputs to distil on, and
what every attention layer of the teacher sees and outputs for those inputs.

    prefix = prompt_prefix(model, ids)              # the prompt's KV cache, per layer
    ids = sample_continuations(model, prefix, ...)  # [N, L] tokens the model writes after it
    data = capture(model, prefix, ids)              # queries, keys, values, outputs per layer
    scores = retrieval_scores(model, prefix, prompt_ids)  # [layers, Hkv]: heads that copy from it

The teacher is the model reading the prefix's keys/values from its cache, so a prompt and a
PEFT prefix (virtual keys/values in every layer's cache) are the same thing here. Real tokens
after the prefix sit at positions m, m+1, ... (the cache length), as in the full-prompt model
and in PEFT prefix tuning.

Capture runs the model with an attention function registered for the purpose (the base
kernel, unchanged, plus a recorder), so queries and keys are recorded *after* rotary
embeddings, exactly as the attention kernel and the NTK state see them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache

from ..tuner.attention import FAMILIES, family_for_base
from ..tuner.discovery import find_attention_modules, geometry_of
from ..tuner.layer import Geometry
from .config import CompressError

__all__ = [
    "DistillData",
    "PrefixKV",
    "attention_layers",
    "capture",
    "prompt_prefix",
    "reread_windows",
    "retrieval_scores",
    "sample_continuations",
]


@dataclasses.dataclass
class PrefixKV:
    """The keys/values a state stands for.

    keys, values  [layers, Hkv, m, D], as the attention kernel sees them (a prompt's keys are
                  rotated at positions 0..m-1)
    geometry      of every attention layer (all layers share one)
    position_offset  position of the first real token after the prefix (m)
    """

    keys: torch.Tensor
    values: torch.Tensor
    geometry: Geometry
    position_offset: int

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def layers(self) -> int:
        return self.keys.shape[0]

    def kv_cache_numel(self) -> int:
        """Numbers a KV cache of this prefix holds: 2 x layers x Hkv x m x D."""
        return 2 * self.keys.numel()

    def cache(self, batch: int) -> DynamicCache:
        """A fresh cache holding the prefix for ``batch`` rows."""
        cache = DynamicCache()
        for layer in range(self.layers):
            k = self.keys[layer].unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
            v = self.values[layer].unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
            cache.update(k, v, layer)
        return cache


@dataclasses.dataclass
class DistillData:
    """What the teacher's attention layers see for N inputs of L tokens after the prefix.

    input_ids  [N, L]
    queries    [N, layers * Hq, L, D]   layer-major heads (layer l: heads l*Hq .. (l+1)*Hq-1)
    keys       [N, layers * Hkv, L, D]  the inputs' own keys (the prefix's are in PrefixKV)
    values     [N, layers * Hkv, L, D]
    outputs    [N, layers * Hq, L, D]   the teacher's attention output (prefix + causal inputs)
    mass       [layers, Hkv, m]         attention mass each prefix token received from these
                                        queries (summed over rows, query heads and positions)
    log_probs  [N, L, V] or None        the teacher's next-token log-probabilities
    """

    input_ids: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    outputs: torch.Tensor
    mass: torch.Tensor
    log_probs: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def attention_layers(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], Geometry]:
    """The model's self-attention modules (in the adapter's order) and their shared geometry."""
    layers = find_attention_modules(model)
    geometries = [geometry_of(module, index) for index, (_, module) in enumerate(layers)]
    shape = {(g.q_heads, g.kv_heads, g.head_dim, g.scale) for g in geometries}
    if len(shape) != 1:
        raise CompressError(
            "compression needs attention layers of one shape (heads, KV heads, head dim, "
            f"scale); this model has {sorted(shape)}"
        )
    return layers, geometries[0]


# --------------------------------------------------------------------------- recording
def _last_queries_probs(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities of the last queries over all keys, causal from the bottom right
    (query i of the Lq sees keys j <= Lk - Lq + i), GQA heads expanded: query [B, Hq, Lq, D],
    key [B, Hkv, Lk, D] -> [B, Hq, Lq, Lk] in float32."""
    q_len, k_len = query.shape[2], key.shape[2]
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = scale * query.float() @ k.transpose(-1, -2)
    hidden = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
    return logits.masked_fill(hidden, -torch.inf).softmax(-1)


class _Recorder:
    """Per-layer records of one forward call (``mass_queries``: how many of the last queries
    count towards the prefix-mass, None = all; ``mass_keys``: how many leading keys are the
    prefix)."""

    def __init__(self, layers: list[tuple[str, nn.Module]], mass_keys: int, mass_queries: int | None):
        self.index = {id(module): i for i, (_, module) in enumerate(layers)}
        self.mass_keys = mass_keys
        self.mass_queries = mass_queries
        self.records: dict[int, dict[str, torch.Tensor]] = {}

    def record(self, module: nn.Module, query, key, value, output, scaling: float | None) -> None:
        layer = self.index.get(id(module))
        if layer is None:
            return
        # query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D], output [B, Lq, Hq, D]
        batch, _, q_len, head_dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        scale = scaling if scaling is not None else head_dim**-0.5
        record = {
            "queries": query.detach(),
            "keys": key[:, :, k_len - q_len :].detach(),
            "values": value[:, :, k_len - q_len :].detach(),
            "outputs": output.detach().transpose(1, 2),
        }
        if self.mass_keys:
            used = q_len if self.mass_queries is None else min(self.mass_queries, q_len)
            probs = _last_queries_probs(query[:, :, q_len - used :], key, scale)[..., : self.mass_keys]
            probs = probs.reshape(batch, kv_heads, -1, used, self.mass_keys)
            record["mass"] = probs.sum(dim=(0, 2, 3))  # [Hkv, m]
        self.records[layer] = record


_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "ntk_attention_capture", default=None
)


def _capture_name(base: str) -> str:
    return f"ntk_capture_{base}"


def _make_capture_function(family):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        base = family.base_function(module)
        output, weights = base(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        recorder = _RECORDER.get()
        if recorder is not None:
            recorder.record(module, query, key, value, output, scaling)
        return output, weights

    attention.__name__ = f"{_capture_name(family.base)}_forward"
    return attention


for _family in FAMILIES.values():
    AttentionInterface.register(_capture_name(_family.base), _make_capture_function(_family))
    AttentionMaskInterface.register(_capture_name(_family.base), _family.mask_function)


@contextlib.contextmanager
def _recording(model: nn.Module, mass_keys: int, mass_queries: int | None) -> Iterator[_Recorder]:
    """Route the model's attention through the recorder for the duration of the block."""
    layers, _ = attention_layers(model)
    configs = {id(m.config): m.config for _, m in layers}
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs.values()]
    for cfg in configs.values():
        cfg._attn_implementation_internal = _capture_name(family_for_base(cfg._attn_implementation).base)
    recorder = _Recorder(layers, mass_keys, mass_queries)
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)
        for cfg, implementation in saved:
            cfg._attn_implementation_internal = implementation


def _check_recorded(recorder: _Recorder, layers: int) -> None:
    if len(recorder.records) != layers:
        raise CompressError(
            f"recorded {len(recorder.records)} of {layers} attention layers: the model does not "
            "route every layer through transformers' AttentionInterface"
        )


# --------------------------------------------------------------------------- the teacher
@torch.no_grad()
def prompt_prefix(
    model: nn.Module, input_ids: torch.Tensor, window: int = 32
) -> tuple[PrefixKV, torch.Tensor, torch.Tensor]:
    """Run the prompt once: its KV cache as a :class:`PrefixKV`, the logits after its last token
    [V], and the attention mass its last ``window`` queries put on each prompt token
    [layers, Hkv, m] (SnapKV's observation window)."""
    layers, geometry = attention_layers(model)
    ids = input_ids.reshape(1, -1).to(_device(model))
    m = ids.shape[1]
    with _recording(model, mass_keys=m, mass_queries=window) as recorder:
        out = model(input_ids=ids, use_cache=True)
    _check_recorded(recorder, len(layers))
    cache = out.past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [layers, Hkv, m, D]
    values = torch.stack([layer.values[0] for layer in cache.layers])
    window_mass = torch.stack([recorder.records[i]["mass"] for i in range(len(layers))])
    prefix = PrefixKV(keys, values, geometry, position_offset=m)
    return prefix, out.logits[0, -1].float(), window_mass


def _top_p_sample(
    logits: torch.Tensor, top_p: float, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), nucleus ``top_p``. [N, V] -> [N]."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep the smallest set whose mass reaches top_p (the first token always)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prefix: PrefixKV,
    first_logits: torch.Tensor,
    count: int,
    length: int,
    *,
    top_p: float,
    temperature: float,
    generator: torch.Generator,
    start_ids: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """[count, length] tokens the teacher writes after the prefix, sampled with nucleus
    ``top_p`` from ``generator``. ``first_logits`` [V] is its prediction for the first token
    (a prompt's last logits); or ``start_ids`` [s] are read first and begin every row (e.g. BOS
    after a PEFT prefix), then length - s tokens are sampled."""
    from tqdm.auto import tqdm

    cache = prefix.cache(count)
    device = prefix.keys.device
    start = torch.empty(count, 0, dtype=torch.long, device=device)
    if start_ids is not None and start_ids.numel():
        start = start_ids.reshape(1, -1).to(device).expand(count, -1)
        logits = model(input_ids=start, past_key_values=cache, use_cache=True).logits[:, -1]
    else:
        logits = first_logits.reshape(1, -1).expand(count, -1)
    tokens = []
    steps = length - start.shape[1]
    for step in tqdm(range(steps), desc="sampling continuations", disable=not progress):
        token = _top_p_sample(logits, top_p, temperature, generator)
        tokens.append(token)
        if step + 1 < steps:
            out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
    return torch.cat([start, torch.stack(tokens, dim=1)], dim=1)


def reread_windows(
    prompt_ids: torch.Tensor, count: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """[count, length] windows of the prompt (random starts from ``generator``), to be read
    again after it: queries that look back at the prompt's content. Empty when the prompt is
    shorter than ``length``."""
    ids = prompt_ids.reshape(-1)
    if count == 0 or ids.numel() < length:
        return ids.new_empty(0, length)
    starts = torch.randint(0, ids.numel() - length + 1, (count,), generator=generator)
    return torch.stack([ids[int(s) : int(s) + length] for s in starts])


@torch.no_grad()
def retrieval_scores(
    model: nn.Module,
    prefix: PrefixKV,
    prompt_ids: torch.Tensor,
    *,
    windows: int = 8,
    length: int = 64,
    skip: int = 4,
    chunk: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """How much each KV head copies from the prompt: [layers, Hkv] in [0, 1].

    Windows of the prompt (``windows`` of ``length`` tokens, evenly spaced) are read again after
    it. A head that retrieves (an induction or "retrieval" head) attends, from the copy of token
    i, to token i + 1 of the prompt, which tells it what comes next. The score is that attention
    probability, averaged over the window positions after the first ``skip`` (which lack the
    context to find their place) and over the KV head's query heads:

        score(l, h) = mean_{window s, j >= skip, query head of h}  p_l(query s + j -> key s + j + 1)
    """
    ids = prompt_ids.reshape(-1)
    m = prefix.length
    if ids.numel() != m:
        raise CompressError(f"the prompt has {ids.numel()} tokens, its prefix {m}")
    length = min(length, m - 1)
    if length <= skip:
        raise CompressError(
            f"retrieval scores need windows longer than skip={skip} tokens; the prompt has {m}"
        )
    count = max(1, min(windows, (m - 1) // length))
    starts = torch.linspace(0, m - 1 - length, count).round().long().unique()
    layers, g = attention_layers(model)
    groups = g.q_heads // g.kv_heads
    device = _device(model)
    total = torch.zeros(len(layers), g.kv_heads, dtype=torch.float64)
    positions = torch.arange(skip, length, device=device)
    from tqdm.auto import tqdm

    for first in tqdm(range(0, starts.numel(), chunk), desc="retrieval heads", disable=not progress):
        part = starts[first : first + chunk]
        rows = torch.stack([ids[int(s) : int(s) + length] for s in part]).to(device)
        # target[row, j]: the prompt position that followed window token j the first time
        target = (part.to(device)[:, None] + positions[None, :] + 1)  # [rows, J]
        with _recording(model, mass_keys=0, mass_queries=None) as recorder:
            model(input_ids=rows, past_key_values=prefix.cache(rows.shape[0]), use_cache=True)
        _check_recorded(recorder, len(layers))
        for layer in range(len(layers)):
            record = recorder.records[layer]
            keys = torch.cat(
                [prefix.keys[layer].unsqueeze(0).expand(rows.shape[0], -1, -1, -1), record["keys"]], 2
            )  # [B, Hkv, m + length, D]; window token j sits at key m + j and sees keys <= m + j
            probs = _last_queries_probs(record["queries"][:, :, skip:], keys, g.scale)  # [B, Hq, J, m + L]
            index = target[:, None, :, None].expand(-1, probs.shape[1], -1, 1)
            hit = probs.gather(-1, index)[..., 0]  # [B, Hq, J]
            total[layer] += hit.reshape(rows.shape[0], g.kv_heads, groups, -1).double().sum((0, 2, 3)).cpu()
    return (total / (starts.numel() * groups * positions.numel())).float()


@torch.no_grad()
def capture(
    model: nn.Module,
    prefix: PrefixKV,
    input_ids: torch.Tensor,
    *,
    log_probs: bool = False,
    chunk: int = 4,
    progress: bool = False,
) -> DistillData:
    """Run the teacher (the model reading ``prefix`` from its cache) on ``input_ids`` [N, L]
    and record every attention layer's queries, keys, values and output, and the mass each
    prefix token gets. ``chunk`` rows per forward call."""
    from tqdm.auto import tqdm

    layers, _ = attention_layers(model)
    ids = input_ids.to(_device(model))
    parts: list[dict[str, torch.Tensor]] = []
    mass = None
    for start in tqdm(range(0, ids.shape[0], chunk), desc="teacher capture", disable=not progress):
        rows = ids[start : start + chunk]
        with _recording(model, mass_keys=prefix.length, mass_queries=None) as recorder:
            out = model(input_ids=rows, past_key_values=prefix.cache(rows.shape[0]), use_cache=True)
        _check_recorded(recorder, len(layers))
        records = [recorder.records[i] for i in range(len(layers))]
        part = {
            name: torch.cat([r[name] for r in records], dim=1)  # layer-major heads
            for name in ("queries", "keys", "values", "outputs")
        }
        if log_probs:
            part["log_probs"] = torch.log_softmax(out.logits.float(), dim=-1)
        parts.append(part)
        chunk_mass = torch.stack([r["mass"] for r in records])
        mass = chunk_mass if mass is None else mass + chunk_mass
    merged = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return DistillData(
        input_ids=ids,
        queries=merged["queries"],
        keys=merged["keys"],
        values=merged["values"],
        outputs=merged["outputs"],
        mass=mass,
        log_probs=merged.get("log_probs"),
    )


def _device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
