"""convert_prefix on tiny random models: a PEFT prefix-tuning adapter copied into exp features
(r = prefix length) is the PEFT model exactly; a smaller state is distilled and reported; the
written adapter loads; adapters of another base model, or of another PEFT method, are named."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model

from ntk_attention.compress import CompressConfig, CompressError, convert_prefix
from ntk_attention.tuner import NTKModel

from support.testing import assert_close
from support.testing_models import ARCHITECTURES, TinyArchitecture, char_tokenizer

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # PEFT's notes on tiny configs
]

LLAMA = ARCHITECTURES["llama"]
M = 6
SMALL = dict(samples=3, sample_length=8, rereads=0)


def _peft_prefix(arch: TinyArchitecture = LLAMA, m: int = M, seed: int = 0):
    model = get_peft_model(arch.build(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=m))
    with torch.no_grad():
        weight = model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 2)
    return model.eval()


@pytest.fixture
def prefix_dir(tmp_path):
    _peft_prefix().save_pretrained(tmp_path / "prefix")
    return tmp_path / "prefix"


def test_prefix_copied_into_exp_state_is_the_peft_model(prefix_dir):
    peft_model = _peft_prefix()
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    ntk = convert_prefix(prefix_dir, LLAMA.build(), config=CompressConfig(r=M, **SMALL), steps=0,
                         progress=False)
    with torch.no_grad():
        assert_close(ntk(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        generated = ntk.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        reference = peft_model.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:, 7:], reference[:, 7:])
    held = ntk.conversion["held_out"]
    assert held["kl"] < 1e-6 and held["top1"] == 1.0


def test_a_peft_model_is_accepted_as_the_source():
    peft_model = _peft_prefix()
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    ntk = convert_prefix(peft_model, LLAMA.build(), config=CompressConfig(r=M, **SMALL), steps=0,
                         progress=False)
    with torch.no_grad():
        assert_close(ntk(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_a_smaller_state_is_distilled_reported_and_saved(prefix_dir, tmp_path):
    ntk = convert_prefix(prefix_dir, LLAMA.build(), config=CompressConfig(r=2, lr=1e-2, **SMALL),
                         steps=30, progress=False)
    losses = ntk.compression.layer_losses
    assert losses[-1] < losses[0]
    conversion = ntk.conversion
    assert conversion["num_virtual_tokens"] == M
    assert conversion["memory"]["state_numel"] < conversion["memory"]["prefix_kv_numel"]
    assert 0 <= conversion["held_out"]["top1"] <= 1 and conversion["held_out"]["kl"] >= 0
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = ntk(input_ids=ids).logits
    ntk.save_pretrained(tmp_path / "ntk")
    loaded = NTKModel.from_pretrained(LLAMA.build(), tmp_path / "ntk")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before, rtol=0, atol=0)


def test_text_inputs_are_cut_into_windows(prefix_dir):
    ntk = convert_prefix(prefix_dir, LLAMA.build(), tokenizer=char_tokenizer(), inputs=["x" * 20, "y" * 9],
                         config=CompressConfig(r=2, **SMALL), steps=2, progress=False)
    assert ntk.compression.layer_losses


def test_eval_texts_give_the_perplexity_before_and_after(prefix_dir):
    """Exact conversion (r = m): the same perplexity as the PEFT model, computed by hand here."""
    peft_model = _peft_prefix()
    texts = ["the quick brown fox jumps", "over the lazy dog, twice over"]
    tokenizer = char_tokenizer()
    ntk = convert_prefix(prefix_dir, LLAMA.build(), tokenizer=tokenizer, eval_texts=texts,
                         config=CompressConfig(r=M, **SMALL), steps=0, progress=False)
    evaluation = ntk.conversion["eval_text"]
    windows = [tokenizer(text)["input_ids"][i : i + 8] for text in texts
               for i in range(0, len(text) - 7, 8)]
    assert (evaluation["windows"], evaluation["tokens"]) == (len(windows), 8)
    ids = torch.tensor(windows)
    with torch.no_grad():
        log_probs = torch.log_softmax(peft_model(input_ids=ids).logits[:, :-1], -1)
    expected = math.exp(-log_probs.gather(-1, ids[:, 1:, None]).mean().item())
    perplexity = evaluation["perplexity"]
    assert perplexity["peft_prefix"] == pytest.approx(expected, rel=1e-4)
    assert perplexity["ntk"] == pytest.approx(expected, rel=1e-4)
    assert abs(perplexity["base"] - expected) > 1e-3 * expected  # the prefix matters


def test_a_prefix_of_another_base_model_is_named(tmp_path):
    wider = TinyArchitecture(
        "llama-3-layers", "LlamaForCausalLM", "LlamaConfig",
        {**LLAMA.config, "num_hidden_layers": 3}, "decoder",
    )
    _peft_prefix(wider).save_pretrained(tmp_path / "other")
    with pytest.raises(CompressError, match=r"prefix for another base model.*num_layers 3 \(the base model needs 2\)"):
        convert_prefix(tmp_path / "other", LLAMA.build(), config=CompressConfig(**SMALL), progress=False)


def test_a_recorded_base_model_name_must_match(prefix_dir):
    config_file = prefix_dir / "adapter_config.json"
    record = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**record, "base_model_name_or_path": "/models/other-model"}))
    model = LLAMA.build()
    model.config._name_or_path = "/models/tiny-llama"
    with pytest.raises(CompressError, match=r"trained on base model '/models/other-model'.*tiny-llama"):
        convert_prefix(prefix_dir, model, config=CompressConfig(**SMALL), progress=False)
    ntk = convert_prefix(prefix_dir, model, config=CompressConfig(r=M, **SMALL), steps=0,
                         check_base_model=False, progress=False)
    assert ntk.compression.prefix_tokens == M


def test_other_adapters_and_missing_files_are_named(tmp_path):
    lora = get_peft_model(LLAMA.build(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(CompressError, match=r"'LORA' adapter; convert_prefix reads PEFT prefix tuning"):
        convert_prefix(tmp_path / "lora", LLAMA.build(), progress=False)
    with pytest.raises(CompressError, match=r"no adapter_config.json in .*missing"):
        convert_prefix(tmp_path / "missing", LLAMA.build(), progress=False)


def test_exact_heads_are_named_for_a_prefix_without_tokens(prefix_dir):
    model = LLAMA.build()
    config = CompressConfig(r=2, exact_heads=1, **SMALL)
    with pytest.raises(CompressError, match=r"exact_heads=1 needs the prefix's tokens.*use exact_heads=0"):
        convert_prefix(prefix_dir, model, config=config, steps=0, progress=False)
    assert not any("ntk_" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    "eval_texts, tokenizer, match",
    [(["short"], char_tokenizer, r"no text of eval_texts is 8 tokens long"),
     (["long enough text"], None, r"text eval_texts need a tokenizer"),
     ("one string", char_tokenizer, r"eval_texts must be a list of texts")],
)
def test_bad_eval_texts_are_named(prefix_dir, eval_texts, tokenizer, match):
    tokenizer = tokenizer() if tokenizer is not None else None
    with pytest.raises(CompressError, match=match):
        convert_prefix(prefix_dir, LLAMA.build(), tokenizer=tokenizer, eval_texts=eval_texts,
                       config=CompressConfig(r=M, **SMALL), steps=0, progress=False)
