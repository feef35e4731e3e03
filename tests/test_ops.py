"""Tests of ``ntk_attention.ops.ntk_attention``: the fused path and its naive twin against the
float64 reference in ``support.testing`` (outputs and every gradient), the special cases
of the spec (plain attention at z = 0, decoding, fully masked rows, low precision with huge
logits, GQA, low-rank and per-row states), the kappa parameterisation, the fused path's memory
shape, and every bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ntk_attention.ops import (
    get_feature_map,
    nonnegative,
    ntk_attention,
    ntk_attention_fused,
    ntk_attention_lse,
    ntk_attention_naive,
)

from support.testing import (
    assert_close,
    assert_low_precision_close,
    reference_ntk_attention,
)

# Tiny tensors: one thread is faster and immune to a busy neighbour (see conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")

PATHS = {"lse": ntk_attention_lse, "fused": ntk_attention_fused, "naive": ntk_attention_naive}


def close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, msg: str = "", floor: float = 0.0
) -> None:
    """Relative tolerance ``tol`` element-wise, with an absolute floor of ``tol`` times the
    largest |expected| (so near-zero entries of an O(1) tensor are judged on its scale), and
    at least ``floor``."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, rtol=tol, atol=max(tol * scale, floor), msg=msg)


@dataclasses.dataclass(frozen=True)
class Case:
    """Shapes and options of one ntk_attention call."""

    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 5
    k_len: int = 5
    head_dim: int = 8
    value_dim: int | None = None
    feature_map: str = "elu"
    r: int | None = None  # favor only; elu and taylor fix r
    rank: int | None = None  # low-rank z = z_a z_b
    per_row: bool = False  # state [B, Hkv, ...]
    is_causal: bool = False
    mask: str | None = None  # "bool", "float", "bool_empty_row", "float_empty_row"
    state_log_scale: float | None = None
    scale: float | None = None

    @property
    def feature_dim(self) -> int:
        d = self.head_dim
        return {"elu": d, "taylor": 1 + d + d * d}.get(self.feature_map, self.r or 16)


def make_inputs(case: Case, dtype: torch.dtype = torch.float32) -> dict:
    """Random q, k, v, a state with kappa > 0 (so every path is smooth for gradcheck), and the
    mask of ``case``. Taylor features can be negative, so its state is a real prefix's."""
    b, hq, hkv, lq, lk, d = (
        case.batch, case.q_heads, case.kv_heads, case.q_len, case.k_len, case.head_dim
    )
    dv = case.value_dim or d
    r = case.feature_dim
    lead = (b, hkv) if case.per_row else (hkv,)
    q = torch.randn(b, hq, lq, d, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, dv, dtype=torch.float64)
    if case.feature_map == "elu":
        kappa = torch.rand(*lead, r, dtype=torch.float64) + 0.1
        z = 0.5 * torch.randn(*lead, r, dv, dtype=torch.float64)
    else:
        phi = get_feature_map(case.feature_map, d, r=r, scale=case.scale)
        prefix_k = torch.randn(*lead, 6, d, dtype=torch.float64)
        features = phi(prefix_k).double()  # [.., 6, r]
        kappa = features.sum(-2)
        z = features.transpose(-1, -2) @ torch.randn(*lead, 6, dv, dtype=torch.float64)
    if case.rank is not None:
        z = (
            torch.randn(*lead, r, case.rank, dtype=torch.float64) / math.sqrt(r),
            torch.randn(*lead, case.rank, dv, dtype=torch.float64),
        )

    attn_mask = None
    if case.mask is not None:
        keep = torch.ones(b, 1, lq, lk, dtype=torch.bool)
        keep[-1, ..., lk - 2 :] = False  # padding: the last batch row has 2 keys fewer
        if case.mask.endswith("empty_row"):
            keep[0, :, 1, :] = False  # query 1 of batch 0 sees no key at all
        if case.mask.startswith("bool"):
            attn_mask = keep
        else:  # additive: a finite bias (ALiBi-like) plus -inf for hidden keys
            bias = -0.3 * torch.arange(lk, dtype=torch.float64).flip(0).expand(b, hq, lq, lk)
            attn_mask = bias.masked_fill(~keep, float("-inf")).to(dtype)

    cast = lambda t: t.to(dtype)
    return {
        "q": cast(q),
        "k": cast(k),
        "v": cast(v),
        "z": tuple(map(cast, z)) if isinstance(z, tuple) else cast(z),
        "kappa": cast(kappa),
        "attn_mask": attn_mask,
        "is_causal": case.is_causal,
        "scale": case.scale,
        "state_log_scale": (
            None if case.state_log_scale is None
            else torch.full((hkv,), case.state_log_scale, dtype=dtype)
        ),
        "feature_map": (
            case.feature_map if case.feature_map != "favor"
            else get_feature_map("favor", d, r=r, scale=case.scale)
        ),
    }


def differentiable(inputs: dict) -> list[torch.Tensor]:
    """Turn on requires_grad for q, k, v, z (or z_a, z_b) and kappa; return them in order."""
    leaves = [inputs["q"], inputs["k"], inputs["v"]]
    leaves += list(inputs["z"]) if isinstance(inputs["z"], tuple) else [inputs["z"]]
    leaves.append(inputs["kappa"])
    for t in leaves:
        t.requires_grad_(True)
    return leaves


def call(fn, inputs: dict, **overrides) -> torch.Tensor:
    kwargs = {**inputs, **overrides}
    return fn(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), kwargs.pop("z"),
              kwargs.pop("kappa"), **kwargs)


def as_float64(inputs: dict) -> dict:
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().double()
        elif isinstance(value, tuple):
            value = tuple(t.detach().double() for t in value)
        out[name] = value
    return out


CASES = {
    "mha_bidirectional": Case(q_heads=2, kv_heads=2),
    "gqa_causal": Case(q_len=6, k_len=6, is_causal=True),
    "gqa_causal_chunk_lq<lk": Case(q_len=3, k_len=7, is_causal=True),
    "causal_lq>lk_state_only_rows": Case(q_len=7, k_len=4, is_causal=True),
    "bidirectional_lq!=lk": Case(q_len=3, k_len=9),
    "bool_padding": Case(mask="bool"),
    "float_bias_padding": Case(mask="float"),
    "causal_and_bool_padding": Case(mask="bool", is_causal=True),
    "bool_fully_masked_row": Case(mask="bool_empty_row"),
    "float_fully_masked_row": Case(mask="float_empty_row", is_causal=True),
    "favor": Case(feature_map="favor", r=32, is_causal=True),
    "taylor": Case(feature_map="taylor", head_dim=4, q_len=4, k_len=4),
    "low_rank": Case(rank=3, is_causal=True),
    "per_row_state": Case(per_row=True, mask="bool"),
    "per_row_low_rank": Case(per_row=True, rank=2),
    "state_log_scale": Case(state_log_scale=3.0, is_causal=True),
    "state_log_scale_huge_favor": Case(feature_map="favor", r=16, state_log_scale=200.0),
    "explicit_scale": Case(scale=0.3, mask="float"),
    "value_dim!=head_dim": Case(value_dim=6, is_causal=True),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", CASES)
def test_matches_float64_reference_forward_and_gradients(path, name):
    inputs = make_inputs(CASES[name])
    leaves = differentiable(inputs)
    out = call(PATHS[path], inputs)

    ref_inputs = as_float64(inputs)
    ref_leaves = differentiable(ref_inputs)
    expected = call(reference_ntk_attention, ref_inputs)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    close(out, expected, 2e-5, f"{path} {name} output")

    weight = torch.randn_like(expected)
    (out * weight.float()).sum().backward()
    (expected * weight).sum().backward()
    names = ["q", "k", "v"] + (["z_a", "z_b"] if len(leaves) == 6 else ["z"]) + ["kappa"]
    for leaf_name, leaf, ref_leaf in zip(names, leaves, ref_leaves, strict=True):
        # A gradient the state drowns out (|grad| < 1e-12, e.g. d/dk under state_log_scale = 200)
        # underflows in float32: judge it on an absolute floor.
        close(leaf.grad, ref_leaf.grad, 1e-4, f"{path} {name} d/d{leaf_name}", floor=1e-12)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.q_heads != c.kv_heads])
def test_lse_path_without_kernel_gqa_folds_or_repeats(name, monkeypatch):
    """The lse path on a torch whose kernel does not group GQA heads itself: query heads folded
    into the query length, or keys and values repeated (autograd sums their gradients)."""
    from ntk_attention.ops import lse as lse_module

    monkeypatch.setattr(lse_module, "_KERNEL_GROUPS_HEADS", False)
    test_matches_float64_reference_forward_and_gradients("lse", name)


GRADCHECK_CASES = {
    "gqa_causal_bool_padding": Case(batch=2, q_heads=2, kv_heads=1, q_len=3, k_len=4,
                                    head_dim=4, is_causal=True, mask="bool"),
    "per_row_low_rank_float_mask": Case(batch=2, q_heads=2, kv_heads=2, q_len=3, k_len=3,
                                        head_dim=4, per_row=True, rank=2, mask="float"),
    "causal_lq>lk": Case(batch=1, q_heads=2, kv_heads=1, q_len=4, k_len=2, head_dim=4,
                         is_causal=True),
    "favor_log_scale": Case(batch=1, q_heads=2, kv_heads=1, q_len=3, k_len=3, head_dim=4,
                            feature_map="favor", r=6, state_log_scale=1.5),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck_float64(path, name):
    inputs = make_inputs(GRADCHECK_CASES[name], torch.float64)
    leaves = differentiable(inputs)
    rest = {key: value for key, value in inputs.items()
            if key not in ("q", "k", "v", "z", "kappa")}
    low_rank = isinstance(inputs["z"], tuple)

    def fn(q, k, v, *state):
        z = (state[0], state[1]) if low_rank else state[0]
        return PATHS[path](q, k, v, z, state[-1], **rest)

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "mask, is_causal, q_heads",
    [(None, False, 2), (None, True, 2), ("bool", False, 2), ("float", True, 2),
     (None, True, 6)],
)
def test_zero_state_is_plain_sdpa(path, mask, is_causal, q_heads):
    case = Case(q_heads=q_heads, kv_heads=2, q_len=7, k_len=7, mask=mask, is_causal=is_causal)
    inputs = make_inputs(case)
    inputs["z"] = torch.zeros_like(inputs["z"])
    inputs["kappa"] = torch.zeros_like(inputs["kappa"])
    out = call(PATHS[path], inputs)
    expected = F.scaled_dot_product_attention(
        inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["attn_mask"],
        is_causal=is_causal, enable_gqa=q_heads != 2,
    )
    close(out, expected, 1e-5, f"{path} vs SDPA")


@pytest.mark.parametrize("path", PATHS)
def test_zero_state_is_plain_sdpa_when_every_logit_is_very_negative(path):
    """All logits of each row about -40: softmax is shift invariant, so SDPA is unaffected;
    a zero state must not claim any of the attention mass."""
    k = torch.randn(1, 1, 6, 16, dtype=torch.float64)
    direction = k.mean(2, keepdim=True)
    k = 0.1 * k + direction
    q = -100 * direction.expand(1, 1, 4, 16) + 0.1 * torch.randn(1, 1, 4, 16)
    v = torch.randn(1, 1, 6, 16, dtype=torch.float64)
    logits = (q @ k.transpose(-1, -2)) / 4
    assert logits.max() < -30
    z, kappa = torch.zeros(1, 16, 16, dtype=torch.float64), torch.zeros(1, 16, dtype=torch.float64)
    out = PATHS[path](q, k, v, z, kappa, feature_map="elu")
    close(out, F.scaled_dot_product_attention(q, k, v), 1e-10, f"{path} vs SDPA")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("decode_len", [1, 3])
def test_decoding_rows_equal_the_last_rows_of_the_full_causal_call(path, decode_len):
    inputs = make_inputs(Case(q_len=9, k_len=9, is_causal=True))
    full = call(PATHS[path], inputs)
    step = call(PATHS[path], inputs, q=inputs["q"][:, :, -decode_len:])
    close(step, full[:, :, -decode_len:], 1e-6, f"{path} decoding")


def elu_state_only(q: torch.Tensor, z: torch.Tensor, kappa: torch.Tensor, groups: int):
    """phi(q)^T Z / phi(q)^T kappa for the paper's map, written out in float64."""
    features = F.elu(q.double() / q.shape[-1] ** 0.25) + 1  # [B, Hq, Lq, D]
    z_h = z.double().repeat_interleave(groups, 0)  # [Hq, r, D]
    kappa_h = kappa.double().repeat_interleave(groups, 0)  # [Hq, r]
    return (features @ z_h) / (features @ kappa_h.unsqueeze(-1))


def masked_row_inputs(mask_kind: str) -> tuple[dict, int]:
    """Inputs whose first rows see no key (bool mask, -inf float mask, or causal Lq > Lk),
    and the number of such rows."""
    case = Case(q_len=6, k_len=3 if mask_kind == "causal_lq>lk" else 6)
    inputs = make_inputs(case)
    hidden = torch.zeros(case.batch, 1, case.q_len, case.k_len, dtype=torch.bool)
    hidden[:, :, :2] = True  # queries 0 and 1 see no key
    if mask_kind == "bool":
        inputs["attn_mask"] = ~hidden
    elif mask_kind == "float":
        inputs["attn_mask"] = torch.zeros(hidden.shape).masked_fill(hidden, float("-inf"))
    else:
        inputs["is_causal"] = True  # Lq = 6, Lk = 3: queries 0-2 see no key
    return inputs, 3 if mask_kind == "causal_lq>lk" else 2


MASK_KINDS = ["bool", "float", "causal_lq>lk"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_fully_masked_rows_return_the_state_term(path, mask_kind):
    inputs, empty_rows = masked_row_inputs(mask_kind)
    leaves = differentiable(inputs)
    out = call(PATHS[path], inputs)
    expected = elu_state_only(inputs["q"], inputs["z"], inputs["kappa"], groups=2)
    close(out[:, :, :empty_rows], expected[:, :, :empty_rows], 1e-5, f"{path} state-only rows")
    out.sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_fully_masked_rows_without_state_mass_are_zero_and_never_nan(path, mask_kind):
    """kappa = 0 (the adapter's initial state) with Z != 0: a row that sees no key (a padded
    query) is exactly 0, and every gradient is finite."""
    inputs, empty_rows = masked_row_inputs(mask_kind)
    inputs["kappa"] = torch.zeros_like(inputs["kappa"])
    leaves = differentiable(inputs)
    out = call(PATHS[path], inputs)
    assert torch.isfinite(out).all()
    assert (out[:, :, :empty_rows] == 0).all()
    out.sum().backward()
    for name, leaf in zip(("q", "k", "v", "z", "kappa"), leaves, strict=True):
        assert torch.isfinite(leaf.grad).all(), f"{path}: non-finite d/d{name}"


def huge_logit_inputs(dtype: torch.dtype, is_causal: bool) -> dict:
    """q, k scaled so that max |s q.k| = 1e4, with query 0's logits all below -500 (there
    the state's term dominates the row)."""
    inputs = make_inputs(Case(batch=1, q_heads=4, kv_heads=2, q_len=8, k_len=8, head_dim=16,
                              is_causal=is_causal), torch.float64)
    q, k = inputs["q"], inputs["k"]
    common = F.normalize(torch.randn(16, dtype=torch.float64), dim=0)
    k = k + 4 * common  # every key shares a direction ...
    q[:, :, 0] = -4 * common  # ... that query 0 points away from
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4
    assert (logits[:, :, 0].amax(-1) < -0.05 * logits.abs().max()).all()
    grow = math.sqrt(1e4 / float(logits.abs().max()))
    inputs["q"], inputs["k"] = q * grow, k * grow
    return {key: (value.to(dtype) if isinstance(value, torch.Tensor) else value)
            for key, value in inputs.items()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("logits", ["normal", "huge"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
def test_low_precision_is_as_accurate_as_plain_low_precision_attention(
    path, dtype, logits, is_causal
):
    if logits == "huge":
        inputs = huge_logit_inputs(dtype, is_causal)
    else:
        inputs = make_inputs(Case(q_len=16, k_len=16, head_dim=16, is_causal=is_causal), dtype)
    out = call(PATHS[path], inputs)
    assert out.dtype == dtype
    reference = call(reference_ntk_attention, inputs)
    baseline = call(reference_ntk_attention, inputs, dtype=dtype)
    assert_low_precision_close(out, baseline, reference, msg=f"{path} {dtype} {logits}")

    leaves = differentiable(inputs)
    call(PATHS[path], inputs).float().square().sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all(), f"{path} {dtype}: non-finite gradient"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_state_with_zero_kappa(path, dtype):
    """kappa = 0 with Z != 0 (an adapter one step after its zero init, before kappa moves):
    out = (E + phi^T Z) / S must hold in low precision too, and Z must get its gradient."""
    inputs = make_inputs(Case(q_len=16, k_len=16, head_dim=16, is_causal=True), dtype)
    inputs["kappa"] = torch.zeros_like(inputs["kappa"])
    inputs["z"].requires_grad_(True)
    out = call(PATHS[path], inputs)
    reference = call(reference_ntk_attention, inputs)
    baseline = call(reference_ntk_attention, inputs, dtype=dtype)
    assert_low_precision_close(out, baseline, reference, msg=f"{path} {dtype} kappa = 0")
    out.float().sum().backward()
    assert inputs["z"].grad.abs().max() > 0, "Z gets no gradient at kappa = 0"


@pytest.mark.parametrize("path", PATHS)
def test_low_rank_state_equals_its_dense_product(path):
    inputs = make_inputs(Case(rank=3, is_causal=True))
    z_a, z_b = inputs["z"]
    close(call(PATHS[path], inputs), call(PATHS[path], inputs, z=z_a @ z_b), 1e-6, path)


@pytest.mark.parametrize("path", PATHS)
def test_per_row_state_equals_separate_calls(path):
    inputs = make_inputs(Case(batch=3, per_row=True, is_causal=True))
    out = call(PATHS[path], inputs)
    for row in range(3):
        single = call(
            PATHS[path], inputs, q=inputs["q"][row : row + 1], k=inputs["k"][row : row + 1],
            v=inputs["v"][row : row + 1], z=inputs["z"][row], kappa=inputs["kappa"][row],
        )
        close(out[row : row + 1], single, 1e-6, f"{path} row {row}")


@pytest.mark.parametrize("path", PATHS)
def test_gqa_equals_repeated_kv_heads_and_states(path):
    """Query head h uses KV head h // G: repeating K, V and the state G times is the same."""
    inputs = make_inputs(Case(q_heads=6, kv_heads=2, mask="bool", is_causal=True))
    repeated = {name: inputs[name].repeat_interleave(3, dim) for name, dim in
                (("k", 1), ("v", 1), ("z", 0), ("kappa", 0))}
    close(call(PATHS[path], inputs), call(PATHS[path], inputs, **repeated), 1e-6, path)


@pytest.mark.parametrize("path", PATHS)
def test_state_log_scale_multiplies_the_state(path):
    inputs = make_inputs(Case(is_causal=True))
    log_scale = torch.tensor([0.5, -1.0])
    factor = log_scale.exp()
    scaled = call(PATHS[path], inputs, state_log_scale=log_scale)
    manual = call(PATHS[path], inputs, z=inputs["z"] * factor[:, None, None],
                  kappa=inputs["kappa"] * factor[:, None])
    close(scaled, manual, 1e-6, path)


@pytest.mark.parametrize("path", PATHS)
def test_callable_feature_map_sees_queries_grouped_per_kv_head(path):
    case = Case(batch=2, q_heads=6, kv_heads=2, q_len=4, k_len=5)
    inputs = make_inputs(case)
    seen = []

    def relu_features(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return F.relu(x) + 0.01

    out = call(PATHS[path], inputs, feature_map=relu_features)
    grouped = inputs["q"].reshape(2, 2, 3 * 4, 8)  # heads 0-2 -> KV head 0, heads 3-5 -> 1
    assert len(seen) == 1 and seen[0].shape == (2, 2, 12, 8)
    torch.testing.assert_close(seen[0], grouped)
    expected = call(reference_ntk_attention, as_float64(inputs), feature_map=relu_features)
    close(out, expected, 2e-5, path)


DROPOUT_CASES = {
    "trained_state": Case(is_causal=True),
    "zero_state": Case(mask="bool"),  # kappa = 0, Z = 0: the adapter at its init
}


def _dropout_inputs(name: str) -> dict:
    inputs = make_inputs(DROPOUT_CASES[name])
    if name == "zero_state":
        inputs["z"], inputs["kappa"] = inputs["z"] * 0, inputs["kappa"] * 0
    return inputs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", DROPOUT_CASES)
def test_dropout_path_at_tiny_rate_matches_reference_and_trains_kappa(path, name):
    """With dropout the state is merged as one more key (its logit its log mass): at a rate
    that drops nothing, output and every gradient equal the reference, and kappa = 0 still
    gets its gradient (it did not when the key's logit was detached)."""
    inputs = _dropout_inputs(name)
    leaves = differentiable(inputs)
    out = call(PATHS[path], inputs, dropout_p=1e-9)
    ref_inputs = as_float64(inputs)
    ref_leaves = differentiable(ref_inputs)
    expected = call(reference_ntk_attention, ref_inputs)
    close(out, expected, 2e-5, f"{path} {name} dropout output")
    weight = torch.randn_like(expected)
    (out * weight.float()).sum().backward()
    (expected * weight).sum().backward()
    for leaf_name, leaf, ref_leaf in zip(["q", "k", "v", "z", "kappa"], leaves, ref_leaves, strict=True):
        close(leaf.grad, ref_leaf.grad, 1e-4, f"{path} {name} dropout d{leaf_name}", floor=1e-6)
    assert leaves[-1].grad.abs().sum() > 0, "kappa got no gradient under dropout"


@pytest.mark.parametrize("path", PATHS)
def test_dropout_is_unbiased(path):
    """E[dropout attention] = attention: the mean over many draws approaches the output
    without dropout (state included), and each draw differs from it."""
    inputs = make_inputs(Case(batch=1, q_heads=2, kv_heads=1, q_len=4, k_len=4))
    expected = call(PATHS[path], inputs)
    torch.manual_seed(1)
    draws = torch.stack([call(PATHS[path], inputs, dropout_p=0.3) for _ in range(4000)])
    assert not torch.allclose(draws[0], expected)
    spread = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - expected).abs() <= 5 * spread + 1e-6).all()


def test_auto_implementation_is_the_lse_path():
    inputs = make_inputs(Case(is_causal=True))
    torch.testing.assert_close(call(ntk_attention, inputs), call(ntk_attention_lse, inputs),
                               rtol=0, atol=0)


class ShapeRecorder(TorchDispatchMode):
    """Records (op, shape, dtype) of every tensor every dispatched op returns."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), tuple(t.shape), t.dtype))
        return result


@pytest.mark.parametrize("setting", ["causal", "bidirectional", "padding_mask"])
def test_fused_path_materialises_no_score_matrix(setting):
    """At L = 256, no tensor produced in the forward or backward of the fused path has both
    of its last two dims >= L (on CPU SDPA's flash kernel runs as one op, so its blockwise
    internals are not seen; a fall-back to the math kernel would show its [L, L] scores)."""
    length = 256
    inputs = make_inputs(Case(batch=1, q_heads=2, kv_heads=2, q_len=length, k_len=length,
                              head_dim=16, is_causal=setting == "causal"))
    if setting == "padding_mask":
        inputs["attn_mask"] = torch.ones(1, 1, 1, length, dtype=torch.bool)
        inputs["attn_mask"][..., -10:] = False
    differentiable(inputs)
    with ShapeRecorder() as recorder:
        call(ntk_attention_fused, inputs).sum().backward()
    square = [(op, shape, dtype) for op, shape, dtype in recorder.outputs
              if len(shape) >= 2 and min(shape[-2:]) >= length]
    assert not square, f"Lq x Lk tensors on the fused path: {square}"


def test_fused_path_with_causal_padding_builds_masks_but_no_score_matrix():
    """Causal + padding needs an explicit mask with public SDPA. That mask is [B, 1, Lq, Lk+1]
    (SDPA itself turns a bool mask into an additive float one before its CPU kernel), but no
    per-head [B, H, Lq, Lk] score matrix is built."""
    length = 256
    inputs = make_inputs(Case(batch=2, q_heads=2, kv_heads=2, q_len=length, k_len=length,
                              head_dim=16, is_causal=True))
    inputs["attn_mask"] = torch.ones(2, 1, 1, length, dtype=torch.bool)
    inputs["attn_mask"][1, ..., -10:] = False
    differentiable(inputs)
    with ShapeRecorder() as recorder:
        call(ntk_attention_fused, inputs).sum().backward()
    per_head = [(op, shape, dtype) for op, shape, dtype in recorder.outputs
                if len(shape) >= 3 and min(shape[-2:]) >= length and shape[-3] != 1]
    assert not per_head, f"per-head Lq x Lk tensors: {per_head}"


LSE_LAYOUTS = {
    # name: (case, bool padding mask over the last 10 keys)
    "decode_gqa_folded": (Case(batch=1, q_heads=6, kv_heads=2, q_len=1, k_len=256,
                               head_dim=16, is_causal=True), False),
    "causal_gqa": (Case(batch=1, q_heads=4, kv_heads=2, q_len=256, k_len=256, head_dim=16,
                        is_causal=True), False),
    "bidirectional_padding": (Case(batch=2, q_heads=2, kv_heads=2, q_len=256, k_len=256,
                                   head_dim=16), True),
    "causal_chunk_lq<lk": (Case(batch=1, q_heads=2, kv_heads=2, q_len=64, k_len=256,
                                head_dim=16, is_causal=True), False),
}


@pytest.mark.parametrize("name", LSE_LAYOUTS)
def test_lse_path_runs_its_kernel_on_unaugmented_inputs_and_builds_no_score_matrix(name):
    """The lse path really runs (no hand-over to the fused path, whose augmented tensors are
    round_up(D + 1, 8) = 24 wide at D = 16) in forward and backward, and no per-head
    Lq x Lk tensor is built (a [.., 1, Lq, Lk] mask is allowed)."""
    case, padding = LSE_LAYOUTS[name]
    inputs = make_inputs(case)
    if padding:
        inputs["attn_mask"] = torch.ones(case.batch, 1, 1, case.k_len, dtype=torch.bool)
        inputs["attn_mask"][-1, ..., -10:] = False
    differentiable(inputs)
    with ShapeRecorder() as recorder:
        call(ntk_attention_lse, inputs).sum().backward()
    ops = {op for op, _, _ in recorder.outputs}
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in ops
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward.default" in ops
    augmented = [(op, shape) for op, shape, _ in recorder.outputs if shape and shape[-1] == 24]
    assert not augmented, f"augmented tensors on the lse path: {augmented}"
    square = [(op, shape) for op, shape, _ in recorder.outputs
              if len(shape) >= 3 and min(shape[-2:]) >= case.q_len > 1 and shape[-3] != 1]
    assert not square, f"per-head Lq x Lk tensors on the lse path: {square}"


@pytest.mark.parametrize("overrides", [{"dropout_p": 0.1}, {"value_dim": 6}])
def test_lse_path_hands_what_its_kernel_cannot_do_to_the_fused_path(overrides):
    """Dropout (SDPA's flash kernel has none) and Dv != D go to the fused path (augmented
    inputs: round_up(D + 1, 8) = 16 wide at D = 8)."""
    case = Case(value_dim=overrides.get("value_dim"))
    inputs = make_inputs(case)
    with ShapeRecorder() as recorder:
        call(ntk_attention_lse, inputs, dropout_p=overrides.get("dropout_p", 0.0))
    assert any(shape and shape[-1] == 16 for _, shape, _ in recorder.outputs)


@pytest.mark.parametrize("name", CASES)
def test_lse_path_without_autograd_matches_float64_reference(name):
    """Without autograd and without a mask the lse path runs ``lse_inference`` (terms in the
    kernel's layout, no zero offset built); with a mask its general path. Both against the
    reference."""
    inputs = make_inputs(CASES[name])
    with torch.no_grad():
        out = call(ntk_attention_lse, inputs)
    expected = call(reference_ntk_attention, as_float64(inputs))
    close(out, expected, 2e-5, f"lse no-grad {name}")


@pytest.mark.parametrize(
    "case, taken",
    [
        (Case(q_heads=6, kv_heads=2, q_len=1, k_len=9, is_causal=True), True),  # decoding, GQA
        (Case(q_heads=6, kv_heads=2, q_len=3, k_len=9), True),  # bidirectional, GQA folded
        (Case(q_heads=2, kv_heads=2, q_len=5, k_len=5, is_causal=True), True),  # kernel causal
        (Case(q_heads=2, kv_heads=2, q_len=5, k_len=5, per_row=True, rank=2,
              state_log_scale=1.0), True),
        (Case(q_heads=4, kv_heads=2, q_len=5, k_len=5, is_causal=True), True),  # prefill, GQA
        (Case(q_heads=4, kv_heads=2, q_len=5, k_len=5, is_causal=True, per_row=True,
              state_log_scale=1.0), True),
        (Case(q_heads=2, kv_heads=2, q_len=3, k_len=7, is_causal=True), False),  # causal chunk
    ],
)
@pytest.mark.parametrize("kernel_groups_heads", [True, False], ids=["kernel GQA", "folded"])
@pytest.mark.parametrize("fused_merge", [True, False], ids=["compiled merge", "torch ops"])
@pytest.mark.parametrize("chunk_rows", [1 << 14, 3], ids=["one chunk", "chunks of 3 rows"])
def test_lse_inference_takes_maskless_no_grad_layouts(
    case, taken, kernel_groups_heads, fused_merge, chunk_rows, monkeypatch
):
    """Both layouts: the kernel grouping GQA heads itself (torch here) and the fallback that
    folds them into the query length (or repeats k, v for a causal block); the state merged by
    the compiled call (ops.decode_merge, numba) and by its twin, the torch ops, in one chunk of
    query positions or in many (the in-place merge that keeps the no-grad peak memory low)."""
    from ntk_attention.ops import lse as lse_module
    from ntk_attention.ops.decode_merge import merge_into
    from ntk_attention.ops.lse import lse_inference
    from ntk_attention.ops.state import state_matrix

    monkeypatch.setattr(lse_module, "_KERNEL_GROUPS_HEADS", kernel_groups_heads)
    monkeypatch.setattr(lse_module, "_MERGE_CHUNK_ROWS", chunk_rows)
    inputs = make_inputs(case)
    phi = get_feature_map("elu", case.head_dim)
    matrix = state_matrix(inputs["z"], inputs["kappa"])
    args = (inputs["q"], inputs["k"], inputs["v"], matrix, phi)
    options = dict(is_causal=case.is_causal, scale=case.head_dim**-0.5,
                   state_log_scale=inputs["state_log_scale"], fused_merge=fused_merge)
    assert lse_inference(*args, **options) is None  # autograd on: never taken
    merges = []
    monkeypatch.setattr(lse_module, "merge_into", lambda *a: merges.append(a) or merge_into(*a))
    with torch.no_grad():
        out = lse_inference(*args, **options)
    assert (out is not None) == taken
    # numba is a dependency: it must compile; decoding steps (Lq = 1) only
    assert len(merges) == (taken and fused_merge and case.q_len == 1)
    if taken:
        expected = call(reference_ntk_attention, as_float64(inputs))
        close(out, expected, 2e-5, "lse_inference")


def _decode_inputs(scale_logits: float = 1.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, 1, 8, generator=generator) * scale_logits
    k = torch.randn(1, 2, 9, 8, generator=generator) * scale_logits
    v = torch.randn(1, 2, 9, 8, generator=generator)
    z = torch.randn(2, 8, 8, generator=generator)
    kappa = torch.rand(2, 8, generator=generator)
    return q, k, v, z, kappa


@pytest.mark.parametrize("fused_merge", [True, False], ids=["compiled merge", "torch ops"])
def test_lse_inference_with_the_zero_state_is_the_kernel_output_exactly(fused_merge):
    """out = o + (b - a o) / (S + a) is o bit for bit at Z = 0, kappa = 0: the adapter's
    initial state decodes exactly as the base model's SDPA (GQA heads grouped by the kernel)."""
    from ntk_attention.ops.lse import _KERNEL_GROUPS_HEADS, lse_inference
    from ntk_attention.ops.state import state_matrix

    q, k, v, z, kappa = _decode_inputs()
    phi = get_feature_map("elu", 8)
    with torch.no_grad():
        out = lse_inference(q, k, v, state_matrix(z * 0, kappa * 0), phi, is_causal=True,
                            scale=8**-0.5, fused_merge=fused_merge)
        base = F.scaled_dot_product_attention(q, k, v, scale=8**-0.5, enable_gqa=True)
    if _KERNEL_GROUPS_HEADS:
        assert torch.equal(out, base)
    else:  # query heads folded into the query length: the same sums in another order
        torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("logit_scale", [6.0, 0.0], ids=["lse above 88", "lse far below the state"])
@pytest.mark.parametrize("fused_merge", [True, False], ids=["compiled merge", "torch ops"])
def test_lse_inference_at_extreme_logits_matches_float64_reference(logit_scale, fused_merge):
    """lse > 88 (e^lse overflows float32: the state's share is below precision) and a state
    that dwarfs the exact part (logits near 0 against a kappa of e^70 via the log scale)."""
    from ntk_attention.ops.lse import lse_inference
    from ntk_attention.ops.state import state_matrix

    q, k, v, z, kappa = _decode_inputs(scale_logits=logit_scale)
    log_scale = torch.full((2,), 70.0 if logit_scale == 0.0 else 0.0)
    phi = get_feature_map("elu", 8)
    with torch.no_grad():
        out = lse_inference(q, k, v, state_matrix(z, kappa), phi, is_causal=False,
                            scale=8**-0.5, state_log_scale=log_scale, fused_merge=fused_merge)
    expected = reference_ntk_attention(
        q, k, v, z, kappa, feature_map="elu", scale=8**-0.5, state_log_scale=log_scale
    )
    assert torch.isfinite(out).all()
    close(out, expected, 2e-5, f"lse_inference logit scale {logit_scale}")


class TestNonnegative:
    def test_forward_is_clamp(self):
        theta = torch.tensor([-1.0, 0.0, 0.5])
        torch.testing.assert_close(nonnegative(theta), torch.tensor([0.0, 0.0, 0.5]))

    def test_gradient_at_zero_passes_when_the_loss_wants_kappa_larger(self):
        theta = torch.zeros(4, requires_grad=True)
        (-nonnegative(theta).sum()).backward()
        torch.testing.assert_close(theta.grad, -torch.ones(4))
        # abs(), the public reference code's choice, is dead at 0:
        dead = torch.zeros(4, requires_grad=True)
        (-dead.abs().sum()).backward()
        assert (dead.grad == 0).all()

    def test_gradient_is_projected_at_the_boundary(self):
        theta = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
        nonnegative(theta).sum().backward()  # the loss wants kappa smaller
        torch.testing.assert_close(theta.grad, torch.tensor([0.0, 0.0, 1.0]))

    def test_kappa_initialised_at_zero_trains_and_stays_nonnegative(self):
        """Distil a state with kappa > 0 into one initialised at Z = 0, kappa = 0 (the base
        model): plain SGD on theta must move kappa off 0, keep it >= 0, and fit the target.
        (kappa >= 0 holds by the clamp; what can fail is that every entry of theta = 0 gets a
        gradient that raises it, so that all of kappa leaves 0, and that the fit succeeds.)"""
        inputs = make_inputs(Case(batch=1, q_heads=2, kv_heads=1, q_len=16, k_len=16,
                                  is_causal=True))
        target = call(ntk_attention, inputs)
        theta = torch.zeros_like(inputs["kappa"], requires_grad=True)
        z = torch.zeros_like(inputs["z"], requires_grad=True)
        optimizer = torch.optim.SGD([theta, z], lr=2.0)
        losses = []
        for _ in range(150):
            kappa = nonnegative(theta)
            loss = (call(ntk_attention, inputs, z=z, kappa=kappa) - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            losses.append(loss.item())
            if len(losses) == 1:
                # The target's kappa is > 0 everywhere: from 0, every entry must be pushed up (a
                # gradient dead at 0, as abs() or relu give, leaves it 0 there).
                assert (theta.grad < 0).all(), f"gradient at kappa = 0: {theta.grad}"
            optimizer.step()
        assert (nonnegative(theta) > 0).all(), f"kappa stayed at 0: {nonnegative(theta)}"
        assert losses[-1] < 0.05 * losses[0], f"loss {losses[0]:.3g} -> {losses[-1]:.3g}"


def bad(**overrides):
    """Valid inputs (B=1, Hq=4, Hkv=2, L=5, D=8, elu) with some entries replaced."""
    inputs = make_inputs(Case(batch=1))
    inputs.pop("state_log_scale")
    inputs.update(overrides)
    return inputs


BAD_INPUTS = {
    "q rank 3": (lambda: bad(q=torch.randn(4, 5, 8)), r"\bq\b.*4-D.*\(4, 5, 8\)"),
    "k rank 5": (lambda: bad(k=torch.randn(1, 2, 5, 8, 1)), r"\bk\b.*4-D"),
    "v rank 3": (lambda: bad(v=torch.randn(2, 5, 8)), r"\bv\b.*4-D"),
    "Hq not a multiple of Hkv": (lambda: bad(q=torch.randn(1, 3, 5, 8)), r"multiple.*\(1, 3, 5, 8\)"),
    "head dim of q and k differ": (lambda: bad(q=torch.randn(1, 4, 5, 6)), r"head dim.*\(1, 4, 5, 6\)"),
    "k and v lengths differ": (lambda: bad(v=torch.randn(1, 2, 4, 8)), r"\bk\b.*\bv\b.*\(1, 2, 4, 8\)"),
    "batch of q and k differ": (lambda: bad(q=torch.randn(2, 4, 5, 8)), r"batch.*\(2, 4, 5, 8\)"),
    "z r differs from kappa r": (lambda: bad(z=torch.randn(2, 7, 8)), r"\bz\b.*\(2, 7, 8\)"),
    "z value dim differs from v": (lambda: bad(z=torch.randn(2, 8, 5)), r"\bz\b.*\(2, 8, 5\)"),
    "z rank 2": (lambda: bad(z=torch.randn(8, 8)), r"\bz\b.*\(8, 8\)"),
    "kappa Hkv differs from k": (lambda: bad(kappa=torch.rand(3, 8), z=torch.randn(3, 8, 8)),
                                 r"kappa.*\(3, 8\)"),
    "kappa rank 1": (lambda: bad(kappa=torch.rand(8)), r"kappa.*\(8,\)"),
    "per-row kappa batch differs": (lambda: bad(kappa=torch.rand(2, 2, 8),
                                                z=torch.randn(2, 2, 8, 8)), r"kappa.*\(2, 2, 8\)"),
    "low-rank inner dims differ": (lambda: bad(z=(torch.randn(2, 8, 3), torch.randn(2, 4, 8))),
                                   r"z_b.*\(2, 4, 8\)"),
    "elu with r != D": (lambda: bad(z=torch.randn(2, 6, 8), kappa=torch.rand(2, 6)),
                        r"elu.*r.*6"),
    "taylor with r != 1 + D + D^2": (lambda: bad(feature_map="taylor"), r"taylor.*73.*8"),
    "FeatureMap r != state r": (lambda: bad(feature_map=get_feature_map("favor", 8, r=16)),
                                r"r=16.*r=8"),
    "FeatureMap head_dim != D": (lambda: bad(feature_map=get_feature_map("favor", 4, r=8)),
                                 r"head_dim=4.*head_dim=8"),
    "callable output r != state r": (
        lambda: bad(feature_map=lambda x: torch.ones(*x.shape[:-1], 5)), r"r.*5.*8|8.*5"),
    "unknown feature map": (lambda: bad(feature_map="relu"), r"unknown feature_map 'relu'"),
    "zero r": (lambda: bad(z=torch.randn(2, 0, 8), kappa=torch.rand(2, 0)), r"\br\b.*positive"),
    "mask not broadcastable": (lambda: bad(attn_mask=torch.ones(3, 3, dtype=torch.bool)),
                               r"attn_mask.*\(3, 3\)"),
    "integer mask": (lambda: bad(attn_mask=torch.ones(5, 5, dtype=torch.int64)),
                     r"attn_mask.*int64"),
    "unknown implementation": (lambda: bad(implementation="triton"), r"implementation.*triton"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(name):
    make, match = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=match):
        call(ntk_attention, make())


def test_augmented_keys_repeat_kv_heads_for_their_query_heads():
    """The GQA layout used where SDPA's kernel takes no enable_gqa (fp32 on CUDA): each KV head
    is repeated for its G query heads, and the backward sums the G copies (gradcheck)."""
    from ntk_attention.ops.fused import _AugmentKeys

    x = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    out = _AugmentKeys.apply(x, 8, True, 3)
    assert out.shape == (2, 6, 6, 8)
    for head in range(6):
        torch.testing.assert_close(out[:, head, 1:, :3], x[:, head // 3])
    assert torch.autograd.gradcheck(lambda t: _AugmentKeys.apply(t, 8, True, 3), (x,))
