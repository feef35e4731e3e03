"""Checkpoints that resume a training run exactly, written crash-safe.

A checkpoint is a directory built under a temporary name and renamed into place
(``ntk_attention.atomic_files``), so a crash (even SIGKILL) leaves either the old checkpoint
or the new one, never a torn one; ``checkpoints/latest.json`` names the newest complete one
and is replaced only after the directory is in place.

A checkpoint holds no pickles (see SECURITY.md):

    checkpoints/step-00000120/
      model.safetensors        the trainable parameters, by name
      optimizer.safetensors    the optimizer's per-parameter tensors ("state.<i>.<key>")
      rng.safetensors          torch's CPU (and CUDA) generator states
      trainer_state.json       step, data position, optimizer param groups, scheduler,
                               python/numpy RNG states, history, the run's config
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from ..atomic_files import atomic_directory, atomic_write_json

__all__ = [
    "CheckpointError",
    "capture_rng",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

FORMAT_VERSION = 1
LATEST = "latest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, torn, or from another run (the message says
    which file and what does not match)."""


# ---------------------------------------------------------------------------------------------
# RNG states (all generators a training step can draw from)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) holding the torch, CUDA, python and numpy generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, state


def restore_rng(tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state dict as (tensors by "state.<i>.<key>", JSON for the rest)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: Mapping[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``checkpoint_dir`` atomically, point ``latest.json`` at
    it, then delete all but the newest ``keep`` checkpoints. Returns its directory."""
    checkpoint_dir = Path(checkpoint_dir)
    target = checkpoint_dir / f"step-{step:08d}"
    optimizer_tensors, optimizer_meta = _split_optimizer(optimizer)
    rng_tensors, rng_state = capture_rng()
    params = {n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        **trainer_state,
        "optimizer": optimizer_meta,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state,
    }
    with atomic_directory(target) as tmp:
        safetensors.torch.save_file(params, tmp / "model.safetensors")
        safetensors.torch.save_file(optimizer_tensors, tmp / "optimizer.safetensors")
        safetensors.torch.save_file(rng_tensors, tmp / "rng.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
    atomic_write_json(checkpoint_dir / LATEST, {"latest": target.name, "step": step})
    steps = sorted(checkpoint_dir.glob("step-*"))
    for old in steps[: max(0, len(steps) - keep)]:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The directory ``latest.json`` names, or None when there is no checkpoint yet."""
    pointer = Path(checkpoint_dir) / LATEST
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["latest"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{pointer} is not a valid checkpoint pointer: {error}") from None
    path = Path(checkpoint_dir) / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which does not exist")
    return path


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return safetensors.torch.load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {error}") from None


def _check_optimizer_shapes(
    path: Path, tensors: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> None:
    """Per-parameter optimizer tensors (Adam's moments) must have their parameter's shape:
    ``load_state_dict`` does not check, and the first step would fail far from the cause."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, value in tensors.items():
        index = name.split(".", 2)[1]
        if not index.isdigit() or int(index) >= len(params):
            raise CheckpointError(f"{path}: {name} names no parameter of this optimizer")
        shape = params[int(index)].shape
        if value.dim() > 0 and value.shape != shape:  # 0-dim: Adam's step counter
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(value.shape)}, its parameter's is {tuple(shape)}"
            )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Load checkpoint ``path`` into model, optimizer, scheduler and the RNGs; return its
    trainer state (step, data position, history, config)."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / 'trainer_state.json'} cannot be read: {error}") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}"
        )
    params = _load_tensors(path / "model.safetensors")
    expected = _trainable(model)
    if set(params) != set(expected):
        missing = sorted(set(expected) - set(params))[:3]
        extra = sorted(set(params) - set(expected))[:3]
        raise CheckpointError(
            f"{path / 'model.safetensors'} does not match the model's trainable parameters "
            f"(missing e.g. {missing}, unexpected e.g. {extra}): was it written by another run?"
        )
    with torch.no_grad():
        for name, param in expected.items():
            if params[name].shape != param.shape:
                raise CheckpointError(
                    f"{path / 'model.safetensors'}: {name} has shape {tuple(params[name].shape)},"
                    f" the model's is {tuple(param.shape)}"
                )
            if not torch.isfinite(params[name]).all():
                raise CheckpointError(
                    f"{path / 'model.safetensors'}: {name} holds NaN or infinite values"
                )
            param.copy_(params[name])
    optimizer_tensors = _load_tensors(path / "optimizer.safetensors")
    _check_optimizer_shapes(path / "optimizer.safetensors", optimizer_tensors, optimizer)
    optimizer.load_state_dict(_join_optimizer(optimizer_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(_load_tensors(path / "rng.safetensors"), state["rng"])
    return state
