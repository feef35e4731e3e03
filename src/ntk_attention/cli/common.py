"""What the commands share: quiet offline transformers, the run's thread count, and argument
types that turn bad values into usage errors naming the flag."""

from __future__ import annotations

import argparse
import os

__all__ = ["InputError", "positive_int", "quiet_transformers", "set_threads"]


class InputError(ValueError):
    """A command's arguments or input files are unusable: one line on stderr, exit status 2."""


def quiet_transformers() -> None:
    """No download attempts, no load reports or weight-loading bars between our lines."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    # PEFT calls a transformers property deprecated in 5.x on every get_peft_model.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def positive_int(text: str) -> int:
    """An int >= 1 (else a usage error naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, when the command was given --threads."""
    if threads:
        import torch

        torch.set_num_threads(threads)
