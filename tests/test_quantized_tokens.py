"""Exact heads' tokens kept in a few bits (tuner.quantized_tokens, NTKConfig.exact_bits,
CompressConfig.exact_bits): codes and ranges equal a float64 per-group twin, packing round
trips, the size count is what is stored, an adapter with quantised exact heads reads its
tokens back dequantised, saves and loads them, and compression sizes its budget with them."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ntk_attention import NTKConfig, NTKModel, get_ntk_model
from ntk_attention.compress import CompressConfig, CompressError, compress_prompt
from ntk_attention.compress.initial_state import adapter_numel
from ntk_attention.compress.teacher import prompt_prefix
from ntk_attention.tuner import read_state, write_state
from ntk_attention.tuner.quantized_tokens import (
    GROUP,
    QuantizedTokens,
    dequantize,
    quantize,
    stored_numbers,
    token_numbers,
)
from ntk_attention.tuner.save_load import AdapterLoadError

from support.testing import assert_close
from support.testing_models import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA = ARCHITECTURES["llama"]  # 2 layers, 2 KV heads, head dim 8


def _twin(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Float64, one group at a time: x quantised over groups of GROUP along ``dim`` (the last
    group edge-padded) and dequantised."""
    x = x.double().movedim(dim, -1)
    out = torch.empty_like(x)
    length = x.shape[-1]
    for index in itertools.product(*map(range, x.shape[:-1])):
        for start in range(0, length, GROUP):
            group = x[index][start : start + GROUP]
            lo, hi = group.min(), group.max()
            step = (hi - lo) / (2**bits - 1) if hi > lo else torch.tensor(1.0, dtype=torch.float64)
            out[index][start : start + GROUP] = lo + step * torch.round((group - lo) / step)
    return out.movedim(-1, dim)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape, dim", [((2, 70, 12), 1), ((3, 5, 40), 2), ((1, 32, 64), 1)])
def test_quantisation_equals_the_float64_twin(bits, shape, dim):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, 0] = 5.0  # a constant run in some groups
    codes, ranges = quantize(x, bits, dim)
    back = dequantize(codes, ranges, bits, dim, x.shape[dim])
    expected = _twin(x, bits, dim)
    assert back.shape == x.shape and codes.dtype == torch.uint8
    assert_close(back.double(), expected, rtol=0, atol=1e-5)
    step = ranges[..., 1].max().item()
    assert (back - x).abs().max() <= step / 2 + 1e-5  # at most half a step off


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_codes_round_trip_every_code(bits):
    levels = 2**bits
    x = torch.arange(2 * GROUP, dtype=torch.float32).remainder(levels)[None]  # every code, twice
    x[0, :GROUP][0], x[0, GROUP:][0] = 0, 0  # each group spans 0 .. levels - 1
    x[0, 1], x[0, GROUP + 1] = levels - 1, levels - 1
    codes, ranges = quantize(x, bits, 1)
    assert codes.shape == (1, 2 * GROUP * bits // 8)
    assert torch.equal(dequantize(codes, ranges, bits, 1, 2 * GROUP), x)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("tokens, head_dim", [(70, 12), (512, 64), (5, 40)])
def test_the_size_count_is_what_the_module_stores(bits, tokens, head_dim):
    stored = QuantizedTokens(3, tokens, head_dim, bits)
    numbers = sum(stored_numbers(t) for t in stored.state_dict().values())
    assert numbers == 3 * token_numbers(tokens, head_dim, bits)
    assert token_numbers(tokens, head_dim, None) == 2 * tokens * head_dim
    if (tokens, head_dim) == (512, 64) and bits == 4:
        assert token_numbers(tokens, head_dim, bits) / (2 * tokens * head_dim) == 0.3125


def _adapter(bits, seed=0):
    model = LLAMA.build().double()
    config = NTKConfig(feature_map="exp", r=2, position_offset=9, exact_heads=[(0, 1), (1, 0)],
                       exact_tokens=9, exact_bits=bits)
    ntk = get_ntk_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    for _, module in ntk._attention:
        fields = read_state(module, "default")
        write_state(module, "default", {k: torch.randn(v.shape, generator=generator)
                                        for k, v in fields.items()})
    return ntk


def test_an_adapter_reads_its_quantised_tokens_back_dequantised():
    ntk = _adapter(4)
    module = ntk._attention[0][1]
    keys = torch.randn(1, 9, 8, generator=torch.Generator().manual_seed(3))
    write_state(module, "default", exact_keys=keys)
    read = read_state(module, "default")["exact_keys"]
    assert_close(read.double(), _twin(keys, 4, 1), rtol=0, atol=1e-5)
    state = module.ntk_state
    assert "default" not in state.ntk_exact_keys and "default" in state.ntk_exact_quantized
    assert not any(p.dtype == torch.uint8 for p in ntk.parameters())  # codes are buffers
    assert all("exact" not in name for name, p in ntk.named_parameters() if p.requires_grad)


def test_quantised_exact_heads_are_close_to_float_ones_and_save_and_load(tmp_path):
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(1))
    float_ntk = _adapter(None)
    with torch.no_grad():
        reference = float_ntk(input_ids=ids).logits
    ntk = _adapter(8)
    with torch.no_grad():
        out = ntk(input_ids=ids).logits
    assert_close(out, reference, rtol=0.05, atol=0.02)  # 8 bits: near the float tokens
    assert not torch.equal(out, reference)
    ntk.save_pretrained(tmp_path)
    saved = ntk.adapter_state_dict()
    assert any(t.dtype == torch.uint8 for t in saved.values())
    loaded = NTKModel.from_pretrained(LLAMA.build().double(), tmp_path)
    assert loaded.peft_config["default"].exact_bits == 8
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, out)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(exact_heads=[(0, 1)], exact_tokens=4, exact_bits=3), r"exact_bits must be one of \(2, 4, 8\)"),
        (dict(exact_heads=[(0, 1)], exact_tokens=4, exact_bits=True), r"exact_bits must be one of"),
        (dict(exact_bits=4), r"exact_bits is set but exact_heads is None"),
    ],
)
def test_bad_adapter_bits_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NTKConfig(**{"feature_map": "exp", "r": 2, **kwargs})


def test_bad_compress_bits_are_named():
    with pytest.raises(CompressError, match=r"exact_bits must be one of \(2, 4, 8\) or None, got 16"):
        CompressConfig(exact_bits=16)


def test_compression_counts_quantised_heads_in_its_budget():
    """4-bit heads cost less than float ones, so more of them fit the same share; the state's
    reported size is what it stores and stays within the budget."""
    heads, kv = 90, 90 * 512 * 2 * 64  # SmolLM2-135M and a 512-token prompt
    float_heads = CompressConfig(memory_fraction=1 / 32, exact_bits=None)
    assert float_heads.exact_head_count(heads, kv, 64) == 1
    assert float_heads.replace(exact_bits=4).exact_head_count(heads, kv, 64) == 3
    assert float_heads.replace(exact_bits=4, memory_fraction=1 / 8).exact_head_count(heads, kv, 64) == 14

    model = LLAMA.build()
    prompt = torch.randint(3, 97, (80,), generator=torch.Generator().manual_seed(0))
    config = CompressConfig(exact_heads=1, exact_bits=4, memory_fraction=0.5, samples=3,
                            sample_length=8, rereads=2)
    ntk = compress_prompt(model, None, prompt, config=config, steps=2, progress=False)
    report = ntk.compression
    stored = sum(stored_numbers(t) for t in ntk.adapter_state_dict().values())
    assert report.state_numel == pytest.approx(stored, abs=1) and stored <= report.kv_cache_numel / 2
    (layer, head), = report.exact_heads
    prefix, _, _ = prompt_prefix(ntk.unload(), prompt)
    ntk = compress_prompt(model, None, prompt, config=config, steps=2, progress=False)
    kept = read_state(ntk._attention[layer][1], "default")["exact_values"][0]
    assert_close(kept.double(), _twin(prefix.values[layer, head], 4, 1), rtol=0, atol=1e-5)
    float_size = adapter_numel(ntk.peft_config["default"].replace(exact_bits=None), prefix.geometry, 2)
    assert report.state_numel < float_size


def test_a_saved_file_with_float_codes_is_refused(tmp_path):
    ntk = _adapter(4)
    ntk.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("key_codes"))
    tensors[key] = tensors[key].float()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(AdapterLoadError, match=r"key_codes' has dtype torch.float32, the model expects torch.uint8"):
        NTKModel.from_pretrained(LLAMA.build().double(), tmp_path)


@pytest.mark.parametrize("bits, match", [(None, r"QuantizedTokens needs bits"), (3, r"exact_bits must be one of")])
def test_quantized_tokens_need_a_valid_bit_count(bits, match):
    with pytest.raises(ValueError, match=match):
        QuantizedTokens(1, 4, 8, bits)
