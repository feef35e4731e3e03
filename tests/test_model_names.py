"""The same model names everywhere: every command that takes a model takes a local directory or a
name of ``models.MODEL_PATHS``, and an unknown name is one line naming the known ones."""

from __future__ import annotations

import pytest

from ntk_attention import models
from ntk_attention.cli import EXIT_BAD_INPUT, main


def test_a_name_resolves_to_its_offline_model_and_a_directory_to_itself(tmp_path, minilm_dir):
    assert models.resolve_model("minilm") == minilm_dir
    assert models.resolve_model(tmp_path) == tmp_path


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(models.ModelUnavailableError) as caught:
        models.resolve_model("no-such-model")
    assert all(name in str(caught.value) for name in models.MODEL_PATHS)


@pytest.mark.parametrize("command", [
    ["finetune", "--task", "bbc-news", "--method", "ntk"],
    ["compress-prompt", "--prompt-file", "PROMPT"],
])
def test_commands_name_an_unknown_model_in_one_line(tmp_path, capsys, command):
    (tmp_path / "p.txt").write_text("a prompt")
    command = [str(tmp_path / "p.txt") if part == "PROMPT" else part for part in command]
    code = main([*command, "--model", "no-such-model", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1
    assert "'no-such-model' is neither a directory nor a known model name" in err
    assert not (tmp_path / "out").exists()
