"""Distil a prefix (the teacher: the model reading it from its cache) into a state (the
student: the model with an NTK-Attention adapter and no prefix).

Layer-wise: every attention layer is trained on its own to reproduce the teacher's attention
output from the teacher's queries, keys and values (the inputs are the teacher's, so layers do
not wait for one another). All layers train at once in one op call: layer l's KV head h becomes
KV head l * Hkv + h of one wide attention, whose state stacks the layers' states. The loss is the
mean over layers of ||out - teacher||^2 / ||teacher||^2, so every layer counts alike.

End to end (optional, after the layer-wise stage): KL(teacher || student) of the next-token
distributions on the same inputs, through the whole adapted model.
"""

from __future__ import annotations

import torch

from ..ops import get_feature_map, nonnegative, ntk_attention
from ..tuner import NTKModel, read_state, write_state
from .config import CompressError
from .teacher import DistillData, attention_layers

__all__ = ["distil_end_to_end", "distil_layers", "layer_losses"]

# State fields (tuner.state_access) the stack treats apart: the exact heads' kept tokens (left
# out), the virtual tokens (stacked into the stack's own feature map) and the map's other
# tensors (``feature_map.<key>``).
_EXACT = ("exact_keys", "exact_values")
_VIRTUAL = ("virtual_keys", "virtual_bias")
_FEATURE_MAP = "feature_map."


def _relative_errors(
    out: torch.Tensor, target: torch.Tensor, layers: int, exact: torch.Tensor | None = None
) -> torch.Tensor:
    """[n, layers * Hq, L, D] twice -> [layers] ||out - target||^2 / ||target||^2. Query heads
    marked in ``exact`` [layers * Hq] (those of exact heads, equal to the teacher by
    construction) count as error 0."""
    shape = (out.shape[0], layers, -1, *out.shape[2:])
    error = out - target
    if exact is not None and bool(exact.any()):
        error = error.masked_fill(exact.to(error.device)[:, None, None], 0.0)
    diff = error.reshape(shape).square().sum(dim=(0, 2, 3, 4))
    norm = target.reshape(shape).square().sum(dim=(0, 2, 3, 4)).clamp_min(1e-30)
    return diff / norm


class _StackedState(torch.nn.Module):
    """Every layer's state of one adapter as one state over layers * Hkv KV heads. The exact
    heads' kept tokens are left out (they are the teacher's own keys and values): their output
    here is not theirs, so ``exact`` [layers * Hq] marks their query heads for the loss to skip,
    and their virtual tokens get no gradient."""

    def __init__(self, ntk: NTKModel, adapter_name: str) -> None:
        super().__init__()
        layers, g = attention_layers(ntk.base_model)
        self.layers, self.geometry = len(layers), g
        self.adapter_name = adapter_name
        self.modules_with_state = [module for _, module in layers]
        config = ntk.peft_config[adapter_name]
        heads = self.layers * g.kv_heads
        self.feature_map = get_feature_map(
            config.feature_map, g.head_dim, r=config.resolve_r(g.head_dim), scale=g.scale,
            seed=config.seed, kv_heads=heads,
        )
        self.exact = torch.zeros(self.layers, g.kv_heads, g.q_heads // g.kv_heads, dtype=torch.bool)
        for layer, head in config.exact_heads or ():
            self.exact[layer, head] = True
        self.exact = self.exact.reshape(-1)
        per_layer = [
            {k: t for k, t in read_state(module, adapter_name).items() if k not in _EXACT}
            for module in self.modules_with_state
        ]
        self.tensors = torch.nn.ParameterDict()
        virtual = self._virtual_tensors()
        with torch.no_grad():
            for key in per_layer[0]:
                stacked = torch.stack([t[key] for t in per_layer]).float()
                if key in _VIRTUAL:  # per KV head: layer l's head h is stacked head l * Hkv + h
                    target = virtual[key]
                    target.copy_(stacked.reshape(target.shape))
                elif key.startswith(_FEATURE_MAP):
                    name = key.removeprefix(_FEATURE_MAP)
                    if name in dict(self.feature_map.named_parameters()):
                        target = self.feature_map.get_parameter(name)
                        if stacked.shape[1] != g.kv_heads:
                            raise CompressError(f"cannot stack feature-map parameter {name!r} per KV head")
                        target.copy_(stacked.reshape(target.shape))
                    else:  # a buffer (favor's projection): the same in every layer
                        target = self.feature_map.get_buffer(name)
                        if not all(torch.equal(stacked[0], other) for other in stacked[1:]):
                            raise CompressError(f"feature-map buffer {name!r} differs between layers")
                        target.copy_(stacked[0])
                else:
                    self.tensors[key] = torch.nn.Parameter(
                        stacked.reshape(heads, *stacked.shape[2:])
                    )
        self.feature_map.to(per_layer[0]["kappa"].device)

    def _virtual_tensors(self) -> dict[str, torch.Tensor]:
        """The stacked map's virtual-token tensors by state field (none for a kernel map)."""
        tensors = self.feature_map.virtual_token_tensors()
        return {} if tensors is None else dict(zip(_VIRTUAL, tensors, strict=True))

    def forward(self, q, k, v, implementation: str = "fused") -> torch.Tensor:
        t = self.tensors
        z = t["z"] if "z" in t else (t["z_a"], t["z_b"])
        return ntk_attention(
            q, k, v, z, nonnegative(t["kappa"]),
            feature_map=self.feature_map, is_causal=True, scale=self.geometry.scale,
            state_log_scale=t.get("log_scale", None),
            implementation=implementation,
        )

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained stack into the layers' states (its buffers, the same in every
        layer and never trained, are left as they are)."""
        trained: dict[str, torch.Tensor] = dict(self.tensors.items())
        trained.update(self._virtual_tensors())
        for name, param in self.feature_map.named_parameters():
            if not any(param is t for t in trained.values()):
                trained[_FEATURE_MAP + name] = param
        for layer, module in enumerate(self.modules_with_state):
            # [layers * Hkv, ...] -> layer's [Hkv, ...]
            per_layer = {k: t.unflatten(0, (self.layers, -1))[layer] for k, t in trained.items()}
            write_state(module, self.adapter_name, per_layer)


def layer_losses(ntk: NTKModel, data: DistillData, adapter_name: str = "default") -> torch.Tensor:
    """[layers] relative error of each layer's attention output against the teacher's."""
    stack = _StackedState(ntk, adapter_name)
    with torch.no_grad():
        out = stack(data.queries, data.keys, data.values)
    return _relative_errors(out, data.outputs, stack.layers, stack.exact)


def distil_layers(
    ntk: NTKModel,
    data: DistillData,
    *,
    steps: int,
    lr: float,
    batch_size: int | None,
    generator: torch.Generator,
    adapter_name: str = "default",
    progress: bool = True,
) -> list[float]:
    """Layer-wise distillation with Adam; returns the loss before each step and after the last."""
    from tqdm.auto import tqdm

    stack = _StackedState(ntk, adapter_name)
    params = [p for p in stack.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    rows = data.rows
    batch = rows if batch_size is None else min(batch_size, rows)
    losses = []
    bar = tqdm(range(steps), desc="layer-wise distillation", disable=not progress)
    for _ in bar:
        index = torch.randperm(rows, generator=generator)[:batch] if batch < rows else slice(None)
        out = stack(data.queries[index], data.keys[index], data.values[index])
        loss = _relative_errors(out, data.outputs[index], stack.layers, stack.exact).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    with torch.no_grad():
        out = stack(data.queries, data.keys, data.values)
        losses.append(_relative_errors(out, data.outputs, stack.layers, stack.exact).mean().item())
    stack.write_back()
    return losses


def distil_end_to_end(
    ntk: NTKModel,
    data: DistillData,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = True,
) -> list[float]:
    """KL(teacher || student) on the next-token distributions of ``data.input_ids``; trains the
    active adapter. Returns the loss of each step."""
    from tqdm.auto import tqdm

    if data.log_probs is None:
        raise CompressError("end-to-end distillation needs the teacher's log-probabilities")
    params = [p for p in ntk.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    rows = data.rows
    batch = min(batch_size, rows)
    losses = []
    bar = tqdm(range(steps), desc="end-to-end distillation", disable=not progress)
    for _ in bar:
        index = torch.randperm(rows, generator=generator)[:batch]
        logits = ntk(input_ids=data.input_ids[index]).logits.float()
        loss = kl_divergence(data.log_probs[index], torch.log_softmax(logits, -1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    return losses


def kl_divergence(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position: [..., V] twice -> [...]."""
    return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
