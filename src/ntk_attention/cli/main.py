"""The `ntk-attention` command line: one sub-command per job, registered in ``COMMANDS``.

    ntk-attention finetune --task bbc-news --method ntk      one task, one method
    ntk-attention compare --task bbc-news --methods ntk lora prefix
    ntk-attention demo                                       the embedded default comparison
    ntk-attention ops-demo                                   the op alone, no training
    ntk-attention compress-prompt --model DIR --prompt-file F --output DIR
    ntk-attention convert-prefix SRC DST --base-model DIR
    ntk-attention generate --model DIR --adapter DIR --prompt TEXT

Bad input (data, model, arguments, an output folder holding another run) ends with one
``error:`` line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from . import cli_compress, cli_generate

__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "main"]

_DESCRIPTION = """\
NTK-Attention: fine-tune a transformer through a constant-size attention state (the effect of
an arbitrarily long prefix), compare it with LoRA, prefix and prompt tuning, and compress long
prompts into small states. Examples:

    ntk-attention demo
    ntk-attention finetune --task wiki-lm --method ntk --output runs/ntk
    ntk-attention compare --task bbc-news --methods ntk lora prefix
    ntk-attention compress-prompt --model smollm2-135m --prompt-file prompt.txt --output runs/state

Each command's options: ntk-attention COMMAND --help."""

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _ops_demo(args: argparse.Namespace) -> int:
    from .ops_demo import format_ops_demo, run_ops_demo

    print(
        "NTK-Attention: a prefix of m keys/values replaced by a constant-size state.\n"
        "Causal attention, B=2, H=4, L=512, D=32; synthetic keys with small logits.\n"
    )
    rows = run_ops_demo(prefix_lengths=tuple(args.prefix_lengths))
    print(format_ops_demo(rows))
    print(
        "\nThe state's cost does not grow with m; exact prefix attention's does. Closed-form\n"
        "states are accurate only for small logits: real models need a trained state."
    )
    return 0


def _positive_int(text: str) -> int:
    """An int >= 1 (else a usage error naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _add_ops_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix-lengths", type=_positive_int, nargs="+", default=[256, 4096, 65536],
        metavar="M", help="prefix lengths m the state stands for (default: %(default)s)",
    )


# ------------------------------------------------------------------------- training commands


def _quiet_transformers() -> None:
    """No download attempts, no load reports or weight-loading bars between our lines."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    # PEFT calls a transformers property deprecated in 5.x on every get_peft_model.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()



def _add_train_arguments(parser: argparse.ArgumentParser, *, defaults: dict | None = None) -> None:
    """The run settings finetune and compare share (dest names = TrainConfig fields)."""
    from .train.loop import TrainConfig

    base = {**TrainConfig.defaults(), **(defaults or {})}
    data = parser.add_argument_group("task and data")
    data.add_argument("--task", required="task" not in (defaults or {}), default=base.get("task"),
                      help="built-in task (bbc-news, drug-review, fashion-mnist, wiki-lm, "
                      "arithmetic) or, with --data, a kind: classification, causal-lm, generation")
    data.add_argument("--model", metavar="DIR", help="local Hugging Face model directory "
                      "(default: the task's model)")
    data.add_argument("--data", metavar="FILE", help="CSV/JSONL file: text,label (classification),"
                      " prompt,completion (generation) or text (causal-lm)")
    data.add_argument("--trust-remote-code", action="store_true",
                      help="let --model run its own Python code (off: see SECURITY.md)")
    data.add_argument("--max-train", type=int, default=base["max_train"], metavar="N",
                      help="use the first N training rows (seeded shuffle)")
    data.add_argument("--max-eval", type=int, default=base["max_eval"], metavar="N",
                      help="use the first N validation and N test rows")
    data.add_argument("--max-length", type=int, default=base["max_length"], metavar="TOKENS")
    data.add_argument("--image-size", type=int, default=base["image_size"], metavar="PIXELS")
    method = parser.add_argument_group("method")
    method.add_argument("--r", type=int, help="ntk: feature dimension (default: the map's own)")
    method.add_argument("--rank", type=int, help="ntk: low-rank Z (default: dense)")
    method.add_argument("--feature-map", default=base["feature_map"],
                        help="ntk: elu, favor, taylor or exp (default: the task kind's, "
                        "train.methods.NTK_DEFAULTS; the run prints it)")
    method.add_argument("--sink-tokens", type=_sink_tokens, default=base["sink_tokens"],
                        metavar="N", help="ntk: the first N positions of a sequence read only "
                        "the real keys, protecting a decoder's attention sink (default: "
                        "%(default)s = 1 for decoders, 0 for encoders and ViTs)")
    method.add_argument("--ntk-gated", action=argparse.BooleanOptionalAction,
                        default=base["ntk_gated"],
                        help="ntk: the state's Z = diag(kappa) U, values U and masses kappa "
                        "trained apart (default: the task kind's, train.methods.NTK_DEFAULTS)")
    method.add_argument("--ntk-init", choices=("zeros", "text"), default=base["ntk_init"],
                        help="ntk: the state starts at zero (the base model) or, for decoders, "
                        "as the exact cache of the first --r (default 64) training tokens "
                        "(default: the task kind's: text for decoders, zeros otherwise)")
    method.add_argument("--prefix-length", type=int, default=base["prefix_length"], metavar="M",
                        help="prefix/prompt: virtual tokens (default: %(default)s)")
    method.add_argument("--lora-r", type=int, default=base["lora_r"],
                        help="lora: rank (default: %(default)s)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, help="learning rate (default: the method's: ntk per "
                       "task kind (train.methods.NTK_DEFAULTS), lora 1e-2, prefix 1e-1, "
                       "prompt 3e-2, full 5e-5; the run prints it)")
    optim.add_argument("--head-lr", type=float, default=base["head_lr"],
                       help="learning rate of the task head (classifier) trained beside the "
                       "adapter (default: --lr; for image tasks at most 1e-3)")
    optim.add_argument("--epochs", type=int, default=base["epochs"])
    optim.add_argument("--max-steps", type=int, default=base["max_steps"],
                       help="stop after N optimizer steps (overrides --epochs)")
    optim.add_argument("--batch-size", type=int, default=base["batch_size"])
    optim.add_argument("--warmup-ratio", type=float, default=base["warmup_ratio"])
    optim.add_argument("--weight-decay", type=float, default=base["weight_decay"])
    optim.add_argument("--seed", type=int, default=base["seed"])
    run = parser.add_argument_group("run")
    run.add_argument("--output", metavar="DIR", default=base["output"])
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --output from its latest checkpoint")
    run.add_argument("--save-every", type=int, default=base["save_every"], metavar="STEPS",
                     help="checkpoint every N steps, besides every epoch (0: epochs only)")
    run.add_argument("--device", default=base["device"], help="auto, cpu or cuda[:i]")
    run.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--compile", action="store_true",
                     help="run the model through torch.compile (same results; the first steps "
                     "compile, later ones may run faster)")
    run.add_argument("--detect-nonfinite", action="store_true",
                     help="stop at the first NaN/inf activation, gradient or parameter and name "
                     "the layer (slower: checks every module output)")
    # Stops a run after N steps as a crash would (no final files): for crash/resume tests.
    run.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)


def _sink_tokens(text: str) -> int | str:
    """--sink-tokens: "auto" or an int >= 0 (else a usage error naming the flag)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= 0, got {text!r}")
    return value


def _config_from(args: argparse.Namespace, **fixed):
    from .train.loop import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    values.update(fixed)
    return TrainConfig(**values)


def _setup(args: argparse.Namespace) -> None:
    _quiet_transformers()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _finetune(args: argparse.Namespace) -> int:
    from .train.loop import RunError, holds_run, train

    config = _config_from(args)
    if args.resume and not holds_run(config.output):
        raise RunError(f"--resume: {config.output} holds no run to continue (no checkpoint, no "
                       "results.json); drop --resume to start one")
    _setup(args)
    results = train(config, resume=args.resume, progress=not args.no_progress,
                    stop_after_steps=args.stop_after_steps)
    if results is None:
        print(f"stopped after {args.stop_after_steps} steps; continue with --resume")
        return 0
    test = results["metrics"]["test"]
    print(f"{results['method']} on {results['task']}: test "
          + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
          + f"; {results['trainable_parameters']:,} trainable parameters; "
          f"results in {config.output}/results.json")
    return 0


def _add_finetune(parser: argparse.ArgumentParser) -> None:
    from .train.methods import METHODS

    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    _add_train_arguments(parser)


def _compare(args: argparse.Namespace) -> int:
    from .train.compare import compare

    _setup(args)
    config = _config_from(args, method=args.methods[0])
    out = compare(config, args.methods, output=args.output, resume=args.resume,
                  progress=not args.no_progress, stop_after_steps=args.stop_after_steps)
    if out is None:
        print(f"stopped after {args.stop_after_steps} steps; continue with --resume")
        return 0
    print("\n" + out["table"])
    print(f"\ntable: {out['files']['comparison.md']}\nplot:  {out['files']['comparison.png']}")
    return 0


def _add_compare(parser: argparse.ArgumentParser) -> None:
    from .train.methods import METHODS

    parser.add_argument("--methods", nargs="+", default=["ntk", "lora", "prefix"],
                        choices=sorted(METHODS), metavar="METHOD",
                        help=f"methods to compare, from {sorted(METHODS)} (default: %(default)s)")
    _add_train_arguments(parser, defaults={"output": "runs/compare"})


def _demo(args: argparse.Namespace) -> int:
    from .train.compare import DEMO_METHODS, compare, demo_config, demo_note, prepare_demo_output

    _setup(args)
    started = time.perf_counter()
    config = demo_config(max_steps=args.max_steps, max_train=args.max_train,
                         max_eval=args.max_eval, epochs=args.epochs)
    methods = tuple(args.methods or DEMO_METHODS)
    print("NTK-Attention vs LoRA vs prefix tuning (P-Tuning v2): all-MiniLM-L6-v2 on BBC News "
          "(5 topics).")
    print(demo_note(config))
    output = prepare_demo_output(args.output)
    out = compare(config, methods, output=output, progress=not args.no_progress)
    print("\n" + out["table"])
    print(f"\ntable: {out['files']['comparison.md']}\nplot:  {out['files']['comparison.png']}")
    print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    return 0


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", metavar="DIR")
    from .train.methods import METHODS

    parser.add_argument("--methods", nargs="+", metavar="METHOD", choices=sorted(METHODS),
                        help=f"from {sorted(METHODS)} (default: ntk lora prefix)")
    parser.add_argument("--max-steps", type=int, help="cut each run short (smoke tests)")
    parser.add_argument("--max-train", type=int, metavar="N")
    parser.add_argument("--max-eval", type=int, metavar="N")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "finetune": ("fine-tune one method on one task", _add_finetune, _finetune),
    "compare": ("fine-tune several methods on one task; table and plot", _add_compare, _compare),
    "demo": ("the embedded default: NTK-Attention vs LoRA vs prefix tuning on BBC News "
             "(a few minutes on CPU)", _add_demo, _demo),
    "ops-demo": ("error and speed of a constant-size state vs a long prefix", _add_ops_demo, _ops_demo),
    "compress-prompt": ("compress a long prompt into a small trained state (an NTK adapter)",
                        cli_compress.add_compress_prompt, cli_compress.run_compress_prompt),
    "convert-prefix": ("convert a PEFT prefix-tuning adapter into an NTK adapter",
                       cli_compress.add_convert_prefix, cli_compress.run_convert_prefix),
    "generate": ("continue prompts with a base model and NTK adapters (streamed; per-row "
                 "adapters for a batch)", cli_generate.add_generate, cli_generate.run_generate),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ntk-attention", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ntk-attention {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (reported in one line, exit 2), not a bug (traceback)."""
    errors: list[type[BaseException]] = []
    if "ntk_attention.train.loop" in sys.modules:
        from .models import ModelUnavailableError
        from .train.checkpoint import CheckpointError
        from .train.guards import NonFiniteError
        from .train.loop import RunError
        from .train.tasks import DataError

        errors += [RunError, DataError, CheckpointError, NonFiniteError, ModelUnavailableError]
    if "ntk_attention.compress" in sys.modules:
        from .compress import CompressError
        from .models import ModelUnavailableError
        from .tuner import AdapterLoadError, UnsupportedModelError

        errors += [CompressError, ModelUnavailableError, AdapterLoadError, UnsupportedModelError]
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted; a training run continues from its last checkpoint with --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if isinstance(error, _input_errors()):
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
