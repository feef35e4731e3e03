"""Numerical guards (train/guards.py): an injected NaN/inf stops the run with a message naming
the layer (activations), or the parameter (gradients, updates); bf16 autocast training of a
tiny adapter stays finite over 100 steps; `finetune --detect-nonfinite` reports a diverging run
in one line."""

from __future__ import annotations

import pytest
import torch

from ntk_attention import NTKConfig, get_ntk_model
from ntk_attention.train.guards import NonFiniteError, NonFiniteGuard

from support.testing_models import ARCHITECTURES, randomize_adapter

LLAMA = ARCHITECTURES["llama"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    pass


def _ntk(**config):
    model = get_ntk_model(LLAMA.build(), NTKConfig(**config))
    randomize_adapter(model, scale=0.1)
    return model


def _param(model, fragment: str) -> torch.nn.Parameter:
    return next(p for n, p in model.named_parameters() if fragment in n)


def test_a_healthy_model_passes_and_the_hooks_are_removed():
    model = _ntk()
    with NonFiniteGuard(model) as guard:
        model(**LLAMA.inputs(), labels=LLAMA.inputs()["input_ids"]).loss.backward()
        guard.check_gradients(1)
        guard.check_parameters(1)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(("fragment", "value", "layer"), [
    ("layers.1.self_attn.ntk_state.ntk_kappa", float("nan"), "layers.1.self_attn"),
    ("layers.0.self_attn.ntk_state.ntk_z", float("inf"), "layers.0.self_attn"),
    ("embed_tokens.weight", float("nan"), "embed_tokens"),
])
def test_an_injected_non_finite_value_names_the_layer_it_first_appears_in(fragment, value, layer):
    model = _ntk()
    with torch.no_grad():
        _param(model, fragment).view(-1)[:].fill_(value)
    guard = NonFiniteGuard(model)
    guard.step = 7
    with guard, pytest.raises(NonFiniteError) as caught:
        model(**LLAMA.inputs())
    message = str(caught.value)
    assert message.startswith("non-finite activation in layer "), message
    named = message.split("'")[1]
    assert layer in named, message  # the first layer whose output is not finite, not a later one
    assert "at step 7:" in message and "NaN and" in message


def test_non_finite_gradients_and_parameters_are_named():
    model = _ntk()
    kappa = _param(model, "layers.1.self_attn.ntk_state.ntk_kappa")
    model(**LLAMA.inputs(), labels=LLAMA.inputs()["input_ids"]).loss.backward()
    guard = NonFiniteGuard(model)
    kappa.grad[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"gradient of '.*layers.1.self_attn.*ntk_kappa.*' at step 3"):
        guard.check_gradients(3)
    with torch.no_grad():
        kappa[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite parameter '.*ntk_kappa.*' at step 4: 8 NaN and 0 infinite of 16 values"):
        guard.check_parameters(4)


def test_a_disabled_guard_does_nothing():
    model = _ntk()
    with torch.no_grad():
        _param(model, "ntk_kappa").fill_(float("nan"))
    with NonFiniteGuard(model, enabled=False) as guard:
        assert torch.isnan(model(**LLAMA.inputs()).logits).any()
        guard.check_parameters(1)


def test_bf16_autocast_training_stays_finite_for_100_steps():
    torch.manual_seed(0)
    model = _ntk(rank=4, learn_log_scale=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = LLAMA.inputs(batch=4, length=16)
    losses = []
    with NonFiniteGuard(model) as guard:
        for step in range(1, 101):
            guard.step = step
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            guard.check_gradients()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            guard.check_parameters()
            losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])  # it trained


@pytest.mark.usefixtures("minilm_dir")  # bbc-news's model
def test_finetune_detect_nonfinite_stops_a_diverging_run_in_one_line(tmp_path, capsys):
    from ntk_attention.cli import main

    code = main([
        "finetune", "--task", "bbc-news", "--method", "ntk", "--max-train", "8", "--max-eval", "4",
        "--max-length", "16", "--max-steps", "3", "--batch-size", "4", "--lr", "1e30",
        "--warmup-ratio", "0", "--no-progress", "--detect-nonfinite", "--output", str(tmp_path / "run"),
    ])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: non-finite") and "at step" in err, err
