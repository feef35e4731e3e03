"""Adapter files: the layout, atomic writes, and every way a load can go wrong failing with an
AdapterLoadError that says what was expected and what was found (and leaving the model as it
was)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ntk_attention import NTKConfig, NTKModel, get_ntk_model
from ntk_attention.tuner import AdapterLoadError, save_load

from support.testing_models import ARCHITECTURES, randomize_adapter

LLAMA = ARCHITECTURES["llama"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    pass


@pytest.fixture
def saved(tmp_path):
    """A saved llama adapter (low rank, learned log scale) and the outputs it gives."""
    ntk = get_ntk_model(LLAMA.build(), NTKConfig(rank=4, learn_log_scale=True, target_layers=[1]))
    randomize_adapter(ntk)
    batch = LLAMA.inputs()
    with torch.no_grad():
        logits = ntk(**batch).logits
    ntk.save_pretrained(tmp_path)
    return tmp_path, batch, logits


def _assert_untouched(model, implementation="sdpa"):
    assert model.config._attn_implementation == implementation
    assert not any("ntk" in name for name, _ in model.named_modules())


def test_files_layout_and_config_record(saved):
    path, _, _ = saved
    document = json.loads((path / "adapter_config.json").read_text())
    assert document["peft_type"] == "NTK_ATTENTION"
    assert document["rank"] == 4 and document["target_layers"] == [1]
    record = document["base_model"]
    assert record["architecture"] == "LlamaForCausalLM" and record["attention_layers"] == 2
    assert record["layers"] == {
        "model.layers.1.self_attn": dict(
                layer_index=1, q_heads=4, kv_heads=2, head_dim=8, scale=8**-0.5, causal=True
            )
    }
    tensors = load_file(path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "model.layers.1.self_attn.ntk_z_a": (2, 8, 4),
        "model.layers.1.self_attn.ntk_z_b": (2, 4, 8),
        "model.layers.1.self_attn.ntk_kappa": (2, 8),
        "model.layers.1.self_attn.ntk_log_scale": (2,),
    }
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_roundtrip_into_a_model_loaded_in_bfloat16_keeps_the_fingerprint(saved):
    path, batch, _ = saved
    model = LLAMA.build().to(torch.bfloat16)
    loaded = NTKModel.from_pretrained(model, path)  # fingerprint compares bf16-rounded values
    assert loaded.active_adapter == "default"


def test_from_pretrained_freezes_unless_trainable(saved):
    path, _, _ = saved
    frozen = NTKModel.from_pretrained(LLAMA.build(), path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = NTKModel.from_pretrained(LLAMA.build(), path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 8 * 4 + 2 * 4 * 8 + 2 * 8 + 2


def test_different_base_weights_fail(saved):
    path, _, _ = saved
    other = LLAMA.build(seed=1)
    with pytest.raises(AdapterLoadError, match="different base weights"):
        NTKModel.from_pretrained(other, path)
    _assert_untouched(other)
    NTKModel.from_pretrained(LLAMA.build(seed=1), path, check_base_weights=False)  # opt-out


def test_different_architecture_fails(saved):
    path, _, _ = saved
    other = ARCHITECTURES["qwen2"].build()
    with pytest.raises(AdapterLoadError, match="saved on a 'LlamaForCausalLM'.*Qwen2ForCausalLM"):
        NTKModel.from_pretrained(other, path)
    _assert_untouched(other)


def test_different_head_count_fails(saved):
    path, _, _ = saved
    config = dict(LLAMA.config, num_key_value_heads=4)
    import transformers

    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    with pytest.raises(AdapterLoadError, match="kv_heads=2 in the adapter's base model but kv_heads=4"):
        NTKModel.from_pretrained(other, path)


def test_different_layer_count_fails(saved):
    path, _, _ = saved
    import transformers

    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(LLAMA.config, num_hidden_layers=3)))
    with pytest.raises(AdapterLoadError, match="has 2 attention layers, this one has 3"):
        NTKModel.from_pretrained(other, path)


def test_edited_config_does_not_match_the_weights(saved):
    path, _, _ = saved
    document = json.loads((path / "adapter_config.json").read_text())
    document["rank"] = 3
    (path / "adapter_config.json").write_text(json.dumps(document))
    model = LLAMA.build()
    with pytest.raises(AdapterLoadError, match="different saves"):
        NTKModel.from_pretrained(model, path)
    _assert_untouched(model)


def test_weights_with_wrong_shapes_fail_even_with_a_matching_digest(saved):
    path, _, _ = saved
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["model.layers.1.self_attn.ntk_kappa"] = torch.zeros(2, 5)
    metadata = {"format": "pt", "ntk_config_sha256": save_load.config_digest(NTKConfig(rank=4, learn_log_scale=True, target_layers=[1]))}
    save_file(tensors, path / "adapter_model.safetensors", metadata=metadata)
    with pytest.raises(AdapterLoadError, match=r"ntk_kappa' has shape \(2, 5\), the model expects \(2, 8\)"):
        NTKModel.from_pretrained(LLAMA.build(), path)


def test_missing_and_unexpected_keys_fail(saved):
    path, _, _ = saved
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["model.layers.0.self_attn.ntk_z"] = tensors.pop("model.layers.1.self_attn.ntk_z_a")
    digest = save_load.config_digest(NTKConfig(rank=4, learn_log_scale=True, target_layers=[1]))
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt", "ntk_config_sha256": digest})
    with pytest.raises(AdapterLoadError, match="missing .*ntk_z_a.*unexpected .*layers.0.self_attn.ntk_z"):
        NTKModel.from_pretrained(LLAMA.build(), path)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupted_safetensors_fail_clearly(saved, damage):
    path, _, _ = saved
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) - 20])
    elif damage == "garbage_header":
        weights.write_bytes(b"\xff" * 8 + data[8:])
    else:
        weights.write_bytes(b"")
    model = LLAMA.build()
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        NTKModel.from_pretrained(model, path)
    _assert_untouched(model)


def test_non_finite_weights_fail(saved):
    path, _, _ = saved
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["model.layers.1.self_attn.ntk_z_b"][0, 0, 0] = float("nan")
    digest = save_load.config_digest(NTKConfig(rank=4, learn_log_scale=True, target_layers=[1]))
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt", "ntk_config_sha256": digest})
    with pytest.raises(AdapterLoadError, match="NaN or infinite"):
        NTKModel.from_pretrained(LLAMA.build(), path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(peft_type="LORA"), "'LORA' adapter, not an NTK-Attention one .* load it with peft.PeftModel.from_pretrained"),
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d.update(feature_map="nope"), "invalid NTKConfig: feature_map"),
        (lambda d: d.update(typo_field=1), r"unknown NTKConfig fields \['typo_field'\]"),
        (lambda d: d.pop("base_model"), "no base_model record"),
    ],
)
def test_bad_config_files_fail(saved, edit, message):
    path, _, _ = saved
    document = json.loads((path / "adapter_config.json").read_text())
    edit(document)
    (path / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match=message):
        NTKModel.from_pretrained(LLAMA.build(), path)


def test_missing_files_and_invalid_json_fail(tmp_path, saved):
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        NTKModel.from_pretrained(LLAMA.build(), tmp_path / "nowhere")
    path, _, _ = saved
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        NTKModel.from_pretrained(LLAMA.build(), path)
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_config.json").unlink()


def test_a_failed_write_leaves_the_previous_files(saved, monkeypatch):
    path, _, _ = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_load, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ntk.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # no temp file, no change


def test_load_adapter_adds_a_named_adapter_and_failure_rolls_back(saved):
    path, batch, logits = saved
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    ntk.load_adapter(path, "loaded")
    assert ntk.active_adapter == "default" and set(ntk.peft_config) == {"default", "loaded"}
    ntk.set_adapter("loaded")
    with torch.no_grad():
        torch.testing.assert_close(ntk(**batch).logits, logits, rtol=0, atol=0)
    (path / "adapter_model.safetensors").write_bytes(b"broken")
    with pytest.raises(AdapterLoadError):
        ntk.load_adapter(path, "broken")
    assert set(ntk.peft_config) == {"default", "loaded"}
    assert not any(".broken" in name for name, _ in ntk.named_parameters())


def test_several_adapters_save_to_subfolders(tmp_path):
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    ntk.add_adapter("second", NTKConfig(feature_map="favor", r=12))
    randomize_adapter(ntk, "second")
    ntk.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    other = NTKModel.from_pretrained(LLAMA.build(), tmp_path / "second", adapter_name="second")
    batch = LLAMA.inputs()
    ntk.set_adapter("second")
    with torch.no_grad():
        torch.testing.assert_close(other(**batch).logits, ntk(**batch).logits, rtol=0, atol=0)


def test_fingerprint_samples_stay_inside_large_tensors():
    """Beyond 2^24 elements a float32 linspace rounds the last sample index up to numel()
    (an IndexError on SmolLM2's 49152 x 576 embedding); the indices are integers."""
    from ntk_attention.tuner.save_load import weights_fingerprint

    big = torch.zeros(28_311_552, dtype=torch.bfloat16)
    big[-1] = 1.0
    assert weights_fingerprint([("w", big)]) != weights_fingerprint([("w", torch.zeros_like(big))])


def test_an_adapter_of_another_architecture_is_named_before_its_layers_are_checked(tmp_path):
    # exact heads in layer 3 of a 4-layer decoder: a 2-layer encoder lacks that layer, and
    # before the architecture check that was the message ("exact_heads names layers [3]...").
    config = dict(ARCHITECTURES["llama"].config, num_hidden_layers=4)
    import transformers

    decoder = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    ntk = get_ntk_model(decoder, NTKConfig(feature_map="exp", r=4, exact_heads=((3, 0),),
                                           exact_tokens=2))
    ntk.save_pretrained(tmp_path)
    encoder = ARCHITECTURES["bert"].build()
    with pytest.raises(AdapterLoadError, match="saved on a 'LlamaForCausalLM'.*'BertFor"):
        NTKModel.from_pretrained(encoder, tmp_path)
    _assert_untouched(encoder)
    wrapped = get_ntk_model(encoder, NTKConfig())
    with pytest.raises(AdapterLoadError, match="saved on a 'LlamaForCausalLM'"):
        wrapped.load_adapter(tmp_path, adapter_name="other")
    assert list(wrapped.peft_config) == ["default"]


@pytest.mark.parametrize("document", [{}, {"r": 4}])
def test_a_config_without_peft_type_says_it_is_not_an_adapter_config(tmp_path, document):
    (tmp_path / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match="has no peft_type, so it is not an adapter's config"):
        NTKModel.from_pretrained(LLAMA.build(), tmp_path)


def test_an_adapter_saved_before_a_field_existed_still_loads(saved):
    """A file written before exact_bits / gated / sink_tokens existed has none of them in its
    config and a digest computed without them: it loads as the value their absence means."""
    path, batch, logits = saved
    config_path = path / "adapter_config.json"
    document = json.loads(config_path.read_text())
    for name in ("exact_bits", "gated"):
        assert name in document
        del document[name]
    config_path.write_text(json.dumps(document))
    # the digest as the version before exact_bits computed it: over the fields it knew
    fields = NTKConfig(rank=4, learn_log_scale=True, target_layers=[1]).to_dict()
    for name in ("exact_bits", "gated"):
        del fields[name]
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    weights = path / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={
        "format": "pt", "ntk_config_sha256": hashlib.sha256(text.encode()).hexdigest()})
    ntk = NTKModel.from_pretrained(LLAMA.build(), path)
    assert ntk.peft_config["default"].exact_bits is None
    with torch.no_grad():
        assert torch.equal(ntk(**batch).logits, logits)


def test_a_tensor_of_another_kind_of_dtype_is_refused(saved):
    path, _, _ = saved
    weights = path / "adapter_model.safetensors"
    metadata = {"format": "pt", "ntk_config_sha256": save_load.config_digest(
        NTKConfig(rank=4, learn_log_scale=True, target_layers=[1]))}
    tensors = load_file(weights)
    tensors["model.layers.1.self_attn.ntk_kappa"] = tensors["model.layers.1.self_attn.ntk_kappa"].long()
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(AdapterLoadError, match=r"ntk_kappa' has dtype torch.int64, the model expects torch.float32"):
        NTKModel.from_pretrained(LLAMA.build(), path)
