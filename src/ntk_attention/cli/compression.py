"""The `compress-prompt` and `convert-prefix` commands (registered in ``cli.COMMANDS``).

    ntk-attention compress-prompt --model DIR (--prompt-file F | --system-prompt-file F)
                                  --output DIR [--memory-fraction F | --memory-mib N]
                                  [--r N] [--feature-map NAME] [--steps N]
    ntk-attention convert-prefix SRC DST --base-model DIR [--feature-map NAME] [--r N]
                                 [--steps N]

Both write an NTK adapter (``NTKModel.from_pretrained(base, DIR)`` loads it) and a JSON record
of the run beside it (compression.json / conversion.json). ``--model``/``--base-model`` take a
local model directory or a name from ``ntk_attention.models.MODEL_PATHS`` (e.g.
``smollm2-135m``). ``--system-prompt-file`` compresses an instruct model's system prompt as
its chat template's system turn (use the state with ``generate --chat``); ``--memory-mib``
gives the state a fixed size whatever the prompt's length. Nothing heavy is imported until a
command runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .common import quiet_transformers, set_threads

__all__ = [
    "add_compress_prompt",
    "add_convert_prefix",
    "run_compress_prompt",
    "run_convert_prefix",
]


def _add_state_arguments(parser: argparse.ArgumentParser) -> None:
    state = parser.add_argument_group("state")
    state.add_argument("--feature-map", default="exp", choices=["exp", "elu", "favor", "taylor"],
                       help="exp: r trained virtual tokens; elu: linear-attention state with an "
                       "exact sink (default: %(default)s)")
    state.add_argument("--r", type=int, help="exp/favor: feature dimension (default: the "
                       "largest that fits the budget)")
    size = state.add_mutually_exclusive_group()
    size.add_argument("--memory-fraction", type=float, default=1 / 8, metavar="F",
                      help="state size / the prefix's KV cache, every tensor counted "
                      "(default: 1/8)")
    size.add_argument("--memory-mib", type=float, metavar="MIB",
                      help="a fixed state size in MiB instead of a fraction: the same for any "
                      "prompt length (default: none, --memory-fraction applies)")
    state.add_argument("--sink", type=int, help="first tokens kept exactly (default: 1 for exp "
                       "and elu, 0 otherwise)")
    train = parser.add_argument_group("distillation")
    train.add_argument("--steps", type=int, help="layer-wise steps (default: 200)")
    train.add_argument("--e2e-steps", type=int, default=0, help="end-to-end KL steps after the "
                       "layer-wise stage (default: 0)")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the sampled distillation inputs and the initialisation "
                       "(default: %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto",
                     help="auto (cuda if available), cpu or cuda[:i] (default: %(default)s)")
    run.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    run.add_argument("--overwrite", action="store_true", help="replace an adapter in the output")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_compress_prompt(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="local causal LM directory, or a name such as smollm2-135m")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", metavar="FILE", help="UTF-8 text, compressed as it is")
    source.add_argument("--system-prompt-file", metavar="FILE",
                        help="UTF-8 text: an instruct model's system prompt, compressed as the "
                        "system turn of its chat template (use the state with generate --chat)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for the state (an NTK adapter) and compression.json")
    _add_state_arguments(parser)
    parser.add_argument("--exact-heads", type=int, metavar="N",
                        help="exp: KV heads that keep every prompt token, the ones that copy "
                        "most from it (default: as many as fit in 40%% of the budget; 0 = none)")
    parser.add_argument("--exact-bits", choices=["float", "2", "4", "8"],
                        help="bits those heads keep each prompt token's key and value in "
                        "(quantised as KIVI does a KV cache; default: the recipe's, "
                        "CompressConfig.exact_bits)")


def add_convert_prefix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="PEFT prefix-tuning adapter directory")
    parser.add_argument("output", metavar="DST", help="where the NTK adapter is written")
    parser.add_argument("--base-model", required=True, metavar="DIR",
                        help="the adapter's base model: local directory or a name")
    parser.add_argument("--data", metavar="FILE", help="UTF-8 text to distil on (default: "
                        "continuations the prefixed model samples)")
    parser.add_argument("--eval-text", metavar="FILE", help="UTF-8 held-out text (paragraphs "
                        "split by blank lines): report the perplexity of the PEFT-prefixed and the "
                        "converted model on it")
    parser.add_argument("--no-base-check", action="store_true",
                        help="accept a base model whose name differs from the adapter's record")
    _add_state_arguments(parser)


def _config(args: argparse.Namespace):
    from ..compress import CompressConfig, CompressError

    changes: dict[str, Any] = {
        "feature_map": args.feature_map, "r": args.r, "memory_fraction": args.memory_fraction,
        "sink": args.sink, "e2e_steps": args.e2e_steps,
    }
    if args.memory_mib is not None:
        if not args.memory_mib > 0:
            raise CompressError(f"--memory-mib must be > 0, got {args.memory_mib}")
        changes["memory_bytes"] = max(1, round(args.memory_mib * 2**20))
    if args.steps is not None:
        changes["steps"] = args.steps
    if getattr(args, "exact_heads", None) is not None:  # compress-prompt only
        changes["exact_heads"] = args.exact_heads
    if getattr(args, "exact_bits", None) is not None:
        changes["exact_bits"] = None if args.exact_bits == "float" else int(args.exact_bits)
    return CompressConfig(**changes)


def _prepare(args: argparse.Namespace, output: str) -> None:
    from ..compress import CompressError
    from ..train.run_folder import check_no_other_kind

    quiet_transformers()
    set_threads(args.threads)
    target = Path(output)
    check_no_other_kind(target, args.command, CompressError)
    if (target / "adapter_config.json").exists() and not args.overwrite:
        raise CompressError(f"{target} already holds an adapter; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise CompressError(f"output {target} exists and is not a directory")


def _load_model(location: str, device: str, flag: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..compress import CompressError
    from ..models import ModelUnavailableError, resolve_model

    try:
        path = resolve_model(location)
    except ModelUnavailableError as err:
        raise CompressError(f"{flag} {err}") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="sdpa", dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as err:
        raise CompressError(f"cannot load a causal language model from {flag} {path}: {err}") from err
    return model.to(device).eval(), tokenizer, str(path)


def _read_text(path: str, flag: str) -> str:
    from ..compress import CompressError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CompressError(
            f"{flag} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from err
    except OSError as err:
        raise CompressError(f"cannot read {flag} {path}: {err.strerror or err}") from err


def _read_paragraphs(path: str, flag: str) -> list[str]:
    """The non-empty paragraphs (split by blank lines) of a UTF-8 text file."""
    return [part for part in _read_text(path, flag).split("\n\n") if part.strip()]


def _record(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The run's provenance (``ntk_attention.provenance``) with the command's own fields."""
    from ..provenance import environment

    return {**environment("ntk-attention " + shlex.join(sys.argv[1:])), **extra}


def _record_name(args: argparse.Namespace) -> str:
    """compression.json or conversion.json (train.run_folder.RUN_RECORDS)."""
    from ..train.run_folder import RUN_RECORDS

    return RUN_RECORDS[args.command]


def _write_json(path: Path, document: dict[str, Any]) -> None:
    from ..atomic_files import atomic_write_json

    atomic_write_json(path, document)


def run_compress_prompt(args: argparse.Namespace) -> int:
    _prepare(args, args.output)
    from ..compress import compress_prompt

    config = _config(args)
    chat = args.system_prompt_file is not None
    flag, path = ("--system-prompt-file", args.system_prompt_file) if chat else (
        "--prompt-file", args.prompt_file)
    prompt = _read_text(path, flag)
    if not prompt.strip():  # before the model loads (tens of seconds the first time)
        from ..compress import CompressError

        raise CompressError(f"the prompt is empty ({flag} {path}): nothing to compress")
    model, tokenizer, model_path = _load_model(args.model, args.device, "--model")
    ntk = compress_prompt(model, tokenizer, prompt, config=config, seed=args.seed,
                          progress=not args.no_progress, chat=chat)
    ntk.save_pretrained(args.output)
    report = ntk.compression
    _write_json(Path(args.output) / _record_name(args), _record(
        args, model=model_path, prompt_file=str(path), report=report.to_dict()))
    losses = report.layer_losses
    loss = f"layer loss {losses[0]:.4f} -> {losses[-1]:.4f}; " if losses else ""
    print(
        f"compressed {report.prefix_tokens} prompt tokens into a {report.feature_map!r} state "
        f"(r={report.r}{'' if report.rank is None else f', rank={report.rank}'}): "
        f"{report.state_numel:,} numbers = {report.memory_fraction:.3f} of the prompt's KV cache; "
        f"{loss}{report.seconds['total']:.0f} s.\n"
        f"adapter: {args.output} (load with NTKModel.from_pretrained(base_model, "
        f"{str(args.output)!r}); positions start at {report.prefix_tokens})"
    )
    return 0


def run_convert_prefix(args: argparse.Namespace) -> int:
    _prepare(args, args.output)
    from ..compress import convert_prefix

    config = _config(args)
    model, tokenizer, model_path = _load_model(args.base_model, args.device, "--base-model")
    inputs = _read_paragraphs(args.data, "--data") if args.data else None
    eval_texts = _read_paragraphs(args.eval_text, "--eval-text") if args.eval_text else None
    ntk = convert_prefix(args.source, model, tokenizer=tokenizer, inputs=inputs, config=config,
                         seed=args.seed, eval_texts=eval_texts,
                         check_base_model=not args.no_base_check, progress=not args.no_progress)
    ntk.save_pretrained(args.output)
    conversion, report = ntk.conversion, ntk.compression
    _write_json(Path(args.output) / _record_name(args), _record(
        args, base_model=model_path, source=str(args.source), conversion=conversion,
        report=report.to_dict()))
    held, speed = conversion["held_out"], conversion["forward_seconds"]
    print(
        f"converted a {report.prefix_tokens}-token PEFT prefix into a {report.feature_map!r} "
        f"state (r={report.r}): {report.state_numel:,} numbers = "
        f"{report.memory_fraction:.3f} of the prefix's KV cache.\n"
        f"held-out agreement with the PEFT model ({held['rows']} x {held['tokens']} sampled "
        f"tokens): KL {held['kl']:.4f}, top-1 {held['top1']:.3f}\n"
        f"forward (batch 1, {speed['tokens']} tokens): PEFT prefix {speed['peft_prefix'] * 1e3:.1f}"
        f" ms, NTK {speed['ntk'] * 1e3:.1f} ms; {report.seconds['total']:.0f} s in all.\n"
        + _perplexity_line(conversion.get("eval_text"))
        + f"adapter: {args.output}"
    )
    return 0


def _perplexity_line(evaluation: dict[str, Any] | None) -> str:
    if evaluation is None:
        return ""
    ppl = evaluation["perplexity"]
    return (f"--eval-text perplexity ({evaluation['windows']} x {evaluation['tokens']} tokens): "
            f"PEFT prefix {ppl['peft_prefix']:.2f}, NTK {ppl['ntk']:.2f} (base model alone "
            f"{ppl['base']:.2f})\n")
