"""The warm start "prompt -> state -> fine-tune": ``compress.exact_prompt_state`` (a prompt's
cache copied exactly into an exp state) and ``finetune --ntk-init text`` (the state starts as
the first training tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from ntk_attention.cli import EXIT_BAD_INPUT, main
from ntk_attention.compress import exact_prompt_state
from ntk_attention.train.config import RunError, TrainConfig

from support.testing_models import ARCHITECTURES


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: one intra-op thread."""


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_state_reads_a_continuation_as_the_model_reads_it_after_the_prompt(arch):
    spec = ARCHITECTURES[arch]
    ids = spec.inputs(batch=1, length=12)["input_ids"]
    prompt, continuation = ids[0, :8], ids[:, 8:]
    model = spec.build()
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, 8:]
        ntk = exact_prompt_state(model, prompt, seed=0)
        got = ntk(input_ids=continuation).logits
    config = ntk.peft_config["default"]
    assert (config.feature_map, config.r, config.position_offset, config.sink_tokens) == ("exp", 8, 8, 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert ntk.get_nb_trainable_parameters()[0] > 0 and all(
        not p.requires_grad for n, p in ntk.named_parameters() if "ntk_" not in n
    )


def test_finetune_with_a_text_warm_start_trains_and_saves_the_state(tmp_path, tiny_decoder_dir):
    model, data = tiny_decoder_dir
    output = tmp_path / "run"
    code = main(["finetune", "--task", "causal-lm", "--data", str(data), "--model", str(model),
                 "--method", "ntk", "--ntk-init", "text", "--r", "16", "--max-steps", "3",
                 "--batch-size", "4", "--max-length", "16", "--output", str(output),
                 "--no-progress", "--threads", "1"])
    assert code == 0
    results = json.loads((output / "results.json").read_text())
    assert results["config"]["ntk_init"] == "text" and results["steps"] == 3
    saved = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert (saved["feature_map"], saved["r"], saved["position_offset"], saved["sink_tokens"]) == (
        "exp", 16, 16, 0
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--feature-map", "elu"], "--ntk-init text makes an exp state"),
        (["--r", "100000"], "--ntk-init text needs 100000 training tokens"),
    ],
)
def test_a_warm_start_that_cannot_be_made_exits_2_naming_it(tmp_path, tiny_decoder_dir, capsys, extra, message):
    model, data = tiny_decoder_dir
    output = tmp_path / "run"
    code = main(["finetune", "--task", "causal-lm", "--data", str(data), "--model", str(model),
                 "--method", "ntk", "--ntk-init", "text", "--max-steps", "1", "--output",
                 str(output), "--no-progress", "--threads", "1", *extra])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (output / "results.json").exists()


def test_an_unknown_init_is_refused():
    with pytest.raises(RunError, match="--ntk-init must be one of"):
        TrainConfig(task="wiki-lm", method="ntk", ntk_init="prompt")


def test_a_warm_started_run_resumes_exactly(tmp_path, tiny_decoder_dir):
    """Stopped after 2 of 4 steps and resumed: the warm start is rebuilt from the same tokens and
    the checkpoint's state loaded over it, so the result equals an uninterrupted run's."""
    model, data = tiny_decoder_dir
    common = ["finetune", "--task", "causal-lm", "--data", str(data), "--model", str(model),
              "--method", "ntk", "--ntk-init", "text", "--r", "16", "--max-steps", "4",
              "--batch-size", "4", "--max-length", "16", "--save-every", "1", "--no-progress",
              "--threads", "1"]
    assert main([*common, "--output", str(tmp_path / "whole")]) == 0
    assert main([*common, "--output", str(tmp_path / "cut"), "--stop-after-steps", "2"]) == 0
    assert not (tmp_path / "cut" / "results.json").exists()
    assert main([*common, "--output", str(tmp_path / "cut"), "--resume"]) == 0
    whole, cut = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "cut"))
    assert cut["history"]["train_loss"] == whole["history"]["train_loss"]
    assert cut["metrics"] == whole["metrics"]


@pytest.mark.slow
def test_compile_gives_the_eager_run(tmp_path, tiny_decoder_dir):
    """finetune --compile: torch.compile'd forward and backward, the same losses and adapter."""
    model, data = tiny_decoder_dir
    common = ["finetune", "--task", "causal-lm", "--data", str(data), "--model", str(model),
              "--method", "ntk", "--r", "16", "--max-steps", "3", "--batch-size", "4",
              "--max-length", "16", "--no-progress", "--threads", "1"]
    assert main([*common, "--output", str(tmp_path / "eager")]) == 0
    assert main([*common, "--output", str(tmp_path / "compiled"), "--compile"]) == 0
    eager, compiled = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("eager", "compiled"))
    assert compiled["config"]["compile"] is True
    assert compiled["history"]["train_loss"] == pytest.approx(eager["history"]["train_loss"], rel=1e-4)
