"""A chat model's system prompt compressed into a state (compress_prompt(..., chat=True)): the
tokens compressed are the template's system turn, later turns go in through
turns_after_system_ids, and the state made exact reproduces the model that reads the whole
conversation. SmolLM2-135M-Instruct's tokenizer and chat template (ChatML) on a tiny random
Llama with its vocabulary."""

from __future__ import annotations

import pytest
import torch
import transformers

from ntk_attention.compress import (
    CompressConfig,
    CompressError,
    compress_prompt,
    system_prompt_ids,
    turns_after_system_ids,
)

from support.testing_models import ARCHITECTURES

SYSTEM = ("You are Quill, the assistant of the Harbour Street library. The library opens at "
          "9:30 and closes at 17:00; the reading room is on the third floor.")
TURNS = [{"role": "user", "content": "When does the library open?"}]


@pytest.fixture(scope="module")
def tokenizer():
    from ntk_attention import models

    try:
        return transformers.AutoTokenizer.from_pretrained(models.smollm2_path())
    except models.ModelUnavailableError as err:
        pytest.skip(f"SmolLM2 is not installed offline: {err}")


def _tiny_chat_model(tokenizer):
    config = dict(ARCHITECTURES["llama"].config, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**config)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()


def test_the_system_turn_and_the_later_turns_tokenize_as_the_whole_conversation(tokenizer):
    system = system_prompt_ids(tokenizer, SYSTEM)
    rest = turns_after_system_ids(tokenizer, TURNS)
    whole = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, *TURNS],
                                          tokenize=False, add_generation_prompt=True)
    assert system.tolist() + rest[0].tolist() == tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(system).startswith("<|im_start|>system\n")
    # without a system turn SmolLM2's template inserts its own default one; the cut never does
    assert "SmolLM" not in tokenizer.decode(rest[0])


def test_an_exact_chat_state_reproduces_the_whole_conversation(tokenizer):
    model = _tiny_chat_model(tokenizer)
    whole = torch.cat([system_prompt_ids(tokenizer, SYSTEM)[None], turns_after_system_ids(tokenizer, TURNS)], 1)
    system_len = system_prompt_ids(tokenizer, SYSTEM).numel()
    with torch.no_grad():
        expected = model(input_ids=whole).logits[:, system_len:]
    config = CompressConfig(memory_fraction=None, exact_heads=0, samples=2, sample_length=8, rereads=1)
    ntk = compress_prompt(model, tokenizer, SYSTEM, config=config, steps=0, progress=False, chat=True)
    try:
        assert ntk.compression.chat and ntk.compression.prefix_tokens == system_len
        with torch.no_grad():
            got = ntk(input_ids=turns_after_system_ids(tokenizer, TURNS)).logits
    finally:
        ntk.unload()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bad_chat_inputs_are_named(tokenizer):
    with pytest.raises(CompressError, match="system prompt is empty"):
        system_prompt_ids(tokenizer, "  ")
    with pytest.raises(CompressError, match="hold a system turn"):
        turns_after_system_ids(tokenizer, [{"role": "system", "content": "x"}, *TURNS])
    with pytest.raises(CompressError, match="chat template"):
        system_prompt_ids(None, SYSTEM)


def test_a_template_that_folds_the_system_prompt_into_a_user_turn_is_refused(tokenizer):
    folding = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    folding.chat_template = (  # Llama-2 style: the system prompt inside the first [INST]
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}"
        "<<SYS>>{{ messages[0]['content'] }}<</SYS>> {% endif %}{{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(CompressError, match="does not render the system prompt as a turn of its own"):
        system_prompt_ids(folding, SYSTEM)


def test_the_command_line_compresses_a_system_prompt_and_chats_after_it(tokenizer, tmp_path, capsys):
    from ntk_attention.cli import EXIT_BAD_INPUT, main

    model_dir = tmp_path / "tiny-chat"
    _tiny_chat_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "system.txt").write_text(SYSTEM)
    out = tmp_path / "state"
    assert main(["compress-prompt", "--model", str(model_dir), "--system-prompt-file",
                 str(tmp_path / "system.txt"), "--output", str(out), "--memory-fraction", "0.5",
                 "--steps", "2", "--no-progress", "--threads", "1"]) == 0
    assert f"compressed {system_prompt_ids(tokenizer, SYSTEM).numel()} prompt tokens" in capsys.readouterr().out
    args = ["generate", "--model", str(model_dir), "--adapter", str(out), "--prompt",
            TURNS[0]["content"], "--max-new-tokens", "3", "--threads", "1"]
    assert main(args) == EXIT_BAD_INPUT  # a system-prompt state without --chat
    assert "pass --chat" in capsys.readouterr().err
    assert main([*args, "--chat"]) == 0
    assert capsys.readouterr().out.strip()  # three tokens streamed
