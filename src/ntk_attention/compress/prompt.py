"""compress_prompt: a long prompt -> a small trained NTK-Attention state, so that the model
reads a continuation *alone* as if the prompt preceded it.

    ntk = compress_prompt(model, tokenizer, long_text)     # 1/8 of the prompt's KV cache
    ntk.generate(**tokenizer("Question: ...", return_tensors="pt"))
    ntk.save_pretrained("prompt-state/")

Recipe (docs/results/REPORT.md section 5: a closed-form state of a real prompt is worse than dropping it, a
trained one works):
  1. teacher = the model with the prompt in its cache; inputs to distil on are continuations
     the teacher samples after the prompt and windows of the prompt read again: never the text
     the state will be evaluated on;
  2. initialise the state from the prompt (exp: its own keys/values chosen by the attention
     mass those inputs put on them, the first ``sink`` tokens always, and the retrieval heads
     (the KV heads that copy most from the prompt when it is read again) keep every prompt
     token; elu: an exact sink beside a zero linear state; favor/taylor: the closed form);
  3. distil layer-wise (attention outputs), then optionally end to end (KL on the logits);
     skipped when the state already is the prompt (exp features holding every prompt token).
The adapter shifts the continuation's positions by the prompt length (``position_offset``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from ..ops import FEATURE_MAPS as MAP_CLASSES
from ..tuner import NTKModel, get_ntk_model
from .chat import system_prompt_ids
from .config import CompressConfig, CompressError
from .distill import distil_end_to_end, distil_layers
from .initial_state import adapter_numel, initialise, ntk_config_for
from .teacher import (
    DistillData,
    PrefixKV,
    attention_layers,
    capture,
    prompt_prefix,
    reread_windows,
    retrieval_scores,
    sample_continuations,
)

__all__ = ["CompressionReport", "choose_exact_heads", "compress_prefix", "compress_prompt", "prompt_ids"]


@dataclasses.dataclass
class CompressionReport:
    """What :func:`compress_prompt` did; kept on the returned model as ``ntk.compression``."""

    prefix_tokens: int
    feature_map: str
    r: int
    rank: int | None
    state_numel: int
    kv_cache_numel: int
    exact_heads: list[list[int]]  # [layer, KV head] pairs that keep every prefix token
    layer_losses: list[float]
    end_to_end_losses: list[float]
    seconds: dict[str, float]
    config: dict[str, Any]
    seed: int
    # the prompt was a chat model's system turn: later turns go in through
    # compress.chat.turns_after_system_ids (compress_prompt(..., chat=True))
    chat: bool = False

    @property
    def memory_fraction(self) -> float:
        return self.state_numel / self.kv_cache_numel

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "memory_fraction": self.memory_fraction}


def prompt_ids(tokenizer: Any, prompt: str | torch.Tensor) -> torch.Tensor:
    """The prompt as 1-D token ids (text is tokenized with the tokenizer's defaults)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CompressError("the prompt is empty: nothing to compress")
        if tokenizer is None:
            raise CompressError("a text prompt needs a tokenizer (or pass token ids)")
        ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    elif isinstance(prompt, torch.Tensor):
        if prompt.is_floating_point() or prompt.is_complex():
            raise CompressError(f"prompt token ids must be integers, got dtype {prompt.dtype}")
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1:
            raise CompressError(
                f"prompt token ids must be 1-D [m] (or [1, m]), got shape {tuple(prompt.shape)}"
            )
        ids = prompt.long()
    else:
        raise CompressError(f"prompt must be text or a 1-D tensor of token ids, got {type(prompt).__name__}")
    if ids.numel() == 0:
        raise CompressError("the prompt is empty (0 tokens): nothing to compress")
    return ids


def check_model(model: nn.Module) -> None:
    if isinstance(model, NTKModel):
        raise CompressError("model is already an NTKModel: pass its base model (ntk.unload())")
    if not callable(getattr(model, "generate", None)) or not hasattr(model, "config"):
        raise CompressError(
            f"compression needs a causal language model (transformers, with generate()), got "
            f"{type(model).__name__}"
        )
    attention_layers(model)


def check_positions(model: nn.Module, prefix_tokens: int, continuation: int, what: str) -> None:
    """The prefix plus the distillation inputs must fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if limit is None:
        return
    if prefix_tokens >= limit:
        raise CompressError(
            f"the {what} has {prefix_tokens} tokens, but the model has only {limit} positions "
            "(max_position_embeddings): shorten it"
        )
    if prefix_tokens + continuation > limit:
        raise CompressError(
            f"the {what} ({prefix_tokens} tokens) plus sample_length={continuation} reaches "
            f"position {prefix_tokens + continuation}, past the model's {limit} positions "
            "(max_position_embeddings): shorten it or lower sample_length"
        )


def compress_prompt(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | torch.Tensor,
    *,
    config: CompressConfig | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    chat: bool = False,
) -> NTKModel:
    """Compress ``prompt`` (text, or 1-D token ids) into an NTK-Attention state of ``model``.

    ``chat=True``: ``prompt`` is the system prompt of an instruct model, compressed as the
    system turn its chat template renders (``compress.chat``); feed the later turns through
    ``compress.chat.turns_after_system_ids(tokenizer, messages)``.

    Returns ``model`` wrapped as an :class:`NTKModel` (adapter "default", the base frozen, as
    ``get_ntk_model`` does) whose forward and ``generate()`` on a continuation alone behave as
    the model with the prompt in front (positions included). ``steps`` overrides
    ``config.steps`` (layer-wise distillation). Deterministic for a ``seed`` (on one machine and
    thread count). ``ntk.compression`` holds a :class:`CompressionReport`.
    """
    config = CompressConfig() if config is None else config
    if not isinstance(config, CompressConfig):
        raise CompressError(f"config must be a CompressConfig, got {type(config).__name__}")
    if steps is not None:
        config = config.replace(steps=steps)
    check_model(model)
    if chat:
        if not isinstance(prompt, str):
            raise CompressError("chat=True takes the system prompt as text")
        ids = system_prompt_ids(tokenizer, prompt)
    else:
        ids = prompt_ids(tokenizer, prompt)
    check_positions(model, ids.numel(), config.sample_length, "prompt")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    prefix, first_logits, _ = prompt_prefix(model, ids)
    sampled = sample_continuations(
        model, prefix, first_logits, config.samples, config.sample_length,
        top_p=config.top_p, temperature=config.temperature,
        generator=_device_generator(model, seed), progress=progress,
    )
    rereads = reread_windows(ids, config.rereads, config.sample_length, generator)
    inputs = torch.cat([sampled.cpu(), rereads])
    timings["sample"] = time.perf_counter() - started
    retrieval = None
    if config.exact_head_count(prefix.layers * prefix.geometry.kv_heads, prefix.kv_cache_numel(),
                               prefix.geometry.head_dim):
        mark = time.perf_counter()
        try:
            retrieval = retrieval_scores(model, prefix, ids, length=config.sample_length,
                                         progress=progress)
        except CompressError:
            if config.exact_heads is not None:  # asked for: say why it cannot be done
                raise
            retrieval = None  # auto: a prompt too short to re-read keeps no exact heads
        timings["retrieval_scores"] = time.perf_counter() - mark
    ntk = compress_prefix(
        model, prefix, inputs, config=config, seed=seed, progress=progress,
        generator=generator, timings=timings, started=started, retrieval=retrieval,
    )
    ntk.compression.chat = chat
    return ntk


@torch.no_grad()
def exact_prompt_state(
    model: nn.Module, prompt_token_ids: torch.Tensor, *, seed: int = 0, **config_fields: Any
) -> NTKModel:
    """``model`` wrapped as an :class:`NTKModel` whose state *is* the prompt: its KV cache
    copied into m = len(prompt) exp virtual tokens per layer and KV head (W = keys, Z = values,
    kappa = 1), real tokens shifted by m (``position_offset``) and every query reading the
    state (``sink_tokens`` 0: the prompt's own first token is the sink). No distillation: the
    model reads a continuation exactly as it would after the prompt. A warm start for
    fine-tuning ("prompt -> state -> fine-tune": the state starts as real text instead of at
    zero); ``config_fields`` are added to the NTKConfig (e.g. ``modules_to_save``)."""
    check_model(model)
    ids = prompt_ids(None, prompt_token_ids)
    check_positions(model, ids.numel(), 1, "prompt")
    was_training = model.training
    model.eval()
    prefix, _, mass = prompt_prefix(model, ids)
    config = CompressConfig(feature_map="exp", memory_fraction=None, exact_heads=0)
    ntk = get_ntk_model(model, ntk_config_for(config, prefix, seed=seed).replace(**config_fields))
    initialise(ntk, prefix, config, mass)
    model.train(was_training)
    return ntk


def choose_exact_heads(
    config: CompressConfig, prefix: PrefixKV, retrieval: torch.Tensor | None
) -> tuple[tuple[int, int], ...]:
    """The (layer, KV head) pairs that keep the whole prefix: the ``config.exact_head_count``
    heads with the highest retrieval scores [layers, Hkv] (in layer, head order)."""
    count = config.exact_head_count(prefix.layers * prefix.geometry.kv_heads,
                                    prefix.kv_cache_numel(), prefix.geometry.head_dim)
    if not count:
        return ()
    if retrieval is None:
        if config.exact_heads is None:  # auto: nothing to choose them by (e.g. a PEFT prefix)
            return ()
        raise CompressError(
            f"exact_heads={config.exact_heads} needs the prefix's tokens to find the retrieval "
            "heads (a prompt re-read); this prefix has none: use exact_heads=0"
        )
    kv_heads = retrieval.shape[1]
    top = retrieval.flatten().topk(count).indices.sort().values
    return tuple((int(i) // kv_heads, int(i) % kv_heads) for i in top)


def compress_prefix(
    model: nn.Module,
    prefix: PrefixKV,
    inputs: torch.Tensor,
    *,
    config: CompressConfig,
    seed: int,
    progress: bool,
    generator: torch.Generator | None = None,
    timings: dict[str, float] | None = None,
    started: float | None = None,
    data: DistillData | None = None,
    retrieval: torch.Tensor | None = None,
) -> NTKModel:
    """Steps 2-3 of the recipe for any prefix (a prompt's cache or a PEFT prefix): capture the
    teacher on ``inputs`` [N, L], build and initialise the state, distil it. ``retrieval``
    [layers, Hkv] (teacher.retrieval_scores) chooses the exact heads of an exp state."""
    generator = generator or torch.Generator().manual_seed(seed)
    timings = {} if timings is None else timings
    started = time.perf_counter() if started is None else started
    exact_heads = choose_exact_heads(config, prefix, retrieval)
    ntk_config = ntk_config_for(config, prefix, seed=seed, exact_heads=exact_heads)
    mark = time.perf_counter()
    if data is None:
        data = capture(
            model, prefix, inputs, log_probs=config.e2e_steps > 0, progress=progress
        )
    timings["teacher"] = time.perf_counter() - mark

    mark = time.perf_counter()
    ntk = get_ntk_model(model, ntk_config)
    try:
        kept = initialise(ntk, prefix, config, data.mass)
        # Every prefix token copied into virtual tokens of a map made of nothing else: the
        # state is the prefix, exactly. Training it could only add Adam's lr-sized steps on
        # gradients of rounding noise.
        exact = (
            MAP_CLASSES[ntk_config.feature_map].only_virtual_tokens()
            and kept.shape[-1] == prefix.length
        )
        timings["initialise"] = time.perf_counter() - mark
        mark = time.perf_counter()
        layer_losses = []
        if config.steps and not exact:
            layer_losses = distil_layers(
                ntk, data, steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                generator=generator, progress=progress,
            )
        timings["layer_wise"] = time.perf_counter() - mark
        mark = time.perf_counter()
        e2e_losses = []
        if config.e2e_steps and not exact:
            e2e_losses = distil_end_to_end(
                ntk, data, steps=config.e2e_steps, lr=config.e2e_lr,
                batch_size=config.e2e_batch_size, generator=generator, progress=progress,
            )
        timings["end_to_end"] = time.perf_counter() - mark
    except BaseException:
        ntk.unload()
        raise
    timings["total"] = time.perf_counter() - started
    layers = prefix.layers
    ntk.compression = CompressionReport(
        prefix_tokens=prefix.length,
        feature_map=ntk_config.feature_map,
        r=ntk_config.resolve_r(prefix.geometry.head_dim),
        rank=ntk_config.rank,
        state_numel=adapter_numel(ntk_config, prefix.geometry, layers),
        kv_cache_numel=prefix.kv_cache_numel(),
        exact_heads=[list(pair) for pair in exact_heads],
        layer_losses=layer_losses,
        end_to_end_losses=e2e_losses,
        seconds=timings,
        config=config.to_dict(),
        seed=seed,
    )
    return ntk


def _device_generator(model: nn.Module, seed: int) -> torch.Generator:
    device = next(model.parameters()).device
    return torch.Generator(device=device).manual_seed(seed)
