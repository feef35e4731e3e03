"""The `ntk-attention` command line: one sub-command per job, registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["COMMANDS", "main"]


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


def _add_ops_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix-lengths", type=int, nargs="+", default=[256, 4096, 65536], metavar="M"
    )


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "ops-demo": ("error and speed of a constant-size state vs a long prefix", _add_ops_demo, _ops_demo),
}
# Until the finetune CLI lands, the embedded default demo is the ops demo.
COMMANDS["demo"] = ("run the embedded default demo", _add_ops_demo, _ops_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ntk-attention", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
