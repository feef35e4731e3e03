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
import sys
from collections.abc import Callable

from . import compression, finetune, generation, ops_demo
from .common import InputError

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


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "finetune": ("fine-tune one method on one task", finetune.add_finetune, finetune.run_finetune),
    "compare": ("fine-tune several methods on one task; table and plot", finetune.add_compare,
                finetune.run_compare),
    "demo": ("the embedded default: NTK-Attention vs LoRA vs prefix tuning on BBC News "
             "(a few minutes on CPU)", finetune.add_demo, finetune.run_demo),
    "ops-demo": ("error and speed of a constant-size state vs a long prefix",
                 ops_demo.add_ops_demo, ops_demo.run_ops_demo_command),
    "compress-prompt": ("compress a long prompt into a small trained state (an NTK adapter)",
                        compression.add_compress_prompt, compression.run_compress_prompt),
    "convert-prefix": ("convert a PEFT prefix-tuning adapter into an NTK adapter",
                       compression.add_convert_prefix, compression.run_convert_prefix),
    "generate": ("continue prompts with a base model and NTK adapters (streamed; per-row "
                 "adapters for a batch)", generation.add_generate, generation.run_generate),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
    errors: list[type[BaseException]] = [InputError]
    if "ntk_attention.train.config" in sys.modules:
        from ..models import ModelUnavailableError
        from ..train.checkpoint import CheckpointError
        from ..train.config import RunError
        from ..train.guards import NonFiniteError
        from ..train.tasks import DataError

        errors += [RunError, DataError, CheckpointError, NonFiniteError, ModelUnavailableError]
    if "ntk_attention.compress" in sys.modules:
        from ..compress import CompressError
        from ..models import ModelUnavailableError
        from ..tuner import AdapterLoadError, UnsupportedModelError

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

