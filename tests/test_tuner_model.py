"""NTKModel's API: named adapters, trainable flags, target layers, feature maps, low rank,
modules_to_save, per-row mixing (stacked and split paths), and the errors of misuse."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from ntk_attention import NTKConfig, NTKModel, get_ntk_model
from ntk_attention.tuner import ModulesToSaveWrapper, NTKState, UnsupportedModelError

from support.testing_models import ARCHITECTURES, randomize_adapter

LLAMA = ARCHITECTURES["llama"]
BERT = ARCHITECTURES["bert"]
ROUNDOFF = dict(rtol=1e-5, atol=2e-6)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    pass


def _trainable(ntk: NTKModel) -> set[str]:
    return {name for name, p in ntk.named_parameters() if p.requires_grad}


def test_trainable_parameters_are_z_and_kappa(capsys):
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    # 2 layers x 2 KV heads x (Z 8x8 + kappa 8)
    assert ntk.get_nb_trainable_parameters()[0] == 2 * 2 * (64 + 8)
    total = sum(p.numel() for p in ntk.parameters())
    assert ntk.get_nb_trainable_parameters()[1] == total
    ntk.print_trainable_parameters()
    assert capsys.readouterr().out.startswith(f"trainable params: 288 || all params: {total:,d}")


def test_named_adapters_switch_trainable_flags_and_outputs():
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    ntk.add_adapter("b", NTKConfig(target_layers=[-1]))
    assert ntk.active_adapter == "default" and ntk.active_adapters == ["default"]
    assert all(".default" in n for n in _trainable(ntk))
    randomize_adapter(ntk, "default", seed=1)
    randomize_adapter(ntk, "b", seed=2)
    batch = LLAMA.inputs()
    with torch.no_grad():
        out_default = ntk(**batch).logits
        ntk.set_adapter("b")
        out_b = ntk(**batch).logits
    assert all(n.endswith(".b") for n in _trainable(ntk))
    assert {n.split(".ntk_state")[0] for n in _trainable(ntk)} == {"base_model.model.layers.1.self_attn"}
    assert not torch.allclose(out_default, out_b, atol=1e-4)
    ntk.delete_adapter("b")  # the active one: the first remaining becomes active
    assert ntk.active_adapter == "default" and set(ntk.peft_config) == {"default"}
    assert not any(n.endswith(".b") for n, _ in ntk.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(ntk(**batch).logits, out_default, rtol=0, atol=0)


def test_target_layers_and_their_errors():
    ntk = get_ntk_model(LLAMA.build(), NTKConfig(target_layers=[-1]))
    states = [m for m in ntk.modules() if isinstance(m, NTKState)]
    assert [s.geometry.layer_index for s in states] == [1]
    with pytest.raises(ValueError, match=r"target_layers has 2, but the model has 2 self-attention layers \(valid: -2..1\)"):
        ntk.add_adapter("x", NTKConfig(target_layers=[2]))
    with pytest.raises(ValueError, match="name a layer twice"):
        ntk.add_adapter("x", NTKConfig(target_layers=[1, -1]))
    assert set(ntk.peft_config) == {"default"}  # nothing half-added


@pytest.mark.parametrize(
    "config",
    [
        NTKConfig(feature_map="favor", r=24),
        NTKConfig(feature_map="taylor"),
        NTKConfig(feature_map="exp", r=6),
        NTKConfig(rank=3),
        NTKConfig(learn_log_scale=True),
        NTKConfig(implementation="naive"),
    ],
    ids=["favor", "taylor", "exp", "low-rank", "log-scale", "naive"],
)
def test_state_variants_start_at_the_base_model_and_train(config):
    model = LLAMA.build()
    batch = LLAMA.inputs()
    with torch.no_grad():
        expected = model(**batch).logits
    ntk = get_ntk_model(model, config)
    logits = ntk(**batch).logits
    torch.testing.assert_close(logits, expected, **ROUNDOFF)
    logits.pow(2).mean().backward()
    grads = {n: p.grad for n, p in ntk.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    key = ".ntk_z_b." if config.rank else ".ntk_z."
    assert all(g.abs().sum() > 0 for n, g in grads.items() if key in n)


def test_init_normal_is_not_the_base_model():
    model = LLAMA.build()
    batch = LLAMA.inputs()
    with torch.no_grad():
        expected = model(**batch).logits
        ntk = get_ntk_model(model, NTKConfig(init="normal", init_std=1.0))
        assert not torch.allclose(ntk(**batch).logits, expected, atol=1e-4)


def test_modules_to_save_copies_the_head():
    model = BERT.build()
    head = model.classifier
    ntk = get_ntk_model(model, NTKConfig(modules_to_save=["classifier"]))
    wrapper = model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper) and wrapper.original_module is head
    assert wrapper.out_features == head.out_features  # attribute passthrough
    assert not any(p.requires_grad for p in head.parameters())
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert "classifier.weight" in ntk.adapter_state_dict()
    with pytest.raises(ValueError, match="modules_to_save names 'nope'"):
        ntk.add_adapter("x", NTKConfig(modules_to_save=["nope"]))
    with pytest.raises(ValueError, match="cannot name an attention module"):
        ntk.add_adapter("x", NTKConfig(modules_to_save=["attention.self"]))
    assert ntk.unload().classifier is head


def test_passthrough_and_forward_signature():
    model = LLAMA.build()
    ntk = get_ntk_model(model, NTKConfig())
    assert ntk.config is model.config and ntk.get_base_model() is model
    assert ntk.device == model.device
    params = inspect.signature(ntk.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    with pytest.raises(AttributeError):
        _ = ntk.no_such_attribute


def test_unsupported_architecture_lists_supported_ones():
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=50, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(UnsupportedModelError, match="AttentionInterface.*llama, qwen2, mistral, gemma, gpt2, bert, roberta, vit, dinov2"):
        get_ntk_model(bloom, NTKConfig())
    with pytest.raises(UnsupportedModelError):
        get_ntk_model(torch.nn.Linear(3, 3), NTKConfig())


def test_unsupported_base_attention_and_double_wrapping():
    model = LLAMA.build()
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match=r"wraps the attention implementations \['eager', 'sdpa'\].*'flex_attention'"):
        get_ntk_model(model, NTKConfig())
    model.config._attn_implementation_internal = "sdpa"
    assert not any(p.requires_grad is False for p in model.parameters())  # untouched
    ntk = get_ntk_model(model, NTKConfig())
    with pytest.raises(ValueError, match="already an NTKModel"):
        get_ntk_model(ntk, NTKConfig())
    with pytest.raises(ValueError, match="already carries NTK states"):
        get_ntk_model(model, NTKConfig())


@pytest.mark.parametrize("name", ["", "a.b", "__base__", 3])
def test_adapter_names_are_validated(name):
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    with pytest.raises(ValueError, match="adapter names hold"):
        ntk.add_adapter(name, NTKConfig())
    with pytest.raises(ValueError, match="already exists"):
        ntk.add_adapter("default", NTKConfig())


def test_position_offset_needs_positions():
    vit = ARCHITECTURES["vit"].build()
    with pytest.raises(UnsupportedModelError, match="position_offset=4 needs a model with rotary"):
        get_ntk_model(vit, NTKConfig(position_offset=4))
    assert vit.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "second",
    [NTKConfig(seed=5), NTKConfig(feature_map="favor", r=8), NTKConfig(feature_map="exp", r=4), NTKConfig(rank=2)],
    ids=["stacked", "split-by-map", "split-trainable-map", "stacked-low-rank"],
)
def test_mixing_paths_equal_separate_runs(second):
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    ntk.add_adapter("second", second)
    randomize_adapter(ntk, "default", seed=1)
    randomize_adapter(ntk, "second", seed=2)
    batch = LLAMA.inputs(batch=4, length=6, pad=2, side="left")
    names = ["second", "default", "__base__", "second"]
    with torch.no_grad():
        mixed = ntk(**batch, adapter_names=names).logits
        for row, name in enumerate(names):
            single = {k: v[row : row + 1] for k, v in batch.items()}
            if name == "__base__":
                with ntk.disable_adapter():
                    alone = ntk(**single).logits
            else:
                ntk.set_adapter(name)
                alone = ntk(**single).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, **ROUNDOFF)


def test_mixing_gradients_reach_each_adapter():
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    ntk.add_adapter("second", NTKConfig())
    for name, p in ntk.named_parameters():  # both adapters trainable
        if ".ntk_state." in name:
            p.requires_grad_(True)
    ntk(**LLAMA.inputs(batch=2), adapter_names=["second", "__base__"]).logits.pow(2).mean().backward()
    grads = {n: p.grad for n, p in ntk.named_parameters() if ".ntk_z." in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".second"))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.endswith(".default"))


def test_beam_search_expands_the_adapter_names():
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    randomize_adapter(ntk, scale=2.0)
    ids = LLAMA.inputs(batch=2, length=5)["input_ids"]
    settings = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad():
        mixed = ntk.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=["default", "__base__"], **settings)
        first = ntk.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), **settings)
        with ntk.disable_adapter():
            second = ntk.generate(input_ids=ids[1:], attention_mask=torch.ones_like(ids[1:]), **settings)
    assert torch.equal(mixed, torch.cat([first, second]))


def test_mixing_errors():
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    batch = LLAMA.inputs(batch=2)
    with pytest.raises(ValueError, match=r"unknown adapter names \['nope'\]"):
        ntk(**batch, adapter_names=["nope", "default"])
    with pytest.raises(ValueError, match="list of adapter names"):
        ntk(**batch, adapter_names="default")
    with pytest.raises(ValueError, match="adapter_names has 3 entries, but the batch has 2 rows"):
        ntk(**batch, adapter_names=["default"] * 3)
    with ntk.disable_adapter():
        with pytest.raises(ValueError, match="inside disable_adapter"):
            ntk(**batch, adapter_names=["default", "default"])


def test_disable_adapter_restores_after_an_exception():
    ntk = get_ntk_model(BERT.build(), NTKConfig(modules_to_save=["classifier"]))
    with pytest.raises(RuntimeError, match="boom"):
        with ntk.disable_adapter():
            raise RuntimeError("boom")
    assert not any(m.disabled for m in ntk.modules() if isinstance(m, (NTKState, ModulesToSaveWrapper)))


@pytest.mark.parametrize("method", ["merge_and_unload", "merge_adapter", "unmerge_adapter"])
def test_merging_says_a_state_is_not_a_weight_delta(method):
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    with pytest.raises(NotImplementedError, match="cannot be merged .* call unload"):
        getattr(ntk, method)()
    assert ntk.peft_config  # nothing was changed
