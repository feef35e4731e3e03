"""Exact (retrieval) heads of a compressed prompt, on tiny random models: the retrieval score
matches attention probabilities read from the eager model; with every KV head exact the
compressed model *is* the full-prompt model (generate with the cache and save/load:
test_compress_prompt); the kept tokens survive distillation; the size counts them; every op path
agrees with the naive twin; bad settings are named."""

from __future__ import annotations

import pytest
import torch

from ntk_attention import NTKConfig, get_ntk_model
from ntk_attention.compress import CompressConfig, CompressError, compress_prompt
from ntk_attention.compress.teacher import prompt_prefix, retrieval_scores

from support.testing import assert_close
from support.testing_models import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA = ARCHITECTURES["llama"]  # 2 layers, 4 query heads, 2 KV heads
PROMPT_LEN = 24
SMALL = dict(samples=3, sample_length=8, rereads=2)


def _prompt(length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(0))


def _continuation(rows: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 97, (rows, length), generator=torch.Generator().manual_seed(99))


def test_retrieval_scores_equal_the_eager_models_attention_probabilities():
    model = LLAMA.build(attn_implementation="eager").double()
    prompt, length, skip = _prompt(), 6, 2  # 3 windows fit: (24 - 1) // 6
    prefix, _, _ = prompt_prefix(model, prompt)
    scores = retrieval_scores(model, prefix, prompt, windows=3, length=length, skip=skip)
    # the twin: read each window after the prompt in one eager forward and look up the
    # probability that window token j puts on the prompt token after its first occurrence
    starts = torch.linspace(0, PROMPT_LEN - 1 - length, 3).round().long().tolist()
    expected = torch.zeros(2, 2, dtype=torch.float64)
    for start in starts:
        ids = torch.cat([prompt, prompt[start : start + length]])[None]
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True).attentions
        for layer, probs in enumerate(attentions):  # [1, Hq, m + L, m + L]
            for j in range(skip, length):
                row = probs[0, :, PROMPT_LEN + j, start + j + 1]  # [Hq]
                expected[layer] += row.reshape(2, 2).sum(-1)
    expected /= len(starts) * 2 * (length - skip)
    assert scores.shape == (2, 2)
    assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_head_exact_equals_the_full_prompt_model(arch):
    model = ARCHITECTURES[arch].build().double()
    prompt, cont = _prompt(), _continuation()
    with torch.no_grad():
        full = model(input_ids=torch.cat([prompt.expand(2, -1), cont], 1)).logits[:, PROMPT_LEN:]
    config = CompressConfig(r=1, exact_heads=4, exact_bits=None, memory_fraction=None, **SMALL)
    ntk = compress_prompt(model, None, prompt, config=config, steps=0, progress=False)
    assert sorted(map(tuple, ntk.compression.exact_heads)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with torch.no_grad():
        out = ntk(input_ids=cont).logits
    assert_close(out, full, rtol=1e-6, atol=1e-6)  # the state is stored in float32


def test_one_exact_head_is_exact_and_the_others_see_none_of_its_tokens():
    """Head (0, 1) keeps the prompt; head (0, 0) with empty virtual tokens is the base model."""
    model = LLAMA.build().double()
    prompt, cont = _prompt(), _continuation()
    prefix, _, _ = prompt_prefix(model, prompt)
    config = NTKConfig(feature_map="exp", r=2, position_offset=PROMPT_LEN,
                       exact_heads=[(0, 1)], exact_tokens=PROMPT_LEN)
    ntk = get_ntk_model(model, config)
    state = model.model.layers[0].self_attn.ntk_state
    with torch.no_grad():
        state.ntk_exact_keys["default"].copy_(prefix.keys[0, 1:2])
        state.ntk_exact_values["default"].copy_(prefix.values[0, 1:2])
        read = state.op_state("default")
    assert read.z.shape == (2, 2 + PROMPT_LEN, 8)
    assert torch.equal(read.kappa[1, 2:], torch.ones(PROMPT_LEN, dtype=read.kappa.dtype))
    assert torch.equal(read.kappa[0, 2:], torch.zeros(PROMPT_LEN, dtype=read.kappa.dtype))
    assert torch.isneginf(read.feature_map.bias[0, 2:]).all() and (read.feature_map.bias[1, 2:] == 0).all()
    with torch.no_grad():
        assert torch.isfinite(ntk(input_ids=cont).logits).all()
    assert model.model.layers[1].self_attn.ntk_state.exact_heads == {}  # layer 1 keeps nothing


def test_distillation_keeps_the_exact_tokens_and_lowers_its_loss():
    model = LLAMA.build()
    prompt = _prompt()
    config = CompressConfig(exact_heads=1, exact_bits=None, memory_fraction=0.5, lr=1e-2,
                            batch_size=None, **SMALL)
    ntk = compress_prompt(model, None, prompt, config=config, steps=30, progress=False)
    (layer, head), = ntk.compression.exact_heads
    prefix, _, _ = prompt_prefix(ntk.unload(), prompt)  # the teacher's own keys and values
    ntk = compress_prompt(model, None, prompt, config=config, steps=30, progress=False)
    state = ntk.base_model.model.layers[layer].self_attn.ntk_state
    assert torch.equal(state.ntk_exact_keys["default"][0], prefix.keys[layer, head].float())
    assert torch.equal(state.ntk_exact_values["default"][0], prefix.values[layer, head].float())
    assert (state.ntk_kappa["default"][head] == 0).all()  # its virtual tokens stay empty
    losses = ntk.compression.layer_losses
    assert losses[-1] < 0.8 * losses[0]


def test_the_size_counts_the_kept_tokens_and_fits_the_budget():
    model = LLAMA.build()
    prompt = _prompt(length=80)
    config = CompressConfig(exact_heads=1, exact_bits=None, memory_fraction=0.5, **SMALL)
    ntk = compress_prompt(model, None, prompt, config=config, steps=0, progress=False)
    stored = sum(t.numel() for t in ntk.adapter_state_dict().values())
    kv_cache = 2 * 2 * 2 * 8 * prompt.numel()  # K and V, 2 layers, 2 KV heads, head dim 8
    assert ntk.compression.state_numel == stored <= kv_cache / 2
    assert stored >= 2 * 80 * 8  # the exact head's keys and values are in it
    assert stored + 4 * (2 * 8 + 2) > kv_cache / 2  # one more virtual token would not fit


def test_the_default_number_of_exact_heads_is_a_share_of_the_budget():
    heads = 90  # SmolLM2-135M: 30 layers x 3 KV heads
    kv = heads * 512 * 2 * 64  # a 512-token prompt's KV cache
    # 4-bit heads (the default) cost 0.3125 of a float head: 36 fit in 1/8 of the cache
    assert CompressConfig().exact_head_count(heads, kv, 64) == 14  # 0.4 x 36 = 14.4
    assert CompressConfig(memory_fraction=1 / 32).exact_head_count(heads, kv, 64) == 3  # 3.6
    float_heads = CompressConfig(exact_bits=None)
    assert float_heads.exact_head_count(heads, kv, 64) == 4  # 0.4 x 1/8 x 90 = 4.5
    assert float_heads.replace(memory_fraction=1 / 32).exact_head_count(heads, kv, 64) == 1
    assert CompressConfig(memory_fraction=None).exact_head_count(heads, kv, 64) == 0
    assert CompressConfig(feature_map="elu").exact_head_count(heads, kv, 64) == 0
    assert CompressConfig(exact_heads=0).exact_head_count(heads, kv, 64) == 0
    assert CompressConfig(exact_heads=200).exact_head_count(heads, kv, 64) == 90
    # a fixed size in bytes: the same heads for this prompt as the equal fraction, fewer for a
    # prompt 4x as long (each keeps every token), none once one head's share does not fit
    equal = 4 * kv // 8  # bytes of 1/8 of this prompt's cache (float32)
    fixed = float_heads.replace(memory_bytes=equal)
    assert fixed.exact_head_count(heads, kv, 64) == 4
    assert fixed.exact_head_count(heads, 4 * kv, 64) == 1
    assert fixed.exact_head_count(heads, 16 * kv, 64) == 0
    assert float_heads.replace(memory_fraction=1 / 4).exact_head_count(heads, kv, 64) == 9  # 9.0 exactly


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(exact_heads=-1), r"exact_heads must be an int >= 0"),
        (dict(exact_heads=2, feature_map="elu"), r"exact_heads .* need feature_map 'exp'"),
        (dict(exact_heads=2, rank=4), r"exact_heads need a dense Z"),
    ],
)
def test_bad_compress_settings_are_named(kwargs, match):
    with pytest.raises(CompressError, match=match):
        CompressConfig(**kwargs)


def test_exact_heads_larger_than_the_budget_are_named():
    model = LLAMA.build()
    config = CompressConfig(exact_heads=2, exact_bits=None, memory_fraction=0.25, **SMALL)  # 2 of 4: half
    with pytest.raises(CompressError, match=r"2 exact heads keep 768 numbers, the whole memory budget"):
        compress_prompt(model, None, _prompt(), config=config, progress=False)
    assert not any("ntk_" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(exact_heads=[(0, 1)]), r"exact_tokens must be a positive int"),
        (dict(exact_tokens=4), r"exact_tokens is set but exact_heads is None"),
        (dict(exact_heads=[0, 1], exact_tokens=4), r"list of \(layer, kv_head\) pairs"),
        (dict(exact_heads=[(0, -1)], exact_tokens=4), r"list of \(layer, kv_head\) pairs"),
        (dict(exact_heads=[(0, 1), (0, 1)], exact_tokens=4), r"exact_heads has duplicates"),
        (dict(exact_heads=[(0, 1)], exact_tokens=4, feature_map="elu", r=None), r"need feature_map 'exp'"),
        (dict(exact_heads=[(0, 1)], exact_tokens=4, rank=2), r"dense Z and no learned log scale"),
    ],
)
def test_bad_adapter_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NTKConfig(**{"feature_map": "exp", "r": 2, **kwargs})


@pytest.mark.parametrize(
    "exact_heads, match",
    [([(1, 5)], r"KV head 5 of layer 1, which has 2 KV heads"), ([(7, 0)], r"layers \[7\], which the adapter does not target")],
)
def test_exact_heads_outside_the_model_are_named(exact_heads, match):
    config = NTKConfig(feature_map="exp", r=2, exact_heads=exact_heads, exact_tokens=4)
    model = LLAMA.build()
    with pytest.raises(ValueError, match=match):
        get_ntk_model(model, config)
    assert not any("ntk_" in name for name, _ in model.named_parameters())


def test_config_round_trips_with_exact_heads():
    config = NTKConfig(feature_map="exp", r=2, exact_heads=[[0, 1], [1, 0]], exact_tokens=4)
    assert config.exact_heads == ((0, 1), (1, 0))
    data = config.to_dict()
    assert data["exact_heads"] == [[0, 1], [1, 0]]
    assert NTKConfig.from_dict(data) == config


@pytest.mark.parametrize("implementation", ["fused", "lse"])
def test_every_op_path_with_exact_heads_equals_the_naive_twin(implementation):
    """Outputs and gradients (the -inf biases that hide kept tokens from other heads included)."""

    def run(path):
        model = LLAMA.build()
        config = NTKConfig(feature_map="exp", r=3, exact_heads=[(0, 1), (1, 0)], exact_tokens=5,
                           position_offset=5, implementation=path)
        ntk = get_ntk_model(model, config)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in ntk.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
        logits = ntk(input_ids=ids).logits
        logits.square().mean().backward()
        grads = {n: p.grad for n, p in ntk.named_parameters() if p.requires_grad}
        return logits.detach(), grads

    logits, grads = run(implementation)
    naive_logits, naive_grads = run("naive")
    assert_close(logits, naive_logits, rtol=1e-4, atol=1e-5)
    assert any("ntk_exact_keys" in name for name in grads)
    for name, grad in naive_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        assert_close(grads[name], grad, rtol=1e-3, atol=1e-5)
