"""tuner.state_access: an adapter's state read and written by field name (z, kappa, the feature
map's virtual tokens ...) without knowing how NTKState stores it, and the kappa parameters that
get the non-negative projection (what data-parallel training projects after its all-reduce)."""

from __future__ import annotations

import pytest
import torch

from ntk_attention import NTKConfig
from ntk_attention.train.distributed import Distributed
from ntk_attention.tuner import (
    NTKState,
    adapter_feature_map,
    get_ntk_model,
    kappa_parameters,
    layer_state,
    read_state,
    write_state,
)
from ntk_attention.tuner.layer import Geometry

from support.testing_models import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("single_thread")

G = Geometry(layer_index=0, q_heads=4, kv_heads=2, head_dim=8, scale=8**-0.5)

# config fields -> the state fields the adapter has, with their shapes (Hkv = 2, D = 8)
CASES = {
    "elu": (dict(), {"z": (2, 8, 8), "kappa": (2, 8)}),
    "elu low rank, log scale": (
        dict(rank=3, learn_log_scale=True),
        {"z_a": (2, 8, 3), "z_b": (2, 3, 8), "kappa": (2, 8), "log_scale": (2,)},
    ),
    "favor": (
        dict(feature_map="favor", r=5),
        {"z": (2, 5, 8), "kappa": (2, 5), "feature_map.projection": (5, 8)},
    ),
    "exp": (
        dict(feature_map="exp", r=5),
        {"z": (2, 5, 8), "kappa": (2, 5), "virtual_keys": (2, 5, 8), "virtual_bias": (2, 5)},
    ),
    "elu+exp": (
        dict(feature_map="elu+exp", r=11),
        {"z": (2, 11, 8), "kappa": (2, 11), "virtual_keys": (2, 3, 8), "virtual_bias": (2, 3)},
    ),
    "exp, exact heads": (
        dict(feature_map="exp", r=5, exact_heads=[(0, 1)], exact_tokens=4),
        {
            "z": (2, 5, 8), "kappa": (2, 5), "virtual_keys": (2, 5, 8), "virtual_bias": (2, 5),
            "exact_keys": (1, 4, 8), "exact_values": (1, 4, 8),
        },
    ),
}


def _state(**config) -> NTKState:
    state = NTKState(G)
    state.add_adapter("a", NTKConfig(**config), torch.device("cpu"))
    return state


@pytest.mark.parametrize("case", CASES)
def test_read_state_names_every_field_with_its_shape(case):
    config, fields = CASES[case]
    state = _state(**config)
    read = read_state(state, "a")
    assert {k: tuple(t.shape) for k, t in read.items()} == fields
    # every stored tensor exactly once (what save_pretrained writes)
    stored = state.adapter_tensors("a")
    assert sorted(t.data_ptr() for t in stored.values()) == sorted(
        t.data_ptr() for t in _live(state).values()
    )
    assert sum(t.numel() for t in read.values()) == sum(t.numel() for t in stored.values())


def _live(state: NTKState) -> dict[str, torch.Tensor]:
    """The stored tensor behind each field, found through what NTKState itself exposes."""
    phi = state.ntk_feature_map["a"]
    out = {k.removeprefix("ntk_"): t for k, t in state.adapter_tensors("a").items()
           if not k.startswith("ntk_feature_map.")}
    virtual = phi.virtual_token_tensors()
    if virtual is not None:
        out["virtual_keys"], out["virtual_bias"] = virtual
    for key, t in phi.state_dict(keep_vars=True).items():
        if virtual is None or not any(t is v for v in virtual):
            out["feature_map." + key] = t
    return out


def test_read_state_returns_copies():
    state = _state(feature_map="exp", r=5)
    before = state.ntk_feature_map["a"].weight.detach().clone()
    read = read_state(state, "a")
    assert torch.equal(read["virtual_keys"], before)
    read["virtual_keys"].add_(1.0)
    read["kappa"].fill_(3.0)
    assert torch.equal(state.ntk_feature_map["a"].weight, before)
    assert (state.ntk_kappa["a"] == 0).all()
    assert not any(t.requires_grad for t in read.values())


@pytest.mark.parametrize("case", CASES)
def test_write_then_read_round_trips_and_reaches_the_op(case):
    config, fields = CASES[case]
    state = _state(**config)
    values = {k: torch.randn(shape, dtype=torch.float64) for k, shape in fields.items()}
    write_state(state, "a", values)
    read = read_state(state, "a")
    for key, value in values.items():
        assert read[key].dtype == torch.float32  # converted to the stored dtype
        assert torch.equal(read[key], value.float()), key
    live = _live(state)
    for key in values:
        assert torch.equal(live[key], values[key].float()), key
    if "virtual_keys" in values:  # the map the op reads has the written virtual tokens
        weight, bias = adapter_feature_map(state, "a").virtual_token_tensors()
        assert torch.equal(weight, values["virtual_keys"].float())
        assert torch.equal(bias, values["virtual_bias"].float())
    op = state.op_state("a")
    assert torch.equal(op.kappa[: G.kv_heads, : values["kappa"].shape[1]].detach(),
                       values["kappa"].float().clamp_min(0))


def test_write_state_takes_keywords_skips_none_and_keeps_the_rest():
    state = _state(feature_map="elu+exp", r=11)
    z_before = read_state(state, "a")["z"]
    keys = torch.randn(2, 3, 8)
    write_state(state, "a", kappa=torch.ones(2, 11), virtual_keys=keys, z=None)
    read = read_state(state, "a")
    assert torch.equal(read["z"], z_before)
    assert torch.equal(read["kappa"], torch.ones(2, 11))
    assert torch.equal(state.ntk_feature_map["a"].exp.weight, keys)  # elu+exp keeps them in .exp


def test_write_state_checks_everything_before_writing():
    state = _state(feature_map="exp", r=5)
    before = read_state(state, "a")
    with pytest.raises(ValueError, match=r"no state field 'ntk_z'.*'kappa'.*'virtual_keys'"):
        write_state(state, "a", {"kappa": torch.ones(2, 5), "ntk_z": torch.ones(2, 5, 8)})
    with pytest.raises(ValueError, match=r"'z' of adapter 'a' is \(2, 5, 8\), got \(2, 4, 8\)"):
        write_state(state, "a", kappa=torch.ones(2, 5), z=torch.ones(2, 4, 8))
    with pytest.raises(ValueError, match="no state field 'z_a'"):  # a dense adapter
        write_state(state, "a", z_a=torch.ones(2, 5, 3))
    after = read_state(state, "a")
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was written
    with pytest.raises(ValueError, match="adapter 'b' does not target this layer"):
        read_state(state, "b")


def _ntk_model(*adapters: str):
    model = ARCHITECTURES["llama"].build()
    ntk = get_ntk_model(model, NTKConfig(feature_map="exp", r=3), adapter_name=adapters[0])
    for name in adapters[1:]:
        ntk.add_adapter(name, NTKConfig(rank=2))
    return ntk


def test_layer_state_and_access_through_the_attention_module():
    ntk = _ntk_model("default")
    attention = [
        m for m in ntk.base_model.modules()
        if not isinstance(m, NTKState) and layer_state(m) is not None
    ]
    assert len(attention) == 2  # the tiny llama's two attention modules carry the states
    assert layer_state(ntk.base_model) is None
    state = layer_state(attention[0])
    assert isinstance(state, NTKState) and layer_state(state) is state
    keys = torch.randn(state.geometry.kv_heads, 3, state.geometry.head_dim)
    write_state(attention[0], "default", virtual_keys=keys)
    assert torch.equal(read_state(attention[0], "default")["virtual_keys"], keys)
    assert adapter_feature_map(attention[0], "default") is state.ntk_feature_map["default"]
    with pytest.raises(ValueError, match="carries no NTK-Attention state"):
        read_state(ntk.base_model, "default")


def test_kappa_parameters_are_every_adapter_s_kappa_through_wrappers():
    ntk = _ntk_model("default", "other")
    by_name = [p for n, p in ntk.named_parameters() if ".ntk_kappa." in n]
    assert len(by_name) == 4  # 2 layers x 2 adapters
    found = kappa_parameters(ntk)
    assert len(found) == 4 and all(any(p is q for q in by_name) for p in found)
    wrapper = torch.nn.ModuleDict({"module": ntk})  # as DistributedDataParallel holds it
    assert all(p is q for p, q in zip(kappa_parameters(wrapper), found, strict=True))
    assert kappa_parameters(ARCHITECTURES["llama"].build()) == []


def test_distributed_backward_projects_exactly_the_kappa_parameters():
    """Deferred, the projection happens after backward (a real run: after DDP's all-reduce);
    here on one process it must give the gradient the immediate projection gives."""

    def grads(distributed: Distributed) -> dict[str, torch.Tensor]:
        ntk = _ntk_model("default")
        ntk.train()
        ids = ARCHITECTURES["llama"].inputs(batch=2, length=6)["input_ids"]
        loss = ntk(input_ids=ids, labels=ids).loss
        distributed.backward(loss, ntk)
        return {n: p.grad.clone() for n, p in ntk.named_parameters() if p.grad is not None}

    one, deferred = grads(Distributed()), grads(Distributed(rank=0, world_size=2))
    assert one.keys() == deferred.keys()
    kappa = [n for n in one if ".ntk_kappa." in n]
    assert kappa
    for name in one:
        assert torch.equal(one[name], deferred[name]), name
    # theta = 0 at init: the projection must have removed every positive gradient
    assert all((one[n] <= 0).all() for n in kappa)
