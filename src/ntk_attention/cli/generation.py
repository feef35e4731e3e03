"""``ntk-attention generate``: continue prompts with a base causal LM and NTK-Attention adapters
(a fine-tuned state, a compressed prompt), without writing Python.

    ntk-attention generate --model smollm2-135m --adapter runs/state --prompt " The"
    ntk-attention generate --model M --adapter A --adapter B --prompt "x" --prompt "y"

One prompt streams its tokens as they come (transformers' ``TextStreamer``). Several prompts
are one left-padded batch; with as many adapters as prompts, row i reads adapter i (per-row
adapters, one forward for all), with one adapter every row reads it. ``--chat`` formats each
prompt as a user turn with the tokenizer's chat template.
"""

from __future__ import annotations

import argparse

from .common import InputError, quiet_transformers, set_threads

__all__ = ["add_generate", "run_generate"]


def add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="local causal LM directory, or a name such as smollm2-135m")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="an NTK-Attention adapter folder (or Hub id); repeat for one per "
                        "prompt (default: none, the base model)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue; repeat for a batch")
    parser.add_argument("--chat", action="store_true",
                        help="format each prompt as a user turn with the model's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="tokens to generate per prompt (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available), cpu or cuda[:i] (default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")


def run_generate(args: argparse.Namespace) -> int:
    from .compression import _load_model

    adapters, prompts = args.adapter, args.prompt
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if len(adapters) > 1 and len(adapters) != len(prompts):
        raise InputError(f"{len(adapters)} adapters for {len(prompts)} prompts: give one "
                            "adapter, or one per prompt")
    if any(not prompt.strip() for prompt in prompts):
        raise InputError("a --prompt is empty: nothing to continue")
    quiet_transformers()
    set_threads(args.threads)
    model, tokenizer, _ = _load_model(args.model, args.device, "--model")
    names = None
    if adapters:
        from ..tuner import NTKModel

        model = NTKModel.from_pretrained(model, adapters[0], adapter_name="a0")
        for index, adapter in enumerate(adapters[1:], start=1):
            model.load_adapter(adapter, f"a{index}")
        if len(adapters) > 1:
            names = [f"a{index}" for index in range(len(adapters))]
    chat_states = [_is_chat_state(adapter) for adapter in adapters]
    if any(chat_states) and not args.chat:
        raise InputError("the adapter is a compressed system prompt (compress-prompt "
                         "--system-prompt-file): pass --chat so the prompt is a user turn after it")
    if any(chat_states) and not all(chat_states):
        raise InputError("mixing compressed system prompts with other adapters: their prompts "
                         "are formatted differently; run them apart")
    texts = [_formatted(tokenizer, prompt, args.chat, after_system=any(chat_states))
             for prompt in prompts]
    for row, text in enumerate(_generate(model, tokenizer, texts, names, args)):
        if len(texts) > 1:
            print(f"[{row}] {text}")
    return 0


def _is_chat_state(adapter: str) -> bool:
    """Whether ``adapter`` is a folder written by compress-prompt --system-prompt-file (its
    compression.json says the prompt was a system turn)."""
    import json
    from pathlib import Path

    from ..train.run_folder import RUN_RECORDS

    record = Path(adapter) / RUN_RECORDS["compress-prompt"]
    try:
        return bool(json.loads(record.read_text())["report"].get("chat"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _formatted(tokenizer, prompt: str, chat: bool, after_system: bool = False) -> str:
    """The text the model continues: the prompt as it is, as a user turn of the chat template,
    or (``after_system``: the state is a compressed system prompt) the user turn as the
    template renders it after a system turn, that turn cut off."""
    if not chat:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("--chat: the model's tokenizer has no chat template")
    turn = [{"role": "user", "content": prompt}]
    if after_system:
        from ..compress.chat import turns_after_system_text

        return turns_after_system_text(tokenizer, turn)
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def _generate(model, tokenizer, texts: list[str], names: list[str] | None, args) -> list[str]:
    """The continuations of ``texts`` (greedy); a single text is streamed to stdout."""
    import torch
    from transformers import TextStreamer

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not args.chat)
    device = next(model.parameters()).device
    batch = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id)
    if names is not None:
        settings["adapter_names"] = names
    if len(texts) == 1:
        settings["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**batch, **settings)
    new = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
