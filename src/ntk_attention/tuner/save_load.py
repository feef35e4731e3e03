"""Saving and loading one adapter in PEFT's layout:

    <dir>/adapter_config.json        NTKConfig fields + "peft_type", format version, and a record
                                     of the base model (architecture, per-layer geometry, a
                                     fingerprint of its weights)
    <dir>/adapter_model.safetensors  the adapter's tensors, keys relative to the base model with
                                     the adapter name left out (``model.layers.0.self_attn.ntk_z``,
                                     ``score.weight`` for modules_to_save); its metadata holds the
                                     SHA-256 of the config it was saved with

Both files are written atomically (``ntk_attention.atomic_files``: a temporary file in the
same folder, fsynced and moved into place), so a crash never leaves a half-written file under
the real name, and they get the permissions an ordinary write would give. Loading checks
everything before touching the model: the JSON, the config, the base model (layer count, heads,
head dim, weights fingerprint), the safetensors header, keys, shapes, dtypes, finiteness, and
that the two files belong together. Every failure is an :class:`AdapterLoadError` that says what
was expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic_files import atomic_write, atomic_write_json
from .config import PEFT_TYPE, NTKConfig
from .layer import STATE_ATTR, Geometry

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AdapterLoadError",
    "config_digest",
    "read_adapter_config",
    "read_adapter_tensors",
    "weights_fingerprint",
    "write_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
_CONFIG_DIGEST_KEY = "ntk_config_sha256"
_METADATA_KEYS = ("peft_type", "format_version", "library_version", "base_model_name_or_path", "base_model")
_FINGERPRINT_SAMPLES = 64


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be loaded into this model (the message says why)."""


# ------------------------------------------------------------------ writing
# NTKConfig fields added after format 1 -> what a file without them means (sink_tokens: every
# query read the state before the field existed; exact_bits: exact heads were float).
_LEGACY_DEFAULTS = {"sink_tokens": 0, "gated": False, "exact_bits": None}


def config_digest(config: NTKConfig) -> str:
    """SHA-256 of the config's canonical JSON (ties the weights file to its config). Fields
    added since format 1 are left out at the value an older file means by their absence, so
    adapters saved before them still load."""
    fields = config.to_dict()
    for name, legacy in _LEGACY_DEFAULTS.items():
        if fields.get(name) == legacy:
            del fields[name]
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_adapter(
    directory: str | os.PathLike,
    config: NTKConfig,
    tensors: dict[str, torch.Tensor],
    base_record: dict[str, Any],
    library_version: str,
) -> None:
    """Write adapter_model.safetensors, then adapter_config.json, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}
    metadata = {"format": "pt", _CONFIG_DIGEST_KEY: config_digest(config)}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(payload, p, metadata=metadata))
    document = {
        **config.to_dict(),
        "peft_type": PEFT_TYPE,
        "format_version": FORMAT_VERSION,
        "library_version": library_version,
        "base_model_name_or_path": base_record.get("name_or_path"),
        "base_model": base_record,
    }
    atomic_write_json(directory / CONFIG_NAME, document, sort_keys=True)


# ------------------------------------------------------------------ reading
def read_adapter_config(directory: str | os.PathLike) -> tuple[NTKConfig, dict[str, Any]]:
    """(config, base model record) from ``directory/adapter_config.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"no {CONFIG_NAME} in {directory} (is it an adapter directory?)")
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(document, dict):
        raise AdapterLoadError(f"{path} must hold a JSON object, got {type(document).__name__}")
    if "peft_type" not in document:
        raise AdapterLoadError(
            f"{path} has no peft_type, so it is not an adapter's config (an NTK-Attention "
            f"adapter's says peft_type {PEFT_TYPE!r}; save one with NTKModel.save_pretrained)"
        )
    if document.get("peft_type") != PEFT_TYPE:
        hint = (
            ": load it with peft.PeftModel.from_pretrained(base_model, directory)"
            if isinstance(document.get("peft_type"), str) else ""
        )
        raise AdapterLoadError(
            f"{path} is a {document.get('peft_type')!r} adapter, not an NTK-Attention one "
            f"({PEFT_TYPE!r}){hint}"
        )
    if document.get("format_version") != FORMAT_VERSION:
        raise AdapterLoadError(
            f"{path} has format_version {document.get('format_version')!r}; this version of "
            f"ntk-attention reads format_version {FORMAT_VERSION}"
        )
    fields = {key: value for key, value in document.items() if key not in _METADATA_KEYS}
    for name, legacy in _LEGACY_DEFAULTS.items():
        fields.setdefault(name, legacy)
    try:
        config = NTKConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise AdapterLoadError(f"{path} holds an invalid NTKConfig: {err}") from err
    base_record = document.get("base_model")
    if not isinstance(base_record, dict):
        raise AdapterLoadError(f"{path} has no base_model record")
    return config, base_record


def read_adapter_tensors(
    directory: str | os.PathLike, config: NTKConfig
) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/adapter_model.safetensors``, checked to be a complete,
    readable file saved with ``config`` whose floating-point tensors are finite (each tensor's
    dtype is checked against the model's own by :func:`check_tensors`)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterLoadError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterLoadError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {err}"
        ) from err
    digest = metadata.get(_CONFIG_DIGEST_KEY)
    if digest != config_digest(config):
        raise AdapterLoadError(
            f"{path} was not saved with the {CONFIG_NAME} beside it (config digest "
            f"{digest!r} in the weights, {config_digest(config)!r} for the config): the two "
            "files come from different saves"
        )
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterLoadError(f"{path}: tensor {key!r} holds NaN or infinite values")
    return tensors


def check_tensors(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
) -> None:
    """The loaded keys and shapes must be exactly the ones the adapter has in this model, and
    each dtype its kind: a float for a float (any precision: the model may be bf16), the very
    dtype otherwise (e.g. the uint8 codes of quantised kept tokens)."""
    path = Path(directory) / WEIGHTS_NAME
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterLoadError(
            f"{path} does not match the adapter built from its config: missing "
            f"{_preview(missing)}, unexpected {_preview(unexpected)}"
        )
    for key, target in expected.items():
        loaded = tensors[key]
        if tuple(loaded.shape) != tuple(target.shape):
            raise AdapterLoadError(
                f"{path}: tensor {key!r} has shape {tuple(loaded.shape)}, the model "
                f"expects {tuple(target.shape)}"
            )
        both_float = loaded.is_floating_point() and target.is_floating_point()
        if loaded.dtype != target.dtype and not both_float:
            raise AdapterLoadError(
                f"{path}: tensor {key!r} has dtype {loaded.dtype}, the model expects {target.dtype}"
            )


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


# --------------------------------------------------------------- base model
def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor (a model sharded with FSDP2) gathered from every process (a
    collective: all must call it), any other tensor as it is."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over the names, shapes and 64 evenly spaced values (rounded to bfloat16, so a
    base loaded in fp32 or bf16 gives the same print) of each tensor. Cheap for any model size,
    and two different checkpoints of one architecture differ in it."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        flat = full_tensor(tensor.detach()).reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        if flat.numel() == 0:
            continue
        # Integer arithmetic: a float32 linspace rounds its last index up to numel() beyond 2^24.
        steps = torch.arange(_FINGERPRINT_SAMPLES, device=flat.device, dtype=torch.long)
        index = steps * (flat.numel() - 1) // max(_FINGERPRINT_SAMPLES - 1, 1)
        sample = flat[index].to(torch.bfloat16).to(torch.float32).cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def base_tensors_for_fingerprint(
    model: nn.Module, attention: list[tuple[str, nn.Module]]
) -> list[tuple[str, torch.Tensor]]:
    """The base weights the fingerprint covers: the attention layers' own parameters (their
    NTK states excluded) and the input embeddings."""
    out = []
    for name, module in attention:
        for key, param in module.named_parameters():
            if key.split(".", 1)[0] != STATE_ATTR:
                out.append((f"{name}.{key}", param))
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            embeddings = get_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
        if isinstance(embeddings, nn.Module) and isinstance(
            getattr(embeddings, "weight", None), torch.Tensor
        ):
            out.append(("input_embeddings", embeddings.weight))
    return out


def check_base_architecture(saved: dict[str, Any], model: nn.Module, directory: str | os.PathLike) -> None:
    """Raise when the adapter was saved on another model class (e.g. a SmolLM2 adapter given a
    BERT model): checked before the adapter is built, whose own checks (layers, heads) would
    otherwise report the difference in their terms."""
    if saved.get("architecture") != type(model).__name__:
        raise AdapterLoadError(
            f"{Path(directory) / CONFIG_NAME}: the adapter was saved on a "
            f"{saved.get('architecture')!r} ({saved.get('name_or_path') or 'unnamed'}), this base "
            f"model is a {type(model).__name__!r}: load it on the model it was trained on"
        )


def check_base_record(
    saved: dict[str, Any],
    current: dict[str, Any],
    directory: str | os.PathLike,
    check_weights: bool,
) -> None:
    """Compare the base model an adapter was saved on with this one; raise on a mismatch."""
    where = Path(directory) / CONFIG_NAME
    if saved.get("architecture") != current["architecture"]:
        raise AdapterLoadError(
            f"{where}: the adapter was saved on a {saved.get('architecture')!r}, this base model "
            f"is a {current['architecture']!r}"
        )
    if saved.get("attention_layers") != current["attention_layers"]:
        raise AdapterLoadError(
            f"{where}: the adapter's base model has {saved.get('attention_layers')} attention "
            f"layers, this one has {current['attention_layers']}"
        )
    saved_layers = saved.get("layers") or {}
    for name, geometry in current["layers"].items():
        if name not in saved_layers:
            raise AdapterLoadError(f"{where}: the adapter has no record of layer {name!r}")
        for field in ("q_heads", "kv_heads", "head_dim"):
            if saved_layers[name].get(field) != geometry[field]:
                raise AdapterLoadError(
                    f"{where}: layer {name!r} has {field}={saved_layers[name].get(field)} in the "
                    f"adapter's base model but {field}={geometry[field]} in this one"
                )
    if set(saved_layers) != set(current["layers"]):
        extra = sorted(set(saved_layers) - set(current["layers"]))
        raise AdapterLoadError(f"{where}: the adapter targets layers this model lacks: {extra}")
    if check_weights and saved.get("fingerprint") != current["fingerprint"]:
        raise AdapterLoadError(
            f"{where}: the adapter was trained on different base weights (fingerprint "
            f"{str(saved.get('fingerprint'))[:12]}..., this model {current['fingerprint'][:12]}...; "
            f"saved on {saved.get('name_or_path')!r}, this model is "
            f"{current.get('name_or_path')!r}). Pass check_base_weights=False to load it anyway."
        )


def geometry_record(geometries: dict[str, Geometry]) -> dict[str, dict[str, Any]]:
    return {name: geometry.to_dict() for name, geometry in geometries.items()}
