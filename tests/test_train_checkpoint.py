"""Training checkpoints (train/checkpoint.py): a round trip restores parameters, optimizer,
scheduler and RNGs exactly; every damaged or foreign checkpoint fails with a CheckpointError
that names the file and the problem, never a silent wrong load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ntk_attention import NTKConfig, get_ntk_model
from ntk_attention.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

from support.testing_models import ARCHITECTURES, randomize_adapter

LLAMA = ARCHITECTURES["llama"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    pass


def _setup(config: NTKConfig | None = None, architecture_config: dict | None = None):
    if architecture_config is None:
        base = LLAMA.build()
    else:
        import transformers

        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**architecture_config))
    model = get_ntk_model(base, config or NTKConfig(rank=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler):
    model(**LLAMA.inputs(), labels=LLAMA.inputs()["input_ids"]).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


@pytest.fixture
def saved(tmp_path):
    model, optimizer, scheduler = _setup()
    randomize_adapter(model, scale=0.1)
    _train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"epoch": 0, "batch_in_epoch": 1})
    return path, model, optimizer


def test_round_trip_restores_parameters_optimizer_scheduler_and_rng(saved):
    path, model, optimizer = saved
    expected_rng = torch.get_rng_state()
    torch.rand(5)
    fresh, fresh_optimizer, fresh_scheduler = _setup()
    state = load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (1, 0, 1)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert fresh_scheduler.last_epoch == 1
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert latest_checkpoint(path.parent) == path


def _load(path, **setup):
    model, optimizer, scheduler = _setup(**setup)
    return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)


@pytest.mark.parametrize("name", ["model", "optimizer", "rng"])
@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_torn_or_corrupted_tensor_files_fail_naming_the_file(saved, name, damage):
    path, _, _ = saved
    file = path / f"{name}.safetensors"
    data = file.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage_header": b"\xff" * 8 + data[8:],
               "empty": b""}[damage]
    file.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=f"{name}.safetensors cannot be read"):
        _load(path)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_missing_tensor_files_fail(saved, name):
    path, _, _ = saved
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        _load(path)


@pytest.mark.parametrize("content", [None, "{torn", '{"format": 99}'])
def test_missing_torn_or_foreign_trainer_state_fails(saved, content):
    path, _, _ = saved
    state = path / "trainer_state.json"
    if content is None:
        state.unlink()
    else:
        state.write_text(content)
    match = "checkpoint format 99" if content and "99" in content else "trainer_state.json cannot be read"
    with pytest.raises(CheckpointError, match=match):
        _load(path)


def test_a_checkpoint_of_another_rank_fails_naming_the_parameter(saved):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match=r"ntk_z_[ab].default has shape \(2, 8, 4\), the model's is"):
        _load(path, config=NTKConfig(rank=2))


def test_a_checkpoint_of_another_layer_count_fails(saved):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match=r"does not match the model's trainable parameters "
                       r"\(missing e.g. \['.*layers.2"):
        _load(path, architecture_config=dict(LLAMA.config, num_hidden_layers=3))


def test_an_optimizer_state_of_another_shape_fails(saved):
    path, _, _ = saved
    tensors = load_file(path / "optimizer.safetensors")
    key = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[key] = torch.zeros(3)
    save_file(tensors, path / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=rf"optimizer.safetensors: {key} has shape \(3,\)"):
        _load(path)


def test_non_finite_parameters_fail(saved):
    path, _, _ = saved
    tensors = load_file(path / "model.safetensors")
    name = next(iter(tensors))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{name} holds NaN or infinite values"):
        _load(path)


@pytest.mark.parametrize(("pointer", "message"), [
    ("{torn", "not a valid checkpoint pointer"),
    ('{"latest": "step-00000099"}', "names 'step-00000099', which does not exist"),
])
def test_a_bad_latest_pointer_fails(saved, pointer, message):
    path, _, _ = saved
    (path.parent / "latest.json").write_text(pointer)
    with pytest.raises(CheckpointError, match=message):
        latest_checkpoint(path.parent)


def test_leftover_temporary_directories_are_ignored(saved):
    path, _, _ = saved
    torn = path.parent / ".step-00000002.tmp-abc"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"torn")
    assert latest_checkpoint(path.parent) == path
    assert latest_checkpoint(path.parent / "nowhere") is None
