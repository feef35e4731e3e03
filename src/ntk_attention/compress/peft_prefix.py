"""convert_prefix: a PEFT prefix-tuning adapter (P-Tuning v2: m trained keys/values in every
layer) -> an NTK-Attention adapter, by the same initialise-then-distil recipe as a prompt.

A PEFT prefix is exactly a prompt's KV cache whose tokens were trained instead of read: the
teacher is the base model with the prefix in its cache, real tokens at positions m, m+1, ...
(PEFT's convention for decoders). With ``feature_map="exp"`` and r = m the converted state *is*
the prefix (exact); smaller r or other feature maps are initialised (selection or closed form)
and distilled on inputs the teacher samples after the prefix, or on the user's own texts.

    ntk = convert_prefix("runs/prefix/adapter", base_model, tokenizer=tokenizer)
    ntk.conversion      # held-out agreement, memory and speed against the PEFT prefix, and
                        # with eval_texts=[...] the perplexity of both (the task metric of an LM)
    ntk.save_pretrained("ntk-adapter/")
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train.metrics import perplexity
from ..tuner import NTKModel
from .config import CompressConfig, CompressError
from .distill import kl_divergence
from .prompt import check_model, check_positions, compress_prefix
from .teacher import PrefixKV, attention_layers, capture, sample_continuations

__all__ = ["agreement", "convert_prefix", "read_peft_prefix", "text_perplexity"]

_PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_KEY = "prompt_embeddings"


def read_peft_prefix(
    source: str | os.PathLike | nn.Module, base_model: nn.Module, check_base_model: bool = True
) -> tuple[PrefixKV, dict[str, Any]]:
    """The prefix keys/values of a PEFT prefix-tuning adapter (a directory written by
    ``save_pretrained``, or a ``PeftModel``), checked against ``base_model``."""
    if isinstance(source, nn.Module):
        config, embeddings, where = _from_peft_model(source)
    else:
        config, embeddings, where = _from_directory(Path(source))
    if config.get("peft_type") != "PREFIX_TUNING":
        raise CompressError(
            f"{where} is a {config.get('peft_type')!r} adapter; convert_prefix reads PEFT prefix "
            "tuning adapters (peft_type 'PREFIX_TUNING')"
        )
    if config.get("num_transformer_submodules", 1) != 1:
        raise CompressError(f"{where}: encoder-decoder prefixes are not supported (decoders only)")
    layers, geometry = attention_layers(base_model)
    m = int(config["num_virtual_tokens"])
    heads, token_dim, peft_layers = (
        int(config["num_attention_heads"]), int(config["token_dim"]), int(config["num_layers"])
    )
    base_name = getattr(base_model.config, "_name_or_path", None) or None
    expected = {
        "num_layers": len(layers),
        "num_attention_heads": geometry.kv_heads,
        "token_dim": geometry.kv_heads * geometry.head_dim,
    }
    found = {"num_layers": peft_layers, "num_attention_heads": heads, "token_dim": token_dim}
    if found != expected:
        wrong = ", ".join(f"{k} {found[k]} (the base model needs {expected[k]})"
                          for k in expected if found[k] != expected[k])
        raise CompressError(
            f"{where} is a prefix for another base model ({config.get('base_model_name_or_path')!r}"
            f"): {wrong}; the base model given is {base_name or type(base_model).__name__!r}"
        )
    saved_name = config.get("base_model_name_or_path")
    if check_base_model and saved_name and base_name and Path(saved_name).name != Path(base_name).name:
        raise CompressError(
            f"{where} was trained on base model {saved_name!r}, but the base model given is "
            f"{base_name!r}; pass check_base_model=False (--no-base-check) if they are the same"
        )
    if tuple(embeddings.shape) != (m, 2 * peft_layers * token_dim):
        raise CompressError(
            f"{where}: {_PEFT_KEY} has shape {tuple(embeddings.shape)}, expected "
            f"({m}, {2 * peft_layers * token_dim}) from its config"
        )
    # PEFT's get_prompt: view [m, layers * 2, H, D], permute to [layers * 2, H, m, D]; entry
    # 2l is layer l's keys, 2l + 1 its values.
    device = next(base_model.parameters()).device
    dtype = next(base_model.parameters()).dtype
    kv = embeddings.reshape(m, 2 * peft_layers, heads, geometry.head_dim).permute(1, 2, 0, 3)
    kv = kv.to(device=device, dtype=dtype)
    prefix = PrefixKV(kv[0::2].contiguous(), kv[1::2].contiguous(), geometry, position_offset=m)
    return prefix, {"source": where, "num_virtual_tokens": m, "base_model_name_or_path": saved_name}


def _from_directory(path: Path) -> tuple[dict, torch.Tensor, str]:
    config_file, weights_file = path / _PEFT_CONFIG, path / _PEFT_WEIGHTS
    if not config_file.is_file():
        raise CompressError(f"no {_PEFT_CONFIG} in {path} (is it a PEFT adapter directory?)")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompressError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CompressError(f"{config_file} must hold a JSON object")
    if config.get("peft_type") != "PREFIX_TUNING":
        return config, torch.empty(0), str(path)
    if not weights_file.is_file():
        raise CompressError(f"no {_PEFT_WEIGHTS} in {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CompressError(f"{weights_file} is not a readable safetensors file: {err}") from err
    if _PEFT_KEY not in tensors:
        raise CompressError(f"{weights_file} has no {_PEFT_KEY!r} tensor; found {sorted(tensors)}")
    return config, tensors[_PEFT_KEY].float(), str(path)


def _from_peft_model(model: nn.Module) -> tuple[dict, torch.Tensor, str]:
    if not hasattr(model, "peft_config") or not hasattr(model, "get_prompt_embedding_to_save"):
        raise CompressError(
            f"source must be a PEFT adapter directory or a PeftModel, got {type(model).__name__}"
        )
    name = model.active_adapter
    peft_config = model.peft_config[name]
    config = peft_config.to_dict()
    config["peft_type"] = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    if config["peft_type"] != "PREFIX_TUNING":
        return config, torch.empty(0), f"PeftModel adapter {name!r}"
    with torch.no_grad():
        embeddings = model.get_prompt_embedding_to_save(name).float()
    return config, embeddings, f"PeftModel adapter {name!r}"


def _input_rows(
    inputs: torch.Tensor | Sequence[str], tokenizer: Any, length: int, what: str = "inputs"
) -> torch.Tensor:
    """Distillation (or evaluation) inputs as [N, length] ids: a tensor as is, texts cut into
    windows. ``what`` names the argument in errors."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 2 or inputs.is_floating_point() or inputs.shape[0] == 0:
            raise CompressError(
                f"inputs must be token ids [N, L] (N >= 1), got {tuple(inputs.shape)} {inputs.dtype}"
            )
        return inputs.long()
    if tokenizer is None:
        raise CompressError(f"text {what} need a tokenizer")
    rows = []
    for text in inputs:
        ids = tokenizer(text)["input_ids"]
        rows += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    if not rows:
        raise CompressError(f"no text of {what} is {length} tokens long (sample_length={length})")
    return torch.tensor(rows, dtype=torch.long)


def _start_ids(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    for owner in (tokenizer, model.config, getattr(model, "generation_config", None)):
        token = getattr(owner, "bos_token_id", None) if owner is not None else None
        if isinstance(token, int):
            return torch.tensor([token])
    return torch.tensor([0])


def agreement(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> dict[str, float]:
    """Mean KL(teacher || student) and top-1 agreement over all positions ([N, L, V] each)."""
    kl = kl_divergence(teacher_log_probs, student_log_probs)
    top1 = (teacher_log_probs.argmax(-1) == student_log_probs.argmax(-1)).float()
    return {"kl": kl.mean().item(), "top1": top1.mean().item()}


def convert_prefix(
    source: str | os.PathLike | nn.Module,
    base_model: nn.Module,
    *,
    tokenizer: Any = None,
    inputs: torch.Tensor | Sequence[str] | None = None,
    config: CompressConfig | None = None,
    steps: int | None = None,
    seed: int = 0,
    held_out: int = 4,
    eval_texts: Sequence[str] | None = None,
    check_base_model: bool = True,
    progress: bool = True,
) -> NTKModel:
    """Convert a PEFT prefix-tuning adapter into an NTK-Attention adapter of ``base_model``.

    ``source``: the adapter's directory or a ``PeftModel`` (its active adapter). The teacher is
    ``base_model`` with the prefix in its cache. Distillation inputs: ``inputs`` (token ids
    [N, L], or texts cut into windows of ``config.sample_length`` tokens), else continuations
    the teacher samples after the prefix from BOS. ``held_out`` further samples (another seed)
    measure the agreement reported in ``ntk.conversion``: KL(PEFT || NTK) and top-1 agreement
    of the next-token distributions, the state's size against the prefix's KV cache, and the
    forward time of both. ``eval_texts`` (held-out texts, cut into windows of
    ``config.sample_length`` tokens; needs ``tokenizer``) add the language-modelling metric
    before and after: the perplexity of the PEFT-prefixed model, of the NTK model and of the
    base model alone on them. Returns ``base_model`` wrapped as an NTKModel (as compress_prompt).
    """
    config = CompressConfig() if config is None else config
    if not isinstance(config, CompressConfig):
        raise CompressError(f"config must be a CompressConfig, got {type(config).__name__}")
    if steps is not None:
        config = config.replace(steps=steps)
    check_model(base_model)
    prefix, info = read_peft_prefix(source, base_model, check_base_model)
    check_positions(base_model, prefix.length, config.sample_length, "prefix")
    base_model.eval()
    device = prefix.keys.device
    started = time.perf_counter()
    start = _start_ids(base_model, tokenizer)
    sample = {"top_p": config.top_p, "temperature": config.temperature, "start_ids": start, "progress": progress}
    if inputs is None:
        rows = sample_continuations(
            base_model, prefix, None, config.samples, config.sample_length,
            generator=torch.Generator(device=device).manual_seed(seed), **sample,
        ).cpu()
    else:
        rows = _input_rows(inputs, tokenizer, config.sample_length)
    check_positions(base_model, prefix.length, rows.shape[1], "prefix")
    eval_rows = None
    if eval_texts is not None:
        if isinstance(eval_texts, (str, torch.Tensor)):
            raise CompressError("eval_texts must be a list of texts")
        eval_rows = _input_rows(eval_texts, tokenizer, config.sample_length, "eval_texts")
    held = sample_continuations(
        base_model, prefix, None, held_out, rows.shape[1],
        generator=torch.Generator(device=device).manual_seed(seed + 1_000_003), **sample,
    ).cpu()
    timings = {"sample": time.perf_counter() - started}
    teacher_held = capture(base_model, prefix, held, log_probs=True).log_probs
    teacher_seconds = _forward_seconds(lambda: base_model(
        input_ids=held[:1].to(device), past_key_values=prefix.cache(1)))

    ntk = compress_prefix(
        base_model, prefix, rows, config=config, seed=seed, progress=progress,
        timings=timings, started=started,
    )
    with torch.no_grad():
        student = torch.log_softmax(ntk(input_ids=held.to(device)).logits.float(), -1)
    ntk_seconds = _forward_seconds(lambda: ntk(input_ids=held[:1].to(device)))
    report = ntk.compression
    ntk.conversion = {
        **info,
        "held_out": {"rows": held_out, "tokens": held.shape[1], **agreement(teacher_held, student)},
        "memory": {
            "prefix_kv_numel": report.kv_cache_numel,
            "state_numel": report.state_numel,
            "fraction": report.memory_fraction,
        },
        "forward_seconds": {"peft_prefix": teacher_seconds, "ntk": ntk_seconds,
                            "batch": 1, "tokens": held.shape[1]},
    }
    if eval_rows is not None:
        rows_on = eval_rows.to(device)
        ntk_perplexity = text_perplexity(lambda ids: ntk(input_ids=ids).logits, rows_on)
        with ntk.disable_adapter():  # the base model: alone, and with the PEFT prefix in its cache
            base = text_perplexity(lambda ids: ntk(input_ids=ids).logits, rows_on)
            peft_prefix = text_perplexity(lambda ids: base_model(
                input_ids=ids, past_key_values=prefix.cache(ids.shape[0])).logits, rows_on)
        ntk.conversion["eval_text"] = {
            "windows": eval_rows.shape[0], "tokens": eval_rows.shape[1],
            "perplexity": {"peft_prefix": peft_prefix, "ntk": ntk_perplexity, "base": base},
        }
    return ntk


@torch.no_grad()
def text_perplexity(logits_of, rows: torch.Tensor, chunk: int = 4) -> float:
    """exp(mean next-token NLL) over ``rows`` [N, L] of token ids, ``logits_of(ids)`` -> [n, L, V]:
    every position but the first of a row is predicted from the ones before it."""
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], chunk):
        ids = rows[start : start + chunk]
        log_probs = torch.log_softmax(logits_of(ids)[:, :-1].float(), -1)
        total -= log_probs.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
    return perplexity(total, count)


@torch.no_grad()
def _forward_seconds(call, repeats: int = 3) -> float:
    """Median wall time of ``call()`` over ``repeats`` runs (after one warm-up)."""
    call()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]
