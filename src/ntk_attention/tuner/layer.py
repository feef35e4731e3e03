"""What the adapter attaches to one module of the base model.

* :class:`NTKState` sits on an attention module (as ``module.ntk_state``) and holds, for every
  adapter that targets that layer, the state the op needs, in ``ParameterDict``s keyed by
  adapter name:

      ntk_z          [Hkv, r, D]    dense Z                     (or, with a rank s:)
      ntk_z_a        [Hkv, r, s]    ntk_z_b [Hkv, s, D]        Z = Z_A Z_B
      ntk_kappa      [Hkv, r]       theta; kappa = nonnegative(theta) (projected gradient)
      ntk_log_scale  [Hkv]          optional log scale of the state
      ntk_exact_keys, ntk_exact_values  [n, T, D]  tokens the config's ``exact_heads`` of this
                                    layer keep exactly ("exp" maps; joined to the virtual
                                    tokens of those heads when the state is read)
      ntk_exact_quantized           instead of those two with ``exact_bits``: the same tokens
                                    in a few bits (a QuantizedTokens module of buffers)
      ntk_feature_map               the feature map phi (a module: "favor" keeps its random
                                    projection as a buffer, "exp" has trainable parameters)

  It also decides, per call, which rows use which state (:meth:`NTKState.plan`).
* :class:`ModulesToSaveWrapper` replaces a task head listed in ``modules_to_save``: a frozen
  original and one trainable copy per adapter, as PEFT's wrapper of the same name.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from ..ops import ExpFeatureView, FeatureMap, get_feature_map, nonnegative
from ..ops.state import state_matrix
from .config import NTKConfig
from .quantized_tokens import QuantizedTokens
from .routing import BASE_ADAPTER, current_adapter_names, expand_rows

__all__ = ["Geometry", "ModulesToSaveWrapper", "NTKState", "OpState", "RowGroup"]

STATE_ATTR = "ntk_state"
PARAMETER_KINDS = (
    "ntk_z", "ntk_z_a", "ntk_z_b", "ntk_kappa", "ntk_log_scale", "ntk_exact_keys", "ntk_exact_values",
)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The shape of one attention layer, as found in the model at injection."""

    layer_index: int  # position among the model's self-attention layers
    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float  # the layer's softmax scale s (logits are s q.k)
    causal: bool = False  # a decoder's causal self-attention (sink_tokens="auto" -> 1)

    def to_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class OpState:
    """One state in the form :func:`ntk_attention` takes (leading batch dim when per row)."""

    z: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    kappa: torch.Tensor
    log_scale: torch.Tensor | None
    feature_map: FeatureMap
    implementation: str  # "auto", "fused" or "naive" (the adapter's choice)
    # [Z | kappa] for the no-grad lse path (ops.state_matrix), kept while decoding; else None.
    matrix: torch.Tensor | None = None
    sink_tokens: int = 0  # the first positions that read only the real keys (ops/sink.py)


@dataclasses.dataclass
class RowGroup:
    """Rows of the batch (None = all) and the state they use (None = the base attention)."""

    rows: torch.Tensor | None
    state: OpState | None


class NTKState(nn.Module):
    """The NTK-Attention states of one attention layer, one per adapter that targets it."""

    def __init__(self, geometry: Geometry) -> None:
        super().__init__()
        self.geometry = geometry
        for kind in PARAMETER_KINDS:
            setattr(self, kind, nn.ParameterDict())
        self.ntk_feature_map = nn.ModuleDict()
        self.ntk_exact_quantized = nn.ModuleDict()
        self.configs: dict[str, NTKConfig] = {}
        self.exact_heads: dict[str, torch.Tensor] = {}  # adapter -> KV head indices [n]
        self.active_adapter: str | None = None
        self.disabled = False
        self.saw_row_names = False  # set when a call's per-row names reached this layer
        # adapter name -> OpState with its matrix, kept for one generate() call (see
        # NTKModel.generate); None outside it, where every call reads the parameters afresh.
        self.decode_cache: dict[str, OpState] | None = None

    # ----------------------------------------------------------------- adapters
    def add_adapter(self, name: str, config: NTKConfig, device: torch.device) -> None:
        """Create the parameters of adapter ``name`` (initialised as ``config.init`` says)."""
        if name in self.configs:
            raise ValueError(f"adapter {name!r} already exists in layer {self.geometry.layer_index}")
        g = self.geometry
        r = config.resolve_r(g.head_dim)
        generator = torch.Generator().manual_seed(config.seed * 100_003 + g.layer_index)
        kwargs = dict(dtype=torch.float32)

        def normal(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(*shape, generator=generator, **kwargs) * std).to(device)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device, **kwargs)

        # Gated: ntk_z holds the values U, Z = kappa U is 0 at kappa = 0 whatever U is, and U
        # must not start at 0 (kappa's gradient would see no value to weigh).
        std = config.init_std if config.init == "normal" or config.gated else 0.0
        if config.rank is None:
            self.ntk_z[name] = nn.Parameter(normal(g.kv_heads, r, g.head_dim, std=std))
        else:
            # Z_A random and Z_B as the init says: Z = Z_A Z_B is 0 at "zeros" and Z_B trains.
            self.ntk_z_a[name] = nn.Parameter(
                normal(g.kv_heads, r, config.rank, std=1.0 / math.sqrt(r))
            )
            self.ntk_z_b[name] = nn.Parameter(normal(g.kv_heads, config.rank, g.head_dim, std=std))
        self.ntk_kappa[name] = nn.Parameter(zeros(g.kv_heads, r))
        if config.learn_log_scale:
            self.ntk_log_scale[name] = nn.Parameter(zeros(g.kv_heads))
        feature_map = get_feature_map(
            config.feature_map, g.head_dim, r=r, scale=g.scale, seed=config.seed, kv_heads=g.kv_heads
        )
        self.ntk_feature_map[name] = feature_map.to(device)
        exact = config.exact_heads_of(g.layer_index)
        if exact:
            if max(exact) >= g.kv_heads:
                raise ValueError(
                    f"exact_heads names KV head {max(exact)} of layer {g.layer_index}, which has "
                    f"{g.kv_heads} KV heads"
                )
            shape = (len(exact), config.exact_tokens, g.head_dim)
            if config.exact_bits is None:
                self.ntk_exact_keys[name] = nn.Parameter(zeros(*shape))
                self.ntk_exact_values[name] = nn.Parameter(zeros(*shape))
            else:
                self.ntk_exact_quantized[name] = QuantizedTokens(*shape, config.exact_bits, device)
            self.exact_heads[name] = torch.tensor(exact, dtype=torch.long, device=device)
        self.configs[name] = config

    def delete_adapter(self, name: str) -> None:
        for kind in PARAMETER_KINDS:
            if name in getattr(self, kind):
                del getattr(self, kind)[name]
        for table in (self.ntk_feature_map, self.ntk_exact_quantized):
            if name in table:
                del table[name]
        self.configs.pop(name, None)
        self.exact_heads.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Trainable tensors of adapter ``name`` by kind: ``ntk_z`` ... and ``ntk_feature_map.*``."""
        out = {kind: getattr(self, kind)[name] for kind in PARAMETER_KINDS if name in getattr(self, kind)}
        if name in self.ntk_feature_map:
            for key, param in self.ntk_feature_map[name].named_parameters():
                out[f"ntk_feature_map.{key}"] = param
        return out

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Everything saved for adapter ``name``: its parameters and its feature map's buffers."""
        out: dict[str, torch.Tensor] = {
            kind: getattr(self, kind)[name] for kind in PARAMETER_KINDS if name in getattr(self, kind)
        }
        for table in ("ntk_feature_map", "ntk_exact_quantized"):
            if name in getattr(self, table):
                for key, tensor in getattr(self, table)[name].state_dict().items():
                    out[f"{table}.{key}"] = tensor
        return out

    def exact_tokens(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values [n, T, D] adapter ``name``'s exact heads keep in this layer
        (dequantised when stored in a few bits)."""
        quantized = self._modules["ntk_exact_quantized"]._modules.get(name)
        if quantized is not None:
            return quantized.keys(), quantized.values()
        return (
            self._modules["ntk_exact_keys"]._parameters[name],
            self._modules["ntk_exact_values"]._parameters[name],
        )

    def op_state(self, name: str) -> OpState:
        """Adapter ``name``'s state as the op takes it. Runs per layer and call (per token when
        decoding): within a ``generate`` call (``decode_cache`` set) and without autograd the
        state and its matrix [Z | kappa] are built once and reused."""
        cache = self.decode_cache
        if cache is not None and not torch.is_grad_enabled():
            state = cache.get(name)
            if state is None:
                state = self._read_state(name)
                state = cache[name] = dataclasses.replace(
                    state, matrix=state_matrix(state.z, state.kappa)
                )
            return state
        return self._read_state(name)

    def _read_state(self, name: str) -> OpState:
        """The state from the parameters. Reads the ParameterDicts' own tables instead of going
        through nn.Module attribute lookups (a few microseconds each on a cold cache)."""
        modules = self._modules
        kappa = nonnegative(modules["ntk_kappa"]._parameters[name])
        z = modules["ntk_z"]._parameters.get(name)
        if z is None:
            z = (modules["ntk_z_a"]._parameters[name], modules["ntk_z_b"]._parameters[name])
        feature_map = modules["ntk_feature_map"]._modules[name]
        config = self.configs[name]
        if config.gated:  # Z = diag(kappa) U (for Z_A Z_B: the rows of Z_A)
            gate = kappa.unsqueeze(-1)
            z = gate * z if isinstance(z, torch.Tensor) else (gate * z[0], z[1])
        if name in self.exact_heads:
            feature_map, z, kappa = self._with_exact_tokens(name, feature_map, z, kappa)
        return OpState(
            z, kappa, modules["ntk_log_scale"]._parameters.get(name), feature_map,
            config.implementation, sink_tokens=config.resolve_sink_tokens(self.geometry.causal),
        )

    def _with_exact_tokens(
        self, name: str, feature_map: FeatureMap, z: torch.Tensor, kappa: torch.Tensor
    ) -> tuple[FeatureMap, torch.Tensor, torch.Tensor]:
        """The state with the exact heads' kept tokens joined as T more virtual tokens per KV
        head: key W = k, bias 0, Z = v, kappa = 1 in the exact heads; bias -inf (phi = 0) and
        kappa = 0 in the others, so they see nothing of them."""
        keys, values = self.exact_tokens(name)  # [n, T, D]
        heads = self.exact_heads[name]
        if heads.device != keys.device:  # the model was moved after the adapter was added
            heads = self.exact_heads[name] = heads.to(keys.device)
        kv_heads, tokens, head_dim = z.shape[0], keys.shape[1], keys.shape[2]
        padded_keys = keys.new_zeros(kv_heads, tokens, head_dim).index_copy(0, heads, keys)
        padded_values = values.new_zeros(kv_heads, tokens, head_dim).index_copy(0, heads, values)
        live = kappa.new_zeros(kv_heads, tokens).index_fill(0, heads, 1.0)
        bias = feature_map.bias.new_full((kv_heads, tokens), -torch.inf).index_fill(0, heads, 0.0)
        view = ExpFeatureView(
            torch.cat([feature_map.weight, padded_keys], dim=1),
            torch.cat([feature_map.bias, bias], dim=1),
            scale=feature_map.scale,
        )
        return view, torch.cat([z, padded_values], dim=1), torch.cat([kappa, live], dim=1)

    # --------------------------------------------------------------- per call
    def plan(self, row_names: tuple[str, ...] | None, batch: int) -> list[RowGroup]:
        """Which rows use which state in this call.

        Without ``row_names`` every row uses the active adapter (or the base attention when the
        adapter is disabled or does not target this layer). With them, rows naming adapters
        whose feature maps agree are served by one op call on per-row stacked states
        ([B, Hkv, r, D], zeros for base rows); otherwise the batch is split by adapter.
        """
        if row_names is None:
            name = self.active_adapter
            if self.disabled or name is None or name not in self.configs:
                return [RowGroup(None, None)]
            return [RowGroup(None, self.op_state(name))]

        self.saw_row_names = True
        rows = expand_rows(row_names, batch)
        # Adapters that do not target this layer run the base attention here.
        rows = tuple(n if n in self.configs else BASE_ADAPTER for n in rows)
        distinct = list(dict.fromkeys(rows))
        if distinct == [BASE_ADAPTER]:
            return [RowGroup(None, None)]
        if len(distinct) == 1:
            return [RowGroup(None, self.op_state(distinct[0]))]
        adapters = [n for n in distinct if n != BASE_ADAPTER]
        device = self.ntk_kappa[adapters[0]].device
        if self._stackable(adapters):
            index = torch.tensor([adapters.index(n) if n != BASE_ADAPTER else len(adapters) for n in rows], device=device)
            return [RowGroup(None, self._stacked(adapters, index))]
        groups = []
        for name in distinct:
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=device)
            groups.append(RowGroup(index, None if name == BASE_ADAPTER else self.op_state(name)))
        return groups

    def _stackable(self, names: list[str]) -> bool:
        """One feature map can serve every adapter in ``names``: same class, r, scale and
        buffers, and no trainable parameters (those differ per adapter)."""
        maps = [self.ntk_feature_map[n] for n in names]
        first = maps[0]
        if any(True for _ in first.parameters()):
            return False
        first_buffers = list(first.buffers())
        for other in maps[1:]:
            if type(other) is not type(first) or other.r != first.r or other.scale != first.scale:
                return False
            if any(True for _ in other.parameters()):
                return False
            other_buffers = list(other.buffers())
            if len(other_buffers) != len(first_buffers) or not all(
                torch.equal(a, b) for a, b in zip(first_buffers, other_buffers, strict=False)
            ):
                return False
        causal = self.geometry.causal
        options = {
            (self.configs[n].implementation, self.configs[n].resolve_sink_tokens(causal))
            for n in names
        }
        return len(options) == 1

    def _stacked(self, names: list[str], index: torch.Tensor) -> OpState:
        """Per-row states [B, Hkv, ...] gathered from the adapters' states plus a zero state."""
        states = [self.op_state(n) for n in names]
        dense = [s.z if isinstance(s.z, torch.Tensor) else s.z[0] @ s.z[1] for s in states]
        z_bank = torch.stack(dense + [torch.zeros_like(dense[0])])  # [n + 1, Hkv, r, D]
        kappa_bank = torch.stack([s.kappa for s in states] + [torch.zeros_like(states[0].kappa)])
        log_scale = None
        if any(s.log_scale is not None for s in states):
            zero = torch.zeros_like(kappa_bank[0, :, 0])
            scales = [s.log_scale if s.log_scale is not None else zero for s in states]
            log_scale = torch.stack(scales + [zero])[index]  # [B, Hkv]
        return OpState(
            z_bank[index], kappa_bank[index], log_scale, states[0].feature_map,
            states[0].implementation, sink_tokens=states[0].sink_tokens,
        )


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full with an adapter (a task head): the frozen original plus one
    trainable copy per adapter; the active adapter's copy runs (the original when disabled).

    In a call with per-row adapter names the batch is split by adapter, each part runs through
    its adapter's copy (base rows and adapters without a copy: the original), and the outputs
    are put back in row order. Inputs and outputs must be batch-first tensors then.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def _module_for(self, name: str | None) -> nn.Module:
        if name is not None and name in self.modules_to_save:
            return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        row_names = current_adapter_names()
        if row_names is None or self.disabled:
            name = None if self.disabled else self.active_adapter
            return self._module_for(name)(*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError(
                "per-row adapter_names with modules_to_save need a batch-first tensor as the "
                "module's first argument"
            )
        rows = expand_rows(row_names, args[0].shape[0])
        distinct = list(dict.fromkeys(rows))
        if len(distinct) == 1:
            return self._module_for(distinct[0])(*args, **kwargs)
        parts, order = [], []
        for name in distinct:
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=args[0].device)
            part_args = [a[index] if isinstance(a, torch.Tensor) else a for a in args]
            out = self._module_for(name)(*part_args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise ValueError(
                    f"per-row adapter_names with modules_to_save need a module returning a "
                    f"tensor, got {type(out).__name__}"
                )
            parts.append(out)
            order.append(index)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(parts)[inverse]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Attribute passthrough (``model.classifier.out_features``) to the original module.
            modules = self.__dict__["_modules"]
            return getattr(modules["original_module"], name)
