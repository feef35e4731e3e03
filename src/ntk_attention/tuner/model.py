"""NTKModel: a transformers model with NTK-Attention adapters, in PEFT's conventions.

``get_ntk_model(model, config)`` freezes the base model, attaches an :class:`NTKState` to every
targeted self-attention module, wraps ``modules_to_save`` heads, and switches the attention
implementation to the NTK twin of the one the model was loaded with (``sdpa`` -> ``ntk_sdpa``,
``eager`` -> ``ntk_eager``). ``unload()`` undoes all of it.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    ntk = get_ntk_model(model, NTKConfig(feature_map="elu"))
    ntk.print_trainable_parameters()
    ...train...
    ntk.save_pretrained("out/adapter")
    ntk = NTKModel.from_pretrained(base, "out/adapter")
    ntk.generate(**inputs, adapter_names=["default", "__base__"])   # per-row adapters
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from .attention import family_for_base
from .config import NTKConfig
from .discovery import (
    UnsupportedModelError,
    find_attention_modules,
    find_position_modules,
    geometry_of,
)
from .layer import STATE_ATTR, Geometry, ModulesToSaveWrapper, NTKState
from .positions import PositionOffsetHooks
from .routing import (
    ADAPTER_NAMES_KWARG,
    BASE_ADAPTER,
    call_adapter_names,
    current_adapter_names,
    expand_rows,
)
from .save_load import (
    AdapterLoadError,
    base_tensors_for_fingerprint,
    check_base_architecture,
    check_base_record,
    check_tensors,
    full_tensor,
    geometry_record,
    read_adapter_config,
    read_adapter_tensors,
    weights_fingerprint,
    write_adapter,
)

__all__ = ["AdapterLoadError", "NTKModel", "get_ntk_model"]


class _ForwardWithBaseSignature:
    """``NTKModel.forward``, presented with the base model's forward signature (plus
    ``adapter_names``), so tools that read it (transformers.Trainer drops dataset columns the
    forward does not name) see the real inputs instead of ``*args, **kwargs``."""

    def __get__(self, instance: NTKModel | None, owner: type) -> Any:
        if instance is None:
            return owner._forward
        bound = functools.partial(owner._forward, instance)
        bound.__signature__ = instance.__dict__.get("_forward_signature")
        bound.__doc__ = owner._forward.__doc__
        return bound


def _signature_with_adapter_names(fn: Any) -> inspect.Signature | None:
    """``fn``'s signature with a keyword-only ``adapter_names=None`` before its ``**kwargs``."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = [p for p in signature.parameters.values() if p.name != "adapter_names"]
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    head = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    tail = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=head + [extra] + tail)


class NTKModel(PeftModel):
    """A base transformers model plus named NTK-Attention adapters.

    Attribute access falls through to the base model (``ntk.config``, ``ntk.device``, ...).
    Only the active adapter is trainable; ``adapter_names=[...]`` in ``forward``/``generate``
    gives each row its own adapter (``"__base__"``: none).

    It subclasses ``peft.PeftModel`` only so that tools which check for a PEFT model treat it
    as one: ``transformers.Trainer`` then saves adapter-only checkpoints and ``save_model``
    output through :meth:`save_pretrained`, and loads them back through :meth:`load_adapter`
    (``resume_from_checkpoint``, ``load_best_model_at_end``). ``PeftModel.__init__`` never
    runs; every member of PeftModel that those tools use is defined here, and PEFT's own
    machinery (its tuners, prompt learning, merging) is not used.
    """

    forward = _ForwardWithBaseSignature()
    # PeftModel's properties of this name read PEFT internals this class does not have: a
    # plain class attribute shadows the property, and each instance sets its own dict.
    peft_config = None
    # How the adapter was made, when a compress function made it (None otherwise): the
    # CompressionReport of ``compress.compress_prompt`` and the record of
    # ``compress.convert_prefix``. Kept in memory only; the CLI writes them beside the adapter.
    compression = None
    conversion = None

    def __init__(self, model: nn.Module, config: NTKConfig, adapter_name: str = "default") -> None:
        nn.Module.__init__(self)
        if isinstance(model, NTKModel):
            raise ValueError("the model is already an NTKModel: use add_adapter() on it")
        if not isinstance(config, NTKConfig):
            raise ValueError(f"config must be an NTKConfig, got {type(config).__name__}")
        attention = find_attention_modules(model)
        if any(STATE_ATTR in module._modules for _, module in attention):
            raise ValueError("the model already carries NTK states (wrapped by another NTKModel?)")
        # Every check before the first change to the model.
        configs = {id(m.config): m.config for _, m in attention}
        families = {key: family_for_base(cfg._attn_implementation) for key, cfg in configs.items()}

        self.base_model = model
        self.peft_config: dict[str, NTKConfig] = {}
        self._active_adapter: str | None = None
        self._disabled = False
        self._unloaded = False
        self._frozen: set[str] = set()  # adapters loaded for inference (is_trainable=False)
        self._attention = attention
        self._geometries: dict[str, Geometry] = {
            name: geometry_of(module, index) for index, (name, module) in enumerate(attention)
        }
        self._requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        self._original_attn = [(cfg, cfg._attn_implementation_internal) for cfg in configs.values()]
        self._position_hooks: PositionOffsetHooks | None = None
        self.__dict__["_forward_signature"] = _signature_with_adapter_names(model.forward)

        for param in model.parameters():
            param.requires_grad_(False)
        for key, cfg in configs.items():
            cfg._attn_implementation_internal = families[key].name
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            self._restore_base()
            raise
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------- passthrough
    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_model")
            if base is None:
                raise
            return getattr(base, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def modules_to_save(self) -> set[str] | None:
        """The task-head names every adapter saves with itself (PEFT's attribute)."""
        names = {name for config in self.peft_config.values() for name in config.modules_to_save or ()}
        return names or None

    @property
    def has_active_enabled_adapter(self) -> bool:
        return self._active_adapter is not None and not self._disabled

    @property
    def active_peft_config(self) -> NTKConfig:
        return self.peft_config[self._resolve_name(None)]

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.base_model, "dtype", None)

    def get_prompt_embedding_to_save(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("an NTK-Attention adapter has no prompt embedding (it is not "
                                  "PEFT prompt learning)")

    def _forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` (one per row) mixes adapters in a batch."""
        self._check_usable()
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        names = self._check_adapter_names(adapter_names)
        with self._mixed_call(names):
            return self.base_model(*args, **kwargs, **{ADAPTER_NAMES_KWARG: names})

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``adapter_names`` as in ``forward``. The KV cache is the
        base model's own: the state depends only on the queries. Each layer reads its state
        once per call (a change to the adapter's parameters made during the call, e.g. from a
        streamer callback, is seen by the next call)."""
        self._check_usable()
        with self._decoding():
            if adapter_names is None:
                return self.base_model.generate(*args, **kwargs)
            return self._generate_mixed(self._check_adapter_names(adapter_names), args, kwargs)

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """Within: each layer builds its state (and the [Z | kappa] matrix the decoding path
        reads) once instead of per token. The parameters cannot change inside a generate call;
        the cache is dropped on the way out, so a later training step or load is always seen."""
        states = list(self._states())
        previous = [state.decode_cache for state in states]
        for state in states:
            state.decode_cache = {}
        try:
            yield
        finally:
            for state, cache in zip(states, previous, strict=True):
                state.decode_cache = cache

    def _generate_mixed(self, names: tuple[str, ...], args: tuple, kwargs: dict) -> Any:
        """generate() with per-row adapter names."""

        # generate() rejects keyword arguments the model's forward does not name, so the names
        # are added to each of its forward calls instead.
        def add_names(module: nn.Module, call_args: tuple, call_kwargs: dict) -> tuple:
            return call_args, {**call_kwargs, ADAPTER_NAMES_KWARG: names}

        handle = self.base_model.register_forward_pre_hook(add_names, with_kwargs=True)
        try:
            with self._mixed_call(names):
                return self.base_model.generate(*args, **kwargs)
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _mixed_call(self, names: tuple[str, ...]) -> Iterator[None]:
        states = list(self._states())
        for state in states:
            state.saw_row_names = False
        with call_adapter_names(names):
            yield
        targeted = [s for s in states if any(n in s.configs for n in names)]
        if targeted and not any(s.saw_row_names for s in targeted):
            raise UnsupportedModelError(
                f"{type(self.base_model).__name__} does not pass keyword arguments down to its "
                "attention layers, so per-row adapter_names cannot reach them"
            )

    def _check_adapter_names(self, adapter_names: Sequence[str]) -> tuple[str, ...]:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"adapter_names must be a list of adapter names, got {adapter_names!r}")
        names = tuple(adapter_names)
        if not names:
            raise ValueError("adapter_names must not be empty")
        unknown = sorted(set(names) - set(self.peft_config) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(
                f"unknown adapter names {unknown}; known: {sorted(self.peft_config)} "
                f"and {BASE_ADAPTER!r} (no adapter)"
            )
        if self._disabled:
            raise ValueError("adapter_names cannot be used inside disable_adapter()")
        return names

    # ---------------------------------------------------------------- adapters
    @property
    def active_adapter(self) -> str | None:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [] if self._active_adapter is None else [self._active_adapter]

    def add_adapter(self, adapter_name: str, config: NTKConfig) -> None:
        """Attach a new adapter (not active until :meth:`set_adapter`; PEFT's convention)."""
        self._check_usable()
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not isinstance(config, NTKConfig):
            raise ValueError(f"config must be an NTKConfig, got {type(config).__name__}")
        targets = self._resolve_targets(config)
        for name in targets:
            config.resolve_r(self._geometries[name].head_dim)  # raises on a bad r
        if config.exact_heads is not None:
            targeted = {self._geometries[name].layer_index for name in targets}
            missing = sorted({layer for layer, _ in config.exact_heads} - targeted)
            if missing:
                raise ValueError(
                    f"exact_heads names layers {missing}, which the adapter does not target "
                    f"(targeted: {sorted(targeted)})"
                )
        wrap = self._resolve_modules_to_save(config)
        position_modules = None
        if config.position_offset and self._position_hooks is None:
            position_modules = find_position_modules(self.base_model)
            if not position_modules:
                raise UnsupportedModelError(
                    f"position_offset={config.position_offset} needs a model with rotary or "
                    f"learned position-id embeddings; {type(self.base_model).__name__} has none"
                )

        modules = dict(self._attention)
        for name in targets:
            module = modules[name]
            if STATE_ATTR not in module._modules:
                module.add_module(STATE_ATTR, NTKState(self._geometries[name]))
            state: NTKState = module._modules[STATE_ATTR]
            state.add_adapter(adapter_name, config, _device_of(module))
            state.disabled = self._disabled
            state.active_adapter = self._active_adapter
        for parent, child_name, module in wrap:
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                setattr(parent, child_name, module)
                module.active_adapter = self._active_adapter
                module.disabled = self._disabled
            module.add_adapter(adapter_name)
        if position_modules:
            self._position_hooks = PositionOffsetHooks(position_modules, self._position_offsets)
        self.peft_config[adapter_name] = config
        self._mark_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (the only trainable one)."""
        self._check_usable()
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; known: {sorted(self.peft_config)}")
        self._active_adapter = adapter_name
        for module in self._adapter_modules():
            module.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining one becomes active."""
        self._check_usable()
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; known: {sorted(self.peft_config)}")
        for module in list(self._adapter_modules()):
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self._frozen.discard(adapter_name)
        self._prune()
        if self._active_adapter == adapter_name:
            self._active_adapter = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model is exactly the base model."""
        self._check_usable()
        previous = self._disabled
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(previous)

    def _set_disabled(self, value: bool) -> None:
        self._disabled = value
        for module in self._adapter_modules():
            module.disabled = value

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model as it was before (attention
        implementation, modules, parameters and their requires_grad flags)."""
        self._check_usable()
        self._restore_base()
        self._unloaded = True
        self.peft_config = {}
        return self.base_model

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Not possible: see :meth:`merge_adapter`."""
        raise NotImplementedError(_CANNOT_MERGE)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not possible: an NTK-Attention state is attention over a (virtual) prefix, read by
        every query through the softmax's denominator, not a change of any weight matrix, so
        there is no weight to fold it into (unlike LoRA). ``unload()`` returns the base model
        without the adapter; keep the NTKModel to use the adapter."""
        raise NotImplementedError(_CANNOT_MERGE)

    unmerge_adapter = merge_adapter

    def _restore_base(self) -> None:
        for _, module in self._attention:
            if STATE_ATTR in module._modules:
                delattr(module, STATE_ATTR)
        for parent, child_name, wrapper in self._wrappers():
            setattr(parent, child_name, wrapper.original_module)
        if self._position_hooks is not None:
            self._position_hooks.remove()
            self._position_hooks = None
        for cfg, implementation in self._original_attn:
            cfg._attn_implementation_internal = implementation
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad_before.get(name, param.requires_grad))

    def _check_usable(self) -> None:
        if self._unloaded:
            raise RuntimeError("this NTKModel was unloaded; use the returned base model")

    # ------------------------------------------------------------- parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the keys it is saved with (relative to the base model,
        adapter name left out): ``<layer>.ntk_z``, ``<head>.weight`` for modules_to_save."""
        name = self._resolve_name(adapter_name)
        out: dict[str, torch.Tensor] = {}
        for path, module in self._attention:
            state = module._modules.get(STATE_ATTR)
            if state is not None and name in state.configs:
                for key, tensor in state.adapter_tensors(name).items():
                    out[f"{path}.{key}"] = tensor
        for path, wrapper in self._wrapper_paths():
            if name in wrapper.modules_to_save:
                for key, tensor in wrapper.modules_to_save[name].state_dict().items():
                    out[f"{path}.{key}"] = tensor
        return out

    def _mark_trainable(self) -> None:
        """Only the active adapter trains (unless it was loaded with is_trainable=False)."""

        def trainable(name: str) -> bool:
            return name == self._active_adapter and name not in self._frozen

        for state in self._states():
            for name in state.configs:
                for param in state.adapter_parameters(name).values():
                    param.requires_grad_(trainable(name))
        for _, _, wrapper in self._wrappers():
            for param in wrapper.original_module.parameters():
                param.requires_grad_(False)
            for name, copy in wrapper.modules_to_save.items():
                for param in copy.parameters():
                    param.requires_grad_(trainable(name))

    # ------------------------------------------------------------ save / load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: Sequence[str] | None = None,
        *,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
    ) -> None:
        """Write each adapter to ``save_directory`` ("default") or ``save_directory/<name>``.

        ``is_main_process``, ``state_dict`` and ``safe_serialization`` are what
        ``transformers.Trainer`` passes a PEFT model: only the main process writes; the
        adapter's tensors are always read from the model itself (a full-model ``state_dict``
        is not an adapter) and always written with safetensors."""
        del state_dict, safe_serialization  # see the docstring
        self._check_usable()
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; known: {sorted(self.peft_config)}")
        for name in names:
            # Every process gathers (a model sharded with FSDP2 holds DTensors: gathering them is
            # a collective), then only the main one writes.
            tensors = {key: full_tensor(t) for key, t in self.adapter_state_dict(name).items()}
            record = self._base_record(self.peft_config[name])
            if not is_main_process:
                continue
            directory = Path(save_directory)
            if name != "default":
                directory = directory / name
            write_adapter(directory, self.peft_config[name], tensors, record, _library_version())

    def push_to_hub(self, repo_id: str, **options: Any) -> str:
        """Upload the adapter's files and a model card (base model, config, metrics) to the Hub
        repository ``repo_id``; returns the commit URL. ``options``: ``adapter_name``,
        ``private``, ``token``, ``commit_message``, ``metrics`` (:func:`.hub.push_adapter`).
        The base model is not uploaded: load it back with
        ``NTKModel.from_pretrained(base, repo_id)``."""
        from .hub import push_adapter

        return push_adapter(self, repo_id, **options)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        check_base_weights: bool = True,
        revision: str | None = None,
    ) -> NTKModel:
        """Wrap ``model`` and load the adapter saved in ``model_id``: a local directory, or a
        Hub repository id ("owner/name", at ``revision``) resolved through huggingface_hub
        (from its cache when offline).

        Fails with :class:`AdapterLoadError` when the adapter does not fit the model (other
        architecture, layer count, heads, head dim, base weights), its files are damaged, or
        the repository cannot be read. ``is_trainable=False`` freezes the adapter (inference)."""
        from .hub import resolve_adapter_dir

        model_id = resolve_adapter_dir(model_id, revision)
        config, saved_record = read_adapter_config(model_id)
        check_base_architecture(saved_record, model, model_id)
        ntk = cls(model, config, adapter_name)
        try:
            ntk._load_into(model_id, adapter_name, config, check_base_weights)
        except BaseException:
            ntk.unload()
            raise
        if not is_trainable:
            ntk._freeze_adapter(adapter_name)
        return ntk

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        check_base_weights: bool = True,
    ) -> None:
        """Add the adapter saved in ``model_id`` (a folder or a Hub id, as in
        :meth:`from_pretrained`) under ``adapter_name`` (not activated). Where ``adapter_name``
        exists already (``transformers.Trainer`` resuming from a checkpoint, or loading the best
        one at the end) its tensors are overwritten in place, so an optimizer holding them
        keeps working; its saved config must then equal the adapter's."""
        from .hub import resolve_adapter_dir

        model_id = resolve_adapter_dir(model_id)
        config, saved_record = read_adapter_config(model_id)
        check_base_architecture(saved_record, self.base_model, model_id)
        if adapter_name in self.peft_config:
            if config != self.peft_config[adapter_name]:
                raise AdapterLoadError(
                    f"{model_id}: its config differs from adapter {adapter_name!r}'s, so it cannot "
                    "be loaded into it: load it under another name"
                )
            self._load_into(model_id, adapter_name, config, check_base_weights)
            if is_trainable:
                self._frozen.discard(adapter_name)
                self._mark_trainable()
            else:
                self._freeze_adapter(adapter_name)
            return
        self.add_adapter(adapter_name, config)
        try:
            self._load_into(model_id, adapter_name, config, check_base_weights)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self._freeze_adapter(adapter_name)

    def _load_into(self, directory, adapter_name: str, config: NTKConfig, check_weights: bool) -> None:
        _, saved_record = read_adapter_config(directory)
        check_base_record(saved_record, self._base_record(config), directory, check_weights)
        tensors = read_adapter_tensors(directory, config)
        expected = self.adapter_state_dict(adapter_name)
        check_tensors(directory, tensors, expected)
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))

    def _freeze_adapter(self, adapter_name: str) -> None:
        self._frozen.add(adapter_name)
        self._mark_trainable()

    def _base_record(self, config: NTKConfig) -> dict[str, Any]:
        targets = self._resolve_targets(config)
        base_config = getattr(self.base_model, "config", None)
        return {
            "architecture": type(self.base_model).__name__,
            "model_type": getattr(base_config, "model_type", None),
            "name_or_path": getattr(base_config, "_name_or_path", None) or None,
            "attention_layers": len(self._attention),
            "layers": geometry_record({name: self._geometries[name] for name in targets}),
            "fingerprint": weights_fingerprint(
                base_tensors_for_fingerprint(self.base_model, self._attention)
            ),
        }

    # ---------------------------------------------------------------- helpers
    def _resolve_name(self, adapter_name: str | None) -> str:
        name = self._active_adapter if adapter_name is None else adapter_name
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; known: {sorted(self.peft_config)}")
        return name

    def _resolve_targets(self, config: NTKConfig) -> list[str]:
        names = [name for name, _ in self._attention]
        if config.target_layers is None:
            return names
        count = len(names)
        chosen = []
        for index in config.target_layers:
            if not -count <= index < count:
                raise ValueError(
                    f"target_layers has {index}, but the model has {count} self-attention "
                    f"layers (valid: {-count}..{count - 1})"
                )
            chosen.append(index % count)
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"target_layers {list(config.target_layers)} name a layer twice")
        return [names[i] for i in sorted(chosen)]

    def _resolve_modules_to_save(self, config: NTKConfig) -> list[tuple[nn.Module, str, nn.Module]]:
        out = []
        for key in config.modules_to_save or ():
            matches = []
            for name, module in self.base_model.named_modules():
                if name == key or name.endswith("." + key):
                    if ".modules_to_save." in f".{name}." or name.endswith(".original_module"):
                        continue
                    matches.append((name, module))
            # A wrapper's own children also end with the key's last part; keep outermost ones.
            matches = [
                (n, m) for n, m in matches if not any(n.startswith(o + ".") for o, _ in matches if o != n)
            ]
            if not matches:
                raise ValueError(
                    f"modules_to_save names {key!r}, but {type(self.base_model).__name__} has "
                    "no module of that name"
                )
            for name, module in matches:
                if any(name == a or name.startswith(a + ".") for a, _ in self._attention):
                    raise ValueError(f"modules_to_save cannot name an attention module ({name!r})")
                parent_name, _, child = name.rpartition(".")
                parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
                out.append((parent, child, module))
        return out

    def _states(self) -> Iterator[NTKState]:
        for _, module in self._attention:
            state = module._modules.get(STATE_ATTR)
            if state is not None:
                yield state

    def _wrapper_paths(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _wrappers(self) -> list[tuple[nn.Module, str, ModulesToSaveWrapper]]:
        out = []
        for name, module in list(self._wrapper_paths()):
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            out.append((parent, child, module))
        return out

    def _adapter_modules(self) -> Iterator[NTKState | ModulesToSaveWrapper]:
        yield from self._states()
        for _, _, wrapper in self._wrappers():
            yield wrapper

    def _prune(self) -> None:
        """Drop states and wrappers no adapter uses any more."""
        for _, module in self._attention:
            state = module._modules.get(STATE_ATTR)
            if state is not None and not state.configs:
                delattr(module, STATE_ATTR)
        for parent, child, wrapper in self._wrappers():
            if not len(wrapper.modules_to_save):
                setattr(parent, child, wrapper.original_module)
        if self._position_hooks is not None and not any(
            c.position_offset for c in self.peft_config.values()
        ):
            self._position_hooks.remove()
            self._position_hooks = None

    def _position_offsets(self, batch: int | None, device: torch.device) -> int | torch.Tensor | None:
        """Position offset of each row of the running call (see positions.py)."""
        names = current_adapter_names()
        if names is None:
            if self._disabled or self._active_adapter is None:
                return None
            return self.peft_config[self._active_adapter].position_offset or None
        if batch is not None:
            names = expand_rows(names, batch)
        offsets = [0 if n == BASE_ADAPTER else self.peft_config[n].position_offset for n in names]
        if not any(offsets):
            return None
        return torch.tensor(offsets, device=device)


def get_ntk_model(model: nn.Module, config: NTKConfig, adapter_name: str = "default") -> NTKModel:
    """Freeze ``model``, attach NTK-Attention adapter ``adapter_name`` and make it active."""
    return NTKModel(model, config, adapter_name)


_CANNOT_MERGE = (
    "an NTK-Attention state cannot be merged into the model's weights: it is attention over a "
    "(virtual) prefix, not a weight delta like LoRA's. Keep the NTKModel to use the adapter, "
    "or call unload() to get the base model back without it"
)

# An adapter's name is a parameter-key component and, in save_pretrained, a folder name under
# the save directory: letters, digits, '_', '-' and spaces only, so that it can never be an
# absolute path, climb out ('..') or reach another folder ('/', '\\').
_ADAPTER_NAME = re.compile(r"[\w\- ]{1,128}")


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ADAPTER:
        raise ValueError(
            "adapter names hold 1-128 letters, digits, '_', '-' or spaces (they name a folder in "
            f"save_pretrained) and are not {BASE_ADAPTER!r}; got {name!r}"
        )


def _device_of(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def _library_version() -> str:
    from .._version import __version__

    return __version__

