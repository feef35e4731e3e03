"""Crash-safe files for training runs: atomic writes, and checkpoints that resume a run exactly.

Every write goes to a temporary name in the target's directory and is moved into place with
``os.replace`` after an fsync, so a crash (even SIGKILL) leaves either the old file or the new
one, never a torn one. A checkpoint is a directory written the same way (built under a
temporary name, then renamed), and ``checkpoints/latest.json`` names the newest complete one;
the pointer is replaced only after the directory is in place.

A checkpoint holds no pickles (see SECURITY.md):

    checkpoints/step-00000120/
      model.safetensors        the trainable parameters, by name
      optimizer.safetensors    the optimizer's per-parameter tensors ("state.<i>.<key>")
      rng.safetensors          torch's CPU (and CUDA) generator states
      trainer_state.json       step, data position, optimizer param groups, scheduler,
                               python/numpy RNG states, history, the run's config
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

__all__ = [
    "CheckpointError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
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
# Atomic writes


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary files and folders are created private (0600 / 0700); what is moved into place gets
# the permissions an ordinary open() / mkdir() would have given it.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on a clean exit it replaces ``target``.

    On an exception the temporary directory is removed and ``target`` is left as it was.
    Replacing an existing ``target`` takes two renames (old away, new in); a crash between
    them leaves the old one under a ``.old-`` name and no ``target``, never a mix of both.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_path(file)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
