"""Training an adapted model the ways users do: transformers.Trainer, gradient checkpointing
(also with per-row adapter mixing, whose names must survive the recomputation), bf16 autocast,
and torch.compile (slow: compiling takes ~a minute on 2 CPU cores)."""

from __future__ import annotations

import pytest
import torch
import transformers

from ntk_attention import NTKConfig, NTKModel, get_ntk_model

from support.testing_models import ARCHITECTURES, randomize_adapter

LLAMA = ARCHITECTURES["llama"]
BERT = ARCHITECTURES["bert"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    pass


def _dataset(arch, rows=12, length=8):
    import datasets

    batch = arch.inputs(batch=rows, length=length, seed=3)
    data = {k: v.tolist() for k, v in batch.items()}
    if arch.kind == "decoder":
        data["labels"] = data["input_ids"]
    else:
        data["labels"] = [i % 3 for i in range(rows)]
    data["unused_text"] = ["x"] * rows  # a column Trainer must drop (not a forward argument)
    return datasets.Dataset.from_dict(data)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_trainer_trains_only_the_adapter(arch, tmp_path):
    spec = ARCHITECTURES[arch]
    ntk = get_ntk_model(spec.build(), NTKConfig(modules_to_save=[spec.head] if spec.head else None))
    before = {n: p.detach().clone() for n, p in ntk.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=ntk, args=args, train_dataset=_dataset(spec))
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    changed = {n for n, p in ntk.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".ntk_" in n or ".modules_to_save." in n for n in changed)
    ntk.save_pretrained(tmp_path / "adapter")
    NTKModel.from_pretrained(spec.build(), tmp_path / "adapter")


def _grads(ntk, batch, **kwargs):
    ntk.zero_grad()
    ntk(**batch, **kwargs).logits.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in ntk.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mixed", [False, True], ids=["active", "mixed"])
def test_gradient_checkpointing_gives_the_same_gradients(mixed):
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    ntk.add_adapter("other", NTKConfig())
    randomize_adapter(ntk, "default", seed=1)
    randomize_adapter(ntk, "other", seed=2)
    for name, p in ntk.named_parameters():
        p.requires_grad_(".ntk_state." in name)
    ntk.train()
    batch = LLAMA.inputs(batch=2, length=7, pad=2)
    kwargs = dict(adapter_names=["other", "default"]) if mixed else {}
    plain = _grads(ntk, batch, **kwargs)
    ntk.activation_checkpointing_enable()
    assert ntk.base_model.model.gradient_checkpointing
    checkpointed = _grads(ntk, batch, **kwargs)
    assert plain.keys() == checkpointed.keys() and len(plain) == (8 if mixed else 4)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_trains():
    model = LLAMA.build()
    batch = LLAMA.inputs(batch=2, length=7, pad=2)
    with torch.no_grad():
        expected = model(**batch).logits
    ntk = get_ntk_model(model, NTKConfig())
    ntk.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ntk(**batch).logits
    torch.testing.assert_close(logits.float(), expected, rtol=0.05, atol=0.05)
    target = torch.randint(0, logits.shape[-1], logits.shape[:-1])
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten()).backward()
    grads = [p.grad for p in ntk.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["sdpa", "eager"])
@pytest.mark.parametrize("feature_map", ["elu", "exp"])
def test_autocast_training_without_a_cache_takes_mixed_qkv(dtype, family, feature_map):
    """Without a cache nothing casts v: under autocast a RoPE model hands the attention q, k in
    float32 and v in the autocast dtype (Trainer with bf16/fp16 does exactly this); the op runs
    them in the autocast dtype, as SDPA would, forward and backward, left-padded."""
    model = LLAMA.build(attn_implementation=family)
    batch = LLAMA.inputs(batch=2, length=7, pad=2, side="left")
    with torch.no_grad():
        expected = model(**batch, use_cache=False).logits
    config = NTKConfig(feature_map=feature_map, r=8 if feature_map == "exp" else None)
    ntk = get_ntk_model(model, config)
    randomize_adapter(ntk, scale=0.1)
    ntk.train()
    with torch.no_grad():
        reference = ntk(**batch, use_cache=False).logits
    with torch.autocast("cpu", dtype=dtype):
        out = ntk(**batch, labels=batch["input_ids"], use_cache=False)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits.float()[valid], reference[valid], rtol=0.05, atol=0.05)
    assert not torch.equal(reference, expected)  # the state is read
    scaler_scale = 1024.0 if dtype == torch.float16 else 1.0  # fp16 trains with loss scaling
    (out.loss * scaler_scale).backward()
    grads = [p.grad for n, p in ntk.named_parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_generation_with_and_without_cache_agree(dtype):
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    randomize_adapter(ntk, scale=0.5)
    batch = LLAMA.inputs(batch=2, length=6, pad=2, side="left")
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        cached = ntk.generate(**batch, **settings)
        uncached = ntk.generate(**batch, use_cache=False, **settings)
    assert cached.shape == (2, 11)
    # bf16/fp16 rounding may flip a near-tie between the two paths; most tokens agree
    assert (cached == uncached).float().mean() >= 0.8


def test_a_bf16_model_runs_with_a_bf16_state():
    ntk = get_ntk_model(LLAMA.build(), NTKConfig()).to(torch.bfloat16)
    randomize_adapter(ntk)
    with torch.no_grad():
        logits = ntk(**LLAMA.inputs()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_torch_compile_matches_eager():
    ntk = get_ntk_model(LLAMA.build(), NTKConfig())
    randomize_adapter(ntk)
    batch = LLAMA.inputs(batch=2, length=7)
    with torch.no_grad():
        expected = ntk(**batch).logits
    compiled = torch.compile(ntk)
    with torch.no_grad():
        got = compiled(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    step = LLAMA.inputs(batch=2, length=1)  # one query: the compiled decoding merge (numba)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**step).logits, ntk(**step).logits, rtol=1e-4, atol=1e-5)
    logits = compiled(**batch).logits
    logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in ntk.parameters() if p.requires_grad)


def _trainer(ntk, spec, output, **overrides):
    settings = dict(
        output_dir=str(output), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
        report_to="none", save_strategy="steps", save_steps=2, use_cpu=True, logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0,
    )
    settings.update(overrides)
    args = transformers.TrainingArguments(**settings)
    data = _dataset(spec)
    return transformers.Trainer(model=ntk, args=args, train_dataset=data, eval_dataset=data)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_trainer_checkpoints_hold_the_adapter_and_resume_exactly(arch, tmp_path):
    """Trainer treats NTKModel as a PEFT-style model: checkpoints and save_model hold the
    adapter's files (no copy of the base model), NTKModel.from_pretrained reads a checkpoint,
    and resume_from_checkpoint continues to the same state as an uninterrupted run."""
    spec = ARCHITECTURES[arch]
    config = NTKConfig(modules_to_save=[spec.head] if spec.head else None)
    whole = get_ntk_model(spec.build(), config)
    _trainer(whole, spec, tmp_path / "whole").train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files
    NTKModel.from_pretrained(spec.build(), checkpoint)

    resumed = get_ntk_model(spec.build(), config)
    _trainer(resumed, spec, tmp_path / "whole").train(resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(whole.adapter_state_dict().items(), resumed.adapter_state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)

    trainer = _trainer(whole, spec, tmp_path / "final")
    trainer.save_model(str(tmp_path / "final-model"))
    saved = {p.name for p in (tmp_path / "final-model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved


def test_trainer_loads_the_best_checkpoint_at_the_end(tmp_path):
    spec = ARCHITECTURES["llama"]
    ntk = get_ntk_model(spec.build(), NTKConfig())
    trainer = _trainer(ntk, spec, tmp_path / "best", eval_strategy="steps", eval_steps=2,
                       load_best_model_at_end=True, metric_for_best_model="loss")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    expected = NTKModel.from_pretrained(spec.build(), best).adapter_state_dict()
    for name, tensor in ntk.adapter_state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)


def test_trainer_with_gradient_checkpointing_trains_the_state(tmp_path):
    spec = ARCHITECTURES["llama"]
    ntk = get_ntk_model(spec.build(), NTKConfig())
    before = {n: p.detach().clone() for n, p in ntk.named_parameters() if ".ntk_z." in n}
    _trainer(ntk, spec, tmp_path / "gc", max_steps=2, save_strategy="no",
             gradient_checkpointing=True).train()
    assert ntk.base_model.model.gradient_checkpointing
    assert all(not torch.equal(p, before[n]) for n, p in ntk.named_parameters() if n in before)
