"""Every flag of every command says what it does, and a flag with a default says the default
(``ntk-attention COMMAND --help`` is the reference a user reads)."""

from __future__ import annotations

import argparse

import pytest

from ntk_attention.cli import COMMANDS, build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_help_naming_its_default(command):
    undocumented = []
    for action in _subparsers()[command]._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        text = action.help or ""
        has_default = action.default not in (None, False, [], argparse.SUPPRESS)
        if not text or (has_default and "default" not in text):
            undocumented.append(action.option_strings[0] if action.option_strings else action.dest)
    assert not undocumented, f"{command}: flags without help or without their default: {undocumented}"


def test_the_top_level_help_lists_every_command_on_its_own_line(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(f"ntk-attention {name}" in out or name in out for name in COMMANDS)
    assert "ntk-attention demo\n" in out
