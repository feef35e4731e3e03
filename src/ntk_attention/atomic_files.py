"""Files and folders that appear whole or not at all: the one place this package writes a file
that must survive a crash (adapters, checkpoints, run records, compressed prompts).

Each write goes to a temporary name in the target's own folder, is fsynced, given the
permissions an ordinary ``open()`` / ``mkdir()`` would have given it (``0o666`` / ``0o777``
less the umask; the temporary is created private), moved into place with ``os.replace`` and
followed by an fsync of the folder, so that the rename itself is durable. A crash (even
SIGKILL) leaves the previous file or the new one under the real name, never a torn one; a
write that raises leaves nothing behind, not even its temporary.

- :func:`atomic_write` (``write(temp_path)`` callback, for writers that want a path, such as
  safetensors' ``save_file``), :func:`atomic_write_bytes`, :func:`atomic_write_json`: one file;
- :func:`atomic_directory`: a folder built under a temporary name, then renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "atomic_write", "atomic_write_bytes", "atomic_write_json"]


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` can
    only be read by setting it, which other threads would briefly see)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split(":", 1)[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(temp_path)`` (which creates or overwrites the file at
    ``temp_path``) and move the result into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` written to ``path`` atomically."""
    atomic_write(path, lambda temp: Path(temp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """``obj`` as JSON (``json.dumps(obj, indent=2, **dumps)`` and a newline), written
    atomically."""
    dumps.setdefault("indent", 2)
    atomic_write_bytes(path, (json.dumps(obj, **dumps) + "\n").encode())


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
    try:
        os.chmod(tmp, 0o777 & ~_umask())
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
