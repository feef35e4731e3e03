"""ntk_attention.atomic_files: what a save leaves on disk. Files and folders get the
permissions an ordinary write would give (0o666 / 0o777 less the umask, not mkstemp's private
0600 / 0700), and a write that raises leaves neither a file nor a temporary behind (killed
writes: tests/test_crash_safety.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ntk_attention import NTKConfig, get_ntk_model
from ntk_attention.atomic_files import (
    atomic_directory,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
)
from ntk_attention.tuner import save_load

from support.testing_models import ARCHITECTURES

LLAMA = ARCHITECTURES["llama"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    pass


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_saved_adapter_files_get_the_umask_permissions(tmp_path, umask):
    ntk = get_ntk_model(LLAMA.build(), NTKConfig(rank=4))
    ntk.save_pretrained(tmp_path / "adapter")
    files = _names(tmp_path / "adapter")
    assert files == [save_load.CONFIG_NAME, save_load.WEIGHTS_NAME]  # no temporaries left
    for name in files:
        assert _mode(tmp_path / "adapter" / name) == 0o666 & ~umask, name  # 0644 under 022
    json.loads((tmp_path / "adapter" / save_load.CONFIG_NAME).read_text())


def test_every_write_gets_the_umask_permissions(tmp_path, umask):
    atomic_write(tmp_path / "callback.txt", lambda temp: Path(temp).write_text("a\n"))
    atomic_write_bytes(tmp_path / "bytes.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "doc.json", {"b": 1, "a": [2]}, sort_keys=True)
    with atomic_directory(tmp_path / "folder") as folder:
        (folder / "inside.txt").write_text("x")
    for name in ("callback.txt", "bytes.bin", "doc.json"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert _mode(tmp_path / "folder") == 0o777 & ~umask
    assert _names(tmp_path) == ["bytes.bin", "callback.txt", "doc.json", "folder"]
    assert (tmp_path / "doc.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert (tmp_path / "folder" / "inside.txt").read_text() == "x"


class _Interrupted(Exception):
    pass


def _half_write_then_raise(temp: str) -> None:
    Path(temp).write_bytes(b"half a file")
    raise _Interrupted


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_write_leaves_no_file_and_no_temporary(tmp_path, existing):
    target = tmp_path / "result.json"
    if existing:
        target.write_text("old\n")
    with pytest.raises(_Interrupted):
        atomic_write(target, _half_write_then_raise)
    with pytest.raises(TypeError):  # not JSON-serializable: fails before anything is written
        atomic_write_json(target, {"tensor": object()})
    if existing:
        assert _names(tmp_path) == ["result.json"] and target.read_text() == "old\n"
    else:
        assert _names(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_directory_leaves_no_folder_and_no_temporary(tmp_path, existing):
    target = tmp_path / "adapter"
    if existing:
        target.mkdir()
        (target / "old.txt").write_text("old")
    with pytest.raises(_Interrupted), atomic_directory(target) as folder:
        (folder / "new.txt").write_text("new")
        raise _Interrupted
    if existing:
        assert _names(tmp_path) == ["adapter"] and _names(target) == ["old.txt"]
    else:
        assert _names(tmp_path) == []


def test_an_adapter_save_interrupted_in_the_weights_leaves_nothing(tmp_path, monkeypatch):
    def failing_save_file(tensors, path, metadata=None):
        _half_write_then_raise(path)

    monkeypatch.setattr(save_load, "save_file", failing_save_file)
    ntk = get_ntk_model(LLAMA.build(), NTKConfig(rank=4))
    with pytest.raises(_Interrupted):
        ntk.save_pretrained(tmp_path / "adapter")
    assert _names(tmp_path / "adapter") == []
