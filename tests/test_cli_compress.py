"""The compress-prompt and convert-prefix commands on a tiny model directory (random weights,
a character tokenizer): outputs load with NTKModel.from_pretrained and generate; bad input
ends with one error line and exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ntk_attention.cli import EXIT_BAD_INPUT, main
from ntk_attention.compress import CompressConfig
from ntk_attention.tuner import NTKModel

from support.testing_models import ARCHITECTURES, char_tokenizer

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

FAST = ["--steps", "3", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    ARCHITECTURES["llama"].build().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()


def test_compress_prompt_writes_an_adapter_that_loads_and_generates(model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    out = tmp_path / "state"
    code = main(["compress-prompt", "--model", str(model_dir), "--prompt-file", str(prompt),
                 "--output", str(out), "--r", "8", *FAST])
    assert code == 0
    assert "compressed 135 prompt tokens" in capsys.readouterr().out
    record = json.loads((out / "compression.json").read_text())
    assert record["report"]["r"] == 8 and record["report"]["prefix_tokens"] == 135
    assert record["versions"]["torch"] == torch.__version__
    ntk = NTKModel.from_pretrained(_load(model_dir), out)
    tokenizer = char_tokenizer()
    ids = tokenizer("Quick", return_tensors="pt")["input_ids"]
    generated = ntk.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)
    # Running again into the same folder needs --overwrite.
    again = ["compress-prompt", "--model", str(model_dir), "--prompt-file", str(prompt),
             "--output", str(out), "--r", "8", *FAST]
    assert main(again) == EXIT_BAD_INPUT
    assert "already holds an adapter" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0


@pytest.mark.parametrize("bits", [None, "float", "4"])
def test_compress_prompt_with_exact_heads_writes_them(model_dir, tmp_path, bits):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    out = tmp_path / "state"
    extra = [] if bits is None else ["--exact-bits", bits]
    code = main(["compress-prompt", "--model", str(model_dir), "--prompt-file", str(prompt),
                 "--output", str(out), "--r", "4", "--exact-heads", "2", *extra, *FAST])
    assert code == 0
    record = json.loads((out / "compression.json").read_text())
    assert len(record["report"]["exact_heads"]) == 2
    ntk = NTKModel.from_pretrained(_load(model_dir), out)
    config = ntk.peft_config["default"]
    assert [list(pair) for pair in config.exact_heads] == record["report"]["exact_heads"]
    assert config.exact_tokens == 135
    expected = CompressConfig().exact_bits if bits is None else (None if bits == "float" else 4)
    assert config.exact_bits == record["report"]["config"]["exact_bits"] == expected


def test_convert_prefix_writes_an_adapter_that_loads(model_dir, tmp_path, capsys):
    peft_model = get_peft_model(_load(model_dir), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    peft_model.save_pretrained(tmp_path / "prefix")
    out = tmp_path / "ntk"
    (tmp_path / "eval.txt").write_text("A held-out paragraph, long enough for one window. " * 2 + "\n\nshort")
    code = main(["convert-prefix", str(tmp_path / "prefix"), str(out), "--base-model", str(model_dir),
                 "--r", "5", "--eval-text", str(tmp_path / "eval.txt"), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert "converted a 5-token PEFT prefix" in printed and "held-out agreement" in printed
    assert "--eval-text perplexity" in printed
    record = json.loads((out / "conversion.json").read_text())
    assert record["conversion"]["held_out"]["top1"] == 1.0  # r = m with exp features: exact
    perplexity = record["conversion"]["eval_text"]["perplexity"]
    assert perplexity["ntk"] == pytest.approx(perplexity["peft_prefix"], rel=1e-4)
    ntk = NTKModel.from_pretrained(_load(model_dir), out)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ntk(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt-file", "{empty}", "--output", "{out}"], "prompt is empty"),
        (["--prompt-file", "{missing}", "--output", "{out}"], "cannot read --prompt-file"),
        (["--prompt-file", "{prompt}", "--output", "{out}", "--r", "0"], "r must be a positive int, got r=0"),
        (["--prompt-file", "{prompt}", "--output", "{out}", "--feature-map", "elu", "--r", "4"],
         "fixes its own r"),
        (["--prompt-file", "{prompt}", "--output", "{out}", "--exact-heads", "-1"],
         "exact_heads must be an int >= 0"),
        (["--prompt-file", "{prompt}", "--output", "{out}", "--feature-map", "elu", "--exact-heads", "1"],
         "need feature_map 'exp'"),
    ],
)
def test_bad_input_is_one_error_line(model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "prompt.txt").write_text("some prompt text")
    paths = {"empty": tmp_path / "empty.txt", "missing": tmp_path / "nope.txt",
             "prompt": tmp_path / "prompt.txt", "out": tmp_path / "out"}
    argv = [a.format(**paths) for a in argv]
    code = main(["compress-prompt", "--model", str(model_dir), *argv, *FAST])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_unknown_model_name_is_named(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("text")
    code = main(["compress-prompt", "--model", "no-such-model", "--prompt-file", str(tmp_path / "p.txt"),
                 "--output", str(tmp_path / "o"), *FAST])
    assert code == EXIT_BAD_INPUT
    assert "neither a directory nor a known model name" in capsys.readouterr().err


def test_an_empty_prompt_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from ntk_attention.cli import compression as cli_compress

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for an empty prompt")

    monkeypatch.setattr(cli_compress, "_load_model", no_loading)
    (tmp_path / "empty.txt").write_text("\n \n")
    code = main(["compress-prompt", "--model", "smollm2-135m", "--prompt-file",
                 str(tmp_path / "empty.txt"), "--output", str(tmp_path / "o"), *FAST])
    assert code == EXIT_BAD_INPUT
    assert "prompt is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_prompt_file_that_is_not_utf8_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    from ntk_attention.cli import compression as cli_compress

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for an unreadable prompt")

    monkeypatch.setattr(cli_compress, "_load_model", no_loading)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    code = main(["compress-prompt", "--model", "smollm2-135m", "--prompt-file",
                 str(tmp_path / "latin1.txt"), "--output", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert err.count("\n") == 1 and "is not UTF-8 text (byte 0xe9 at offset 3)" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("marker", ["results.json", "checkpoints", "conversion.json"])
def test_a_folder_holding_another_kind_of_run_is_refused(tmp_path, capsys, monkeypatch, marker):
    from ntk_attention.cli import compression as cli_compress

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for a refused output folder")

    monkeypatch.setattr(cli_compress, "_load_model", no_loading)
    (tmp_path / "p.txt").write_text("a prompt")
    run = tmp_path / "run"
    run.mkdir()
    (run / marker).mkdir() if marker == "checkpoints" else (run / marker).write_text("{}")
    before = sorted(p.name for p in run.iterdir())
    code = main(["compress-prompt", "--model", "smollm2-135m", "--prompt-file",
                 str(tmp_path / "p.txt"), "--output", str(run), *FAST])
    assert code == EXIT_BAD_INPUT
    assert f"holds another kind of run ({marker})" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
