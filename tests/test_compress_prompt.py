"""compress_prompt on tiny random models: with exp features and the prompt's own keys/values
copied in (r = prompt length) the compressed model *is* the full-prompt model (GQA, positions,
generate() with the cache); distillation lowers its loss; the adapter saves and loads to the
same outputs; the default state fits 1/8 of the KV cache; bad input is named."""

from __future__ import annotations

import pytest
import torch

from ntk_attention.compress import CompressConfig, CompressError, compress_prompt
from ntk_attention.compress.token_selection import by_mass, sink_and_recent, snapkv
from ntk_attention.tuner import NTKModel

from support.testing import assert_close
from support.testing_models import ARCHITECTURES, char_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA = ARCHITECTURES["llama"]  # 4 query heads, 2 KV heads (GQA), rotary positions
PROMPT_LEN = 24
# Small distillation inputs: tests check behaviour, not quality.
SMALL = dict(samples=3, sample_length=8, rereads=2)


def _prompt(seed: int = 0, length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed))


def _continuation(rows: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 97, (rows, length), generator=torch.Generator().manual_seed(99))


def _exact(model, prompt, **changes):
    config = CompressConfig(**{"r": prompt.numel(), **SMALL, **changes})
    return compress_prompt(model, None, prompt, config=config, steps=0, progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_copied_into_exp_state_equals_the_full_prompt_model(arch):
    model = ARCHITECTURES[arch].build().double()
    prompt, cont = _prompt(), _continuation()
    with torch.no_grad():
        full = model(input_ids=torch.cat([prompt.expand(2, -1), cont], 1)).logits[:, PROMPT_LEN:]
    ntk = _exact(model, prompt)
    assert ntk.peft_config["default"].position_offset == PROMPT_LEN
    with torch.no_grad():
        out = ntk(input_ids=cont).logits
    # The adapter stores its state in float32: the only difference is that rounding.
    assert_close(out, full, rtol=1e-6, atol=1e-6)
    with torch.no_grad(), ntk.disable_adapter():  # without the state the prompt is missing
        dropped = ntk(input_ids=cont, position_ids=torch.arange(PROMPT_LEN, PROMPT_LEN + 6).expand(2, -1)).logits
    assert (dropped - full).abs().max() > 1e-2


# Two exact states: every prompt token a virtual token, or every KV head an exact head.
EXACT_STATES = {"virtual tokens": {},
                "exact heads": dict(r=1, exact_heads=4, exact_bits=None, memory_fraction=None)}


@pytest.mark.parametrize("state", EXACT_STATES)
def test_generate_with_cache_equals_the_full_prompt_model(state):
    model = LLAMA.build()
    prompt, cont = _prompt(), _continuation(rows=1)
    ntk = _exact(model, prompt, **EXACT_STATES[state])
    settings = dict(max_new_tokens=8, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        compressed = ntk.generate(input_ids=cont, attention_mask=torch.ones_like(cont), **settings)
        with ntk.disable_adapter():
            ids = torch.cat([prompt[None], cont], 1)
            full = ntk.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    assert torch.equal(compressed.sequences[:, cont.shape[1]:], full.sequences[:, ids.shape[1]:])
    for a, b in zip(compressed.scores, full.scores, strict=False):
        assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("feature_map", ["exp", "elu"])
def test_distillation_lowers_its_loss(feature_map):
    model = LLAMA.build()
    config = CompressConfig(feature_map=feature_map, memory_fraction=None if feature_map == "elu" else 1 / 8,
                            lr=1e-2, batch_size=None, **SMALL)
    ntk = compress_prompt(model, None, _prompt(), config=config, steps=40, progress=False)
    losses = ntk.compression.layer_losses
    assert len(losses) == 41
    assert losses[-1] < 0.8 * losses[0]


def test_end_to_end_distillation_lowers_the_kl():
    model = LLAMA.build()
    config = CompressConfig(r=3, e2e_steps=15, e2e_lr=1e-2, e2e_batch_size=5, **SMALL)
    ntk = compress_prompt(model, None, _prompt(), config=config, steps=0, progress=False)
    losses = ntk.compression.end_to_end_losses
    assert len(losses) == 15 and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "changes",
    [dict(), dict(feature_map="elu", memory_fraction=None), dict(feature_map="elu", memory_fraction=0.2),
     dict(exact_heads=2, memory_fraction=0.75)],
    ids=["exp", "elu-dense", "elu-low-rank", "exp-exact-heads"],
)
def test_written_adapter_loads_to_identical_outputs(tmp_path, changes):
    model = LLAMA.build()
    config = CompressConfig(memory_fraction=changes.pop("memory_fraction", 1 / 2), **SMALL, **changes)
    ntk = compress_prompt(model, None, _prompt(), config=config, steps=5, progress=False)
    cont = _continuation()
    with torch.no_grad():
        before = ntk(input_ids=cont).logits
        generated = ntk.generate(input_ids=cont[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    ntk.save_pretrained(tmp_path)
    loaded = NTKModel.from_pretrained(LLAMA.build(), tmp_path)
    assert loaded.peft_config["default"] == ntk.peft_config["default"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=cont).logits, before, rtol=0, atol=0)
        again = loaded.generate(input_ids=cont[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(again, generated)


def test_low_rank_elu_state_is_chosen_to_fit_the_budget():
    model = LLAMA.build()
    config = CompressConfig(feature_map="elu", memory_fraction=0.2, **SMALL)
    ntk = compress_prompt(model, None, _prompt(), config=config, steps=0, progress=False)
    report = ntk.compression
    assert report.rank is not None and report.feature_map == "elu+exp"
    assert report.state_numel <= 0.2 * report.kv_cache_numel


def test_default_state_is_at_most_an_eighth_of_the_kv_cache_counting_every_tensor():
    model = LLAMA.build()
    prompt = _prompt(length=80)
    ntk = compress_prompt(model, None, prompt, config=CompressConfig(**SMALL), steps=0, progress=False)
    stored = sum(t.numel() for t in ntk.adapter_state_dict().values())
    kv_cache = 2 * 2 * 2 * 8 * prompt.numel()  # K and V, 2 layers, 2 KV heads, head dim 8
    assert ntk.compression.state_numel == stored
    assert ntk.compression.kv_cache_numel == kv_cache
    assert stored <= kv_cache / 8 < stored + 2 * 2 * (2 * 8 + 2)  # one more token would not fit


def test_a_fixed_size_state_keeps_its_size_as_the_prompt_grows():
    # memory_bytes: the budget is bytes (float32 numbers), not a share of the prompt's cache,
    # so a prompt 4x as long gets a state of the same size (and its exact heads, which keep
    # every prompt token, give way to virtual tokens; float heads here, whose size is simple)
    model = LLAMA.build()
    budget = 4 * 2 * 2 * 2 * 8 * 40  # a 40-token prompt's whole cache, in bytes
    sizes = []
    for length in (40, 160):
        config = CompressConfig(memory_bytes=budget, exact_bits=None, **SMALL)
        ntk = compress_prompt(model, None, _prompt(length=length), config=config, steps=0,
                              progress=False)
        try:
            report = ntk.compression
            stored = sum(t.numel() for t in ntk.adapter_state_dict().values())
        finally:
            ntk.unload()
        assert report.state_numel == stored <= budget // 4
        assert stored + 2 * 2 * (2 * 8 + 2) > budget // 4  # one more virtual token would not fit
        sizes.append(len(report.exact_heads))
    assert sizes == [1, 0]  # 0.4 of the budget holds 1 of 4 heads at 40 tokens, none at 160


def test_memory_mib_sets_a_fixed_size_from_the_command_line(tmp_path):
    from ntk_attention.cli import build_parser
    from ntk_attention.cli.compression import _config

    args = build_parser().parse_args(["compress-prompt", "--model", "m", "--prompt-file", "p",
                                      "--output", str(tmp_path), "--memory-mib", "0.5"])
    assert _config(args).memory_bytes == 2**19
    with pytest.raises(SystemExit):  # one size setting at a time
        build_parser().parse_args(["compress-prompt", "--model", "m", "--prompt-file", "p",
                                   "--output", str(tmp_path), "--memory-mib", "1",
                                   "--memory-fraction", "0.1"])


def test_deterministic_for_a_seed():
    def run(seed):
        ntk = compress_prompt(LLAMA.build(), None, _prompt(), config=CompressConfig(r=4, **SMALL),
                              steps=5, seed=seed, progress=False)
        return ntk.adapter_state_dict()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_text_prompts_go_through_the_tokenizer():
    ntk = compress_prompt(LLAMA.build(), char_tokenizer(), "a prompt of some length",
                          config=CompressConfig(r=4, **SMALL), steps=0, progress=False)
    assert ntk.compression.prefix_tokens == len("a prompt of some length")


BAD = {
    "empty text": (lambda: ("", None), r"prompt is empty"),
    "empty ids": (lambda: (torch.tensor([], dtype=torch.long), None), r"prompt is empty \(0 tokens\)"),
    "float ids": (lambda: (torch.ones(4), None), r"must be integers"),
    "2-D ids": (lambda: (torch.ones(2, 4, dtype=torch.long), None), r"1-D"),
    "too long": (lambda: (_prompt(length=300), None), r"300 tokens.*only 256 positions"),
    "too long with samples": (lambda: (_prompt(length=250), None), r"250 tokens.*sample_length=8.*258"),
    "text without tokenizer": (lambda: ("hello", "no-tokenizer"), r"text prompt needs a tokenizer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_prompts_are_named(case):
    make, match = BAD[case]
    prompt, flag = make()
    with pytest.raises(CompressError, match=match):
        compress_prompt(LLAMA.build(), None, prompt, config=CompressConfig(**SMALL), progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), r"r must be a positive int, got r=0"),
        (dict(r=-2), r"r must be a positive int, got r=-2"),
        (dict(feature_map="relu"), r"feature_map must be one of"),
        (dict(feature_map="elu", r=8), r"fixes its own r"),
        (dict(feature_map="favor", sink=1), r"exact sink needs exponential features"),
        (dict(init="closed_form"), r"closed_form.*kernel feature maps"),
        (dict(memory_fraction=0), r"memory_fraction must be a number > 0"),
        (dict(memory_bytes=0), r"memory_bytes must be a positive int"),
        (dict(steps=-1), r"steps must be an int >= 0"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(CompressError, match=match):
        CompressConfig(**kwargs)


def test_a_budget_too_small_for_one_token_is_named():
    config = CompressConfig(memory_fraction=1e-4, **SMALL)
    with pytest.raises(CompressError, match=r"memory budget .* smaller than one exp feature"):
        compress_prompt(LLAMA.build(), None, _prompt(), config=config, progress=False)


def test_the_model_is_left_as_it_was_after_a_failure():
    model = LLAMA.build()
    with pytest.raises(CompressError):
        compress_prompt(model, None, _prompt(), config=CompressConfig(memory_fraction=1e-4, **SMALL),
                        progress=False)
    assert model.config._attn_implementation == "sdpa"
    assert not any("ntk_" in name for name, _ in model.named_parameters())


# ----------------------------------------------------------------------------- selection
def test_selection_rules_keep_the_sink_and_stay_sorted():
    mass = torch.rand(3, 2, 50, generator=torch.Generator().manual_seed(0))
    mass[..., 0] = 0.0  # the sink is kept even with no mass
    index = by_mass(mass, 10, sink=2)
    assert index.shape == (3, 2, 10)
    assert (index[..., :2] == torch.tensor([0, 1])).all()
    assert (index.diff(dim=-1) > 0).all()
    best = mass[..., 2:].topk(8, dim=-1).indices + 2
    assert torch.equal(index[..., 2:], best.sort(-1).values)

    recent = sink_and_recent(50, 10, layers=3, kv_heads=2, sink=4)
    assert recent[0, 0].tolist() == [0, 1, 2, 3, 44, 45, 46, 47, 48, 49]

    kept = snapkv(mass, 12, window=32)
    assert kept.shape == (3, 2, 12) and (kept[..., -6:] == torch.arange(44, 50)).all()
    assert by_mass(mass, 80).shape[-1] == 50  # never more than the prompt holds
