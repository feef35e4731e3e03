"""The attention functions registered with transformers: registration of the mask functions
(without them padding and causality silently vanish), the two kernel families, causality rules,
static caches, dropout, and arguments NTK-Attention cannot honour."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from ntk_attention import NTKConfig, get_ntk_model
from ntk_attention.ops import ntk_attention
from ntk_attention.tuner import FAMILIES
from ntk_attention.tuner.attention import family_for_base
from ntk_attention.tuner.layer import Geometry, NTKState

from support.testing_models import ARCHITECTURES, randomize_adapter

LLAMA = ARCHITECTURES["llama"]
ROUNDOFF = dict(rtol=1e-5, atol=2e-6)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    pass


def test_attention_and_mask_functions_are_registered_under_one_name():
    assert ALL_MASK_ATTENTION_FUNCTIONS["ntk_sdpa"] is sdpa_mask
    assert ALL_MASK_ATTENTION_FUNCTIONS["ntk_eager"] is eager_mask
    for family in FAMILIES.values():
        assert family.name in AttentionInterface._global_mapping
        assert family.name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def test_family_errors():
    with pytest.raises(ValueError, match="load it with attn_implementation='sdpa'"):
        family_for_base("flash_attention_2")
    with pytest.raises(ValueError, match="already uses NTK attention"):
        family_for_base("ntk_sdpa")


class _Module(torch.nn.Module):
    """A stand-in attention module: what the functions read from a real one."""

    def __init__(self, kv_heads=2, head_dim=8, is_causal=True):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = 2
        self.ntk_state = NTKState(Geometry(0, 2 * kv_heads, kv_heads, head_dim, head_dim**-0.5))
        self.ntk_state.add_adapter("a", NTKConfig(), torch.device("cpu"))
        self.ntk_state.active_adapter = "a"
        randomize_adapter(self, "a")


def _qkv(batch=2, q_len=5, k_len=5, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    return (
        torch.randn(batch, 4, q_len, 8, generator=g),
        torch.randn(batch, 2, k_len, 8, generator=g),
        torch.randn(batch, 2, k_len, 8, generator=g),
    )


def _op(module, q, k, v, **kwargs):
    state = module.ntk_state.op_state("a")
    return ntk_attention(q, k, v, state.z, state.kappa, feature_map=state.feature_map, **kwargs).transpose(1, 2)


def test_sdpa_family_follows_sdpas_causality_rules():
    fn = AttentionInterface._global_mapping["ntk_sdpa"]
    module = _Module().eval()
    q, k, v = _qkv()
    out, weights = fn(module, q, k, v, None, scaling=8**-0.5)
    assert weights is None and out.shape == (2, 5, 4, 8)  # [B, L, H, D]
    torch.testing.assert_close(out, _op(module, q, k, v, is_causal=True), **ROUNDOFF)
    out, _ = fn(module, q, k, v, None, scaling=8**-0.5, is_causal=False)  # the kwarg wins
    torch.testing.assert_close(out, _op(module, q, k, v), **ROUNDOFF)
    # No mask and more keys than queries (an empty static cache): sdpa crops the keys.
    q, k, v = _qkv(q_len=3, k_len=6)
    out, _ = fn(module, q, k, v, None, scaling=8**-0.5)
    torch.testing.assert_close(out, _op(module, q, k[:, :, :3], v[:, :, :3], is_causal=True), **ROUNDOFF)
    # One query (decoding) sees every key.
    q, k, v = _qkv(q_len=1, k_len=6)
    torch.testing.assert_close(fn(module, q, k, v, None)[0], _op(module, q, k, v), **ROUNDOFF)


def test_eager_family_uses_the_mask_only():
    fn = AttentionInterface._global_mapping["ntk_eager"]
    module = _Module().eval()
    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, :, :, 3:] = torch.finfo(torch.float32).min  # additive, as eager_mask builds it
    out, _ = fn(module, q, k, v, mask, scaling=8**-0.5)
    torch.testing.assert_close(out, _op(module, q, k, v, attn_mask=mask, implementation="naive"), **ROUNDOFF)


def test_dropout_only_in_training():
    fn = AttentionInterface._global_mapping["ntk_sdpa"]
    module = _Module(is_causal=False).eval()
    q, k, v = _qkv()
    out, _ = fn(module, q, k, v, None, dropout=0.5)
    torch.testing.assert_close(out, _op(module, q, k, v), **ROUNDOFF)
    module.train()
    torch.manual_seed(0)
    dropped, _ = fn(module, q, k, v, None, dropout=0.5)
    assert not torch.allclose(dropped, out, atol=1e-3)


@pytest.mark.parametrize("name", ["softcap", "s_aux", "position_bias"])
def test_arguments_it_cannot_honour_fail(name):
    fn = AttentionInterface._global_mapping["ntk_sdpa"]
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"passes {name}=..., which NTK-Attention does not support"):
        fn(_Module(), q, k, v, None, **{name: torch.ones(1)})


def test_a_module_without_state_runs_the_base_function_bit_for_bit():
    fn = AttentionInterface._global_mapping["ntk_sdpa"]
    base = AttentionInterface._global_mapping["sdpa"]
    module = _Module()
    module.ntk_state.disabled = True
    q, k, v = _qkv()
    assert torch.equal(fn(module, q, k, v, None, scaling=0.3)[0], base(module, q, k, v, None, scaling=0.3)[0])


def test_eager_and_sdpa_families_agree_on_a_trained_state():
    batch = LLAMA.inputs(batch=2, length=7, pad=3, side="left")
    outputs = []
    for family in ("sdpa", "eager"):
        ntk = get_ntk_model(LLAMA.build(attn_implementation=family), NTKConfig())
        randomize_adapter(ntk)
        with torch.no_grad():
            outputs.append(ntk(**batch).logits[:, 3:])  # the left-padded row's valid part
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


def test_static_cache_generation_equals_dynamic_cache():
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    randomize_adapter(ntk, scale=2.0)
    ids = LLAMA.inputs(batch=2, length=6)["input_ids"]
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        dynamic = ntk.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
        static = ntk.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache_implementation="static", **settings)
    assert torch.equal(dynamic, static)


def test_left_padded_generation_equals_each_row_alone():
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    randomize_adapter(ntk, scale=2.0)
    batch = LLAMA.inputs(batch=2, length=7, pad=3, side="left")
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        together = ntk.generate(**batch, **settings)
        alone = ntk.generate(input_ids=batch["input_ids"][1:, 3:], attention_mask=batch["attention_mask"][1:, 3:], **settings)
    assert torch.equal(together[1:, 3:], alone)
