"""NTKConfig(gated=True): the state reads Z = diag(kappa) U with U stored in ``ntk_z``."""

from __future__ import annotations

import pytest
import torch

from ntk_attention import NTKConfig, NTKModel, get_ntk_model
from ntk_attention.ops.state import deferred_nonnegative_projection

from support.testing_models import ARCHITECTURES, randomize_adapter

ROUNDOFF = dict(rtol=1e-5, atol=2e-6)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: one intra-op thread."""


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_gated_state_starts_as_the_base_model_with_random_values(arch):
    spec = ARCHITECTURES[arch]
    model = spec.build()
    batch = spec.inputs(batch=2, length=7, pad=2)
    with torch.no_grad():
        expected = model(**batch).logits
        ntk = get_ntk_model(model, NTKConfig(gated=True, modules_to_save=[spec.head] if spec.head else None))
        values = [p for n, p in ntk.named_parameters() if ".ntk_z." in n]
        assert values and all(p.abs().sum() > 0 for p in values)  # U is not 0, Z = kappa U is
        got = ntk(**batch).logits
    torch.testing.assert_close(got, expected, **ROUNDOFF)


@pytest.mark.parametrize("rank", [None, 3])
def test_gated_reads_z_as_kappa_times_the_values(rank):
    spec = ARCHITECTURES["llama"]
    batch = spec.inputs(batch=2, length=7)
    gated = get_ntk_model(spec.build(), NTKConfig(gated=True, rank=rank))
    free = get_ntk_model(spec.build(), NTKConfig(rank=rank))
    randomize_adapter(gated, scale=2.0)
    with torch.no_grad():
        free_params = dict(free.named_parameters())
        for name, param in gated.named_parameters():
            if "ntk_" not in name:
                continue
            value = param
            if ".ntk_z." in name or ".ntk_z_a." in name:
                kappa = dict(gated.named_parameters())[name.replace(name.split(".")[-2], "ntk_kappa")]
                value = kappa.clamp_min(0).unsqueeze(-1) * param
            free_params[name].copy_(value)
        torch.testing.assert_close(gated(**batch).logits, free(**batch).logits, **ROUNDOFF)


def test_kappa_trains_from_zero_and_the_values_follow():
    spec = ARCHITECTURES["llama"]
    ntk = get_ntk_model(spec.build(), NTKConfig(gated=True))
    ntk.train()
    batch = spec.inputs(batch=2, length=7)
    with deferred_nonnegative_projection():
        ntk(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in ntk.named_parameters() if p.requires_grad}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".ntk_kappa." in n)
    # dZ/dU = kappa = 0: the values wait for a mass
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".ntk_z." in n)
    with torch.no_grad():
        for name, param in ntk.named_parameters():
            if ".ntk_kappa." in name:
                param.fill_(0.5)
    ntk.zero_grad()
    ntk(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad.abs().sum() > 0 for n, p in ntk.named_parameters() if ".ntk_z." in n)


def test_gated_survives_save_and_load(tmp_path):
    spec = ARCHITECTURES["llama"]
    ntk = get_ntk_model(spec.build(), NTKConfig(gated=True))
    randomize_adapter(ntk)
    ntk.save_pretrained(tmp_path)
    loaded = NTKModel.from_pretrained(spec.build(), tmp_path)
    assert loaded.peft_config["default"].gated is True
    batch = spec.inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ntk(**batch).logits)


def test_gated_must_be_a_bool():
    with pytest.raises(ValueError, match="gated must be a bool"):
        NTKConfig(gated="yes")
