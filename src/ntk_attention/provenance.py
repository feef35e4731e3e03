"""Where a result came from: the command, git commit, package versions and machine, as one record
that every results file of the project carries (fine-tuning runs, compressed prompts,
benchmarks, experiments), and the one-line summary their markdown files open with.

    {"command": "...", "date": "2026-12-06T10:00:00+00:00",
     "git": {"commit": "abc...", "dirty": false},
     "versions": {"python": ..., "ntk-attention": ..., "torch": ..., ...},
     "hardware": {"machine": "x86_64", "system": "Linux", "cpu": "...", "cpu_count": 2,
                  "torch_threads": 1, "cuda": null, "load_average": [0.8, 0.9, 1.0]}}

The commit is the checkout this package is imported from (an editable install or a source
tree); outside a git checkout it is ``NTK_GIT_COMMIT`` from the environment, or None.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "environment", "git_state", "summary_line"]

# Versions recorded in every record (distribution names).
PACKAGES = ("ntk-attention", "torch", "transformers", "peft", "datasets", "safetensors", "numba")

_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def git_state() -> dict[str, Any]:
    """{"commit": HEAD or None, "dirty": whether tracked files differ from it, or None}."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(_SOURCE_ROOT), *args], capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("NTK_GIT_COMMIT"), "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import torch

    versions["torch"] = torch.__version__  # the build actually imported (e.g. 2.13.0+cpu)
    return versions


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _hardware() -> dict[str, Any]:
    import torch

    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def environment(command: str | None = None) -> dict[str, Any]:
    """The provenance record above. ``command``: how the result was made (default: this
    process's command line, as ``python script args`` or ``ntk-attention args``)."""
    if command is None:
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        if program.endswith(".py"):
            command = shlex.join(["python", *sys.argv])
        else:
            command = shlex.join([program, *sys.argv[1:]])
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "versions": _versions(),
        "hardware": _hardware(),
    }


def summary_line(record: dict[str, Any]) -> str:
    """One markdown line for the top of a results file: the command, commit, versions and
    machine of a record made by :func:`environment`."""
    git, versions, hardware = record["git"], record["versions"], record["hardware"]
    commit = (git["commit"] or "unknown commit")[:12] + (" (dirty)" if git["dirty"] else "")
    packages = ", ".join(
        f"{name} {versions[name]}" for name in ("torch", "transformers", "peft")
        if versions.get(name)
    )
    device = hardware["cuda"] or (
        f"{hardware['cpu']} ({hardware['cpu_count']} cores, "
        f"{hardware['torch_threads']} torch threads)"
    )
    return f"`{record['command']}` at {commit}; {packages}; {device}."
