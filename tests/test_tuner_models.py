"""The adapter's contract, checked on every tiny architecture in
``support.testing_models.ARCHITECTURES`` (a new architecture is one line there).

Tolerances: a state at zero changes the real tokens' kernel (the fused path runs SDPA on
augmented inputs), so "equals the base model" is float32 round-off, checked at 2e-6 absolute on
O(1) logits; paths that run the base kernel untouched (disable_adapter, base rows) are checked
bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from ntk_attention import NTKConfig, NTKModel, get_ntk_model
from ntk_attention.ops.state import deferred_nonnegative_projection

from support.testing_models import ARCHITECTURES, randomize_adapter

ARCHS = list(ARCHITECTURES)
TEXT = [name for name, arch in ARCHITECTURES.items() if arch.kind != "vision"]
DECODERS = [name for name, arch in ARCHITECTURES.items() if arch.kind == "decoder"]
ROUNDOFF = dict(rtol=1e-5, atol=2e-6)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: one intra-op thread is fastest and steady on a shared 2-core machine."""


def _output(model, batch, **kwargs) -> torch.Tensor:
    out = model(**batch, **kwargs)
    return out.logits


def _hidden(model, batch, **kwargs) -> torch.Tensor:
    return model(**batch, output_hidden_states=True, **kwargs).hidden_states[-1]


def _adapted(name: str, seed: int = 0, **config) -> tuple[NTKModel, dict]:
    arch = ARCHITECTURES[name]
    if arch.head is not None:
        config.setdefault("modules_to_save", [arch.head])
    model = get_ntk_model(arch.build(), NTKConfig(**config))
    return model, arch.inputs(batch=2, length=7, seed=seed)


@pytest.mark.parametrize("family", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_init_equals_base(arch, family):
    spec = ARCHITECTURES[arch]
    model = spec.build(attn_implementation=family)
    batch = spec.inputs(batch=2, length=7)
    with torch.no_grad():
        expected = _output(model, batch)
        ntk = get_ntk_model(model, NTKConfig())
        assert model.config._attn_implementation == f"ntk_{family}"
        got = _output(ntk, batch)
    torch.testing.assert_close(got, expected, **ROUNDOFF)


@pytest.mark.parametrize("arch", ARCHS)
def test_first_step_gradients_reach_z_and_kappa(arch):
    ntk, batch = _adapted(arch)
    ntk.train()
    # Unprojected, so that the check does not depend on the sign the random data gives kappa's
    # gradient (the projection keeps only the part that raises kappa at theta = 0; at Z = 0
    # the state only shrinks outputs, so on random targets that part can be empty).
    with deferred_nonnegative_projection():
        logits = _output(ntk, batch)
        target = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(1))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss.backward()
    grads = {name: p.grad for name, p in ntk.named_parameters() if p.requires_grad}
    z = [g for n, g in grads.items() if ".ntk_z." in n]
    kappa = [g for n, g in grads.items() if ".ntk_kappa." in n]
    assert len(z) == len(kappa) == 2
    assert all(g is not None and g.abs().sum() > 0 for g in z)
    # kappa = max(theta, 0) at theta = 0 gets a gradient (abs() would give exactly 0 here).
    assert all(g is not None and g.abs().sum() > 0 for g in kappa)
    base = [p for n, p in ntk.named_parameters() if "ntk_" not in n and "modules_to_save" not in n]
    assert all(p.grad is None and not p.requires_grad for p in base)


@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_step_changes_only_the_adapter(arch):
    ntk, batch = _adapted(arch)
    before = {n: p.detach().clone() for n, p in ntk.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in ntk.parameters() if p.requires_grad], lr=1e-2)
    ntk.train()
    for _ in range(2):
        optimizer.zero_grad()
        _output(ntk, batch).pow(2).mean().backward()
        optimizer.step()
    changed = {n for n, p in ntk.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in ntk.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(".ntk_" in n or ".modules_to_save." in n for n in trainable)
    assert any(".ntk_z." in n for n in changed)
    if ARCHITECTURES[arch].head:
        assert any(".modules_to_save." in n for n in changed)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_gives_identical_outputs(arch, tmp_path):
    ntk, batch = _adapted(arch)
    randomize_adapter(ntk)
    if ARCHITECTURES[arch].head:  # a trained head too
        with torch.no_grad():
            for name, p in ntk.named_parameters():
                if ".modules_to_save." in name:
                    p.add_(0.1)
    with torch.no_grad():
        expected = _output(ntk, batch)
    ntk.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]
    fresh = ARCHITECTURES[arch].build()
    loaded = NTKModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        got = _output(loaded, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", TEXT)
def test_padded_batch_equals_each_row_alone(arch):
    spec = ARCHITECTURES[arch]
    ntk, _ = _adapted(arch)
    randomize_adapter(ntk, scale=0.5)
    pad = 3
    batch = spec.inputs(batch=2, length=8, pad=pad, side="right")
    with torch.no_grad():
        together = _hidden(ntk, batch)
        for row in range(2):
            valid = int(batch["attention_mask"][row].sum())
            alone = {k: v[row : row + 1, :valid] for k, v in batch.items()}
            torch.testing.assert_close(together[row : row + 1, :valid], _hidden(ntk, alone), **ROUNDOFF)
    assert together.shape[1] == 8 and int(batch["attention_mask"][1].sum()) == 8 - pad


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_is_the_base_model_bit_for_bit(arch):
    spec = ARCHITECTURES[arch]
    model = spec.build()
    batch = spec.inputs(batch=2, length=7, pad=2 if spec.kind != "vision" else 0)
    with torch.no_grad():
        expected = _output(model, batch)
    ntk = get_ntk_model(model, NTKConfig(modules_to_save=[spec.head] if spec.head else None))
    randomize_adapter(ntk)
    with torch.no_grad():
        with ntk.disable_adapter():
            disabled = _output(ntk, batch)
        adapted = _output(ntk, batch)
    assert torch.equal(disabled, expected)
    assert not torch.allclose(adapted, expected, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_mixing_equals_separate_runs(arch):
    spec = ARCHITECTURES[arch]
    ntk, _ = _adapted(arch)
    ntk.add_adapter("other", NTKConfig(modules_to_save=[spec.head] if spec.head else None, seed=3))
    randomize_adapter(ntk, "default", seed=1)
    randomize_adapter(ntk, "other", seed=2)
    if spec.head:
        with torch.no_grad():
            for name, p in ntk.named_parameters():
                if ".modules_to_save.other." in name:
                    p.mul_(-1.0)
    batch = spec.inputs(batch=3, length=7)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = _output(ntk, batch, adapter_names=names)
        separate = []
        for row, name in enumerate(names):
            single = {k: v[row : row + 1] for k, v in batch.items()}
            if name == "__base__":
                with ntk.disable_adapter():
                    separate.append(_output(ntk, single))
            else:
                ntk.set_adapter(name)
                separate.append(_output(ntk, single))
    torch.testing.assert_close(mixed, torch.cat(separate), **ROUNDOFF)
    assert not torch.allclose(separate[0], separate[2], atol=1e-4)


def _greedy_recompute(model, input_ids, steps, **kwargs) -> torch.Tensor:
    ids = input_ids
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("arch", DECODERS)
def test_cached_generation_equals_recompute(arch):
    ntk, batch = _adapted(arch)
    randomize_adapter(ntk, scale=2.0)
    ids = batch["input_ids"]
    with torch.no_grad():
        cached = ntk.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, min_new_tokens=8)
        expected = _greedy_recompute(ntk, ids, 8)
        adapted = ntk(input_ids=cached).logits
        with ntk.disable_adapter():
            base = ntk(input_ids=cached).logits
    assert torch.equal(cached, expected)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the state matters


@pytest.mark.parametrize("arch", DECODERS)
def test_mixed_generation_equals_separate_generation(arch):
    ntk, _ = _adapted(arch)
    ntk.add_adapter("other", NTKConfig(position_offset=5))
    randomize_adapter(ntk, "default", seed=1, scale=2.0)
    randomize_adapter(ntk, "other", seed=2, scale=2.0)
    ids = ARCHITECTURES[arch].inputs(batch=3, length=6)["input_ids"]
    names = ["other", "default", "__base__"]
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        mixed = ntk.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **settings)
        for row, name in enumerate(names):
            single = ids[row : row + 1]
            if name == "__base__":
                with ntk.disable_adapter():
                    alone = ntk.generate(input_ids=single, attention_mask=torch.ones_like(single), **settings)
            else:
                ntk.set_adapter(name)
                alone = ntk.generate(input_ids=single, attention_mask=torch.ones_like(single), **settings)
            assert torch.equal(mixed[row : row + 1], alone), (row, name)


def _default_position_ids(model, batch) -> torch.Tensor:
    """The position ids the base model computes for ``batch``, as seen by its position module."""
    from ntk_attention.tuner.discovery import find_position_modules

    seen = []
    _, module, kind = find_position_modules(model)[0]

    def record(mod, args, kwargs):
        seen.append(kwargs["position_ids"] if "position_ids" in kwargs else args[1 if kind == "rotary" else 0])

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", TEXT)
def test_position_offset_shifts_positions(arch):
    spec = ARCHITECTURES[arch]
    offset = 11
    model = spec.build()
    batch = spec.inputs(batch=2, length=7)
    shifted = (_default_position_ids(model, batch) + offset).expand(2, -1)
    with torch.no_grad():
        expected = _output(model, batch, position_ids=shifted)
        unshifted = _output(model, batch)
    ntk = get_ntk_model(model, NTKConfig(position_offset=offset))
    with torch.no_grad():
        got = _output(ntk, batch)
        mixed = _output(ntk, batch, adapter_names=["default", "__base__"])
    torch.testing.assert_close(got, expected, **ROUNDOFF)
    torch.testing.assert_close(mixed[:1], expected[:1], **ROUNDOFF)
    torch.testing.assert_close(mixed[1:], unshifted[1:], **ROUNDOFF)
    if spec.kind == "decoder":  # absolute positions (GPT-2) or rotary: the logits change
        assert arch != "gpt2" or not torch.allclose(got, unshifted, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_unload_returns_the_base_model_as_it_was(arch):
    spec = ARCHITECTURES[arch]
    model = spec.build()
    next(model.parameters()).requires_grad_(False)  # a flag unload must keep
    modules = [(n, type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    implementation = model.config._attn_implementation
    config = NTKConfig(
        modules_to_save=[spec.head] if spec.head else None,
        position_offset=3 if spec.has_positions else 0,
    )
    ntk = get_ntk_model(model, config)
    ntk.add_adapter("second", NTKConfig(rank=2, feature_map="favor", r=16))
    randomize_adapter(ntk)
    base = ntk.unload()
    assert base is model
    assert [(n, type(m)) for n, m in base.named_modules()] == modules
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in base.modules()) == hooks
    assert base.config._attn_implementation == implementation
    with pytest.raises(RuntimeError, match="unloaded"):
        ntk(**spec.inputs())


def test_generate_reads_the_state_once_and_sees_later_changes():
    """Within generate() each layer builds its state and [Z | kappa] once (the decode cache);
    afterwards the cache is gone, so a parameter change between two calls is seen."""
    ntk, batch = _adapted("llama")
    randomize_adapter(ntk, scale=2.0)
    ids = batch["input_ids"]
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                    do_sample=False)
    states = list(ntk._states())
    built = []
    original = type(states[0])._read_state

    def counting(self, name):
        built.append(name)
        return original(self, name)

    type(states[0])._read_state = counting
    try:
        with torch.no_grad():
            first = ntk.generate(input_ids=ids, **settings)
    finally:
        type(states[0])._read_state = original
    assert len(built) == len(states)  # once per layer, not per token
    assert all(state.decode_cache is None for state in states)
    with torch.no_grad():
        for state in states:
            state.ntk_z["default"].mul_(-3.0)
        second = ntk.generate(input_ids=ids, **settings)
        expected = _greedy_recompute(ntk, ids, 6)
    assert torch.equal(second, expected)
    assert not torch.equal(first, second)
