"""``ntk-attention generate`` end to end on a tiny decoder: one prompt streamed, a batch with
per-row adapters equal to the library's generate, and bad input as one error line."""

from __future__ import annotations

import pytest
import torch

from ntk_attention.cli import EXIT_BAD_INPUT, main


@pytest.fixture
def adapters(tmp_path, tiny_decoder_dir):
    """Two differently randomised NTK adapters of the tiny decoder, saved."""
    import transformers

    from ntk_attention import NTKConfig, get_ntk_model

    from support.testing_models import randomize_adapter

    model_dir, _ = tiny_decoder_dir
    paths = []
    for seed in (1, 2):
        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
        ntk = get_ntk_model(base, NTKConfig())
        randomize_adapter(ntk, seed=seed, scale=3.0)
        ntk.save_pretrained(tmp_path / f"adapter{seed}")
        paths.append(tmp_path / f"adapter{seed}")
    return model_dir, paths


def _library_continuations(model_dir, adapter_dirs, prompts, names):
    import transformers

    from ntk_attention import NTKModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    ntk = NTKModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
    for index, path in enumerate(adapter_dirs[1:], start=1):
        ntk.load_adapter(path, f"a{index}")
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    batch = {key: batch[key] for key in ("input_ids", "attention_mask")}  # no token_type_ids
    with torch.no_grad():
        out = ntk.generate(**batch, max_new_tokens=5, do_sample=False, adapter_names=names,
                           pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_one_prompt_streams_its_continuation(adapters, capsys):
    model_dir, paths = adapters
    code = main(["generate", "--model", str(model_dir), "--adapter", str(paths[0]),
                 "--prompt", "the cat sat on", "--max-new-tokens", "5", "--threads", "1"])
    assert code == 0
    expected = _library_continuations(model_dir, paths[:1], ["the cat sat on"], None)[0]
    assert capsys.readouterr().out.strip() == expected.strip()


def test_a_batch_reads_one_adapter_per_row(adapters, capsys):
    model_dir, paths = adapters
    prompts = ["the cat sat on", "a dog"]
    code = main(["generate", "--model", str(model_dir), "--adapter", str(paths[0]), "--adapter",
                 str(paths[1]), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "5", "--threads", "1"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = _library_continuations(model_dir, paths, prompts, ["a0", "a1"])
    assert lines == [f"[{row}] {text}" for row, text in enumerate(expected)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--adapter", "{a}", "--adapter", "{a}", "--prompt", "x"], "2 adapters for 1 prompts"),
        (["--adapter", "/no/such/adapter", "--prompt", "x"], "no adapter_config.json"),
        (["--prompt", "  "], "a --prompt is empty"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_bad_input_is_one_error_line(adapters, capsys, extra, message):
    model_dir, paths = adapters
    extra = [part.format(a=paths[0]) for part in extra]
    code = main(["generate", "--model", str(model_dir), *extra, "--threads", "1"])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
