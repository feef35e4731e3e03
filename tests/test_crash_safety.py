"""Crash safety, tested by killing real processes with SIGKILL.

- A `ntk-attention finetune` run killed mid-run resumes (`--resume`) from its last checkpoint to
  the same metrics, loss history and bitwise-identical adapter as an uninterrupted run.
- A process killed at every rename of a save (checkpoint, adapter, and the final adapter of a
  finetune run), after the file being moved in has been torn in half as a lost page cache
  would, leaves the previous files loadable or the new ones, never a torn file that loads and
  never a silent mix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ntk_attention import NTKModel
from ntk_attention.train.checkpoint import latest_checkpoint, load_checkpoint
from ntk_attention.tuner import AdapterLoadError

from support import subprocess_env
from support.testing_models import ARCHITECTURES

LLAMA = ARCHITECTURES["llama"]
# tests/ on PYTHONPATH: the save-killing child below imports support.testing_models
ENV = subprocess_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
FINETUNE = [
    sys.executable, "-m", "ntk_attention.cli", "finetune", "--method", "ntk",
    "--max-train", "32", "--max-eval", "16", "--max-length", "32",
    "--batch-size", "4", "--save-every", "2", "--threads", "1", "--no-progress",
]


def _finetune(command: list[str], output: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*command, "--output", str(output), *extra], env=ENV, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_same_run(a: Path, b: Path) -> None:
    results_a = json.loads((a / "results.json").read_text())
    results_b = json.loads((b / "results.json").read_text())
    assert results_a["metrics"] == results_b["metrics"]
    assert results_a["history"]["train_loss"] == results_b["history"]["train_loss"]
    weights_a = load_file(a / "adapter" / "adapter_model.safetensors")
    weights_b = load_file(b / "adapter" / "adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.mark.parametrize("model", ["tiny", pytest.param("minilm", marks=pytest.mark.slow)])
def test_finetune_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path, request, model):
    """On the tiny classifier (its steps take ms: 40 of them, so that the kill lands mid-run)
    and on bbc-news with MiniLM (12 steps)."""
    if model == "minilm":
        request.getfixturevalue("minilm_dir")  # bbc-news's default model
        task, steps = ["--task", "bbc-news"], 12
    else:
        model_dir, data = request.getfixturevalue("tiny_classifier")
        task = ["--task", "classification", "--data", str(data), "--model", str(model_dir)]
        steps = 40
    command = [*FINETUNE, *task, "--max-steps", str(steps)]
    _finetune(command, tmp_path / "uninterrupted")

    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--output", str(killed)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while not pointer.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "results.json").exists()
    checkpoint = latest_checkpoint(killed / "checkpoints")
    assert checkpoint is not None
    killed_at = int(checkpoint.name.split("-")[1])
    assert 2 <= killed_at < steps

    done = _finetune(command, killed, "--resume")
    assert f"resuming from {checkpoint}" in done.stdout
    assert json.loads((killed / "results.json").read_text())["resumed_from_step"] == killed_at
    _assert_same_run(tmp_path / "uninterrupted", killed)
    assert not (killed / "checkpoints").exists()


# ----------------------------------------------------------------------------- kill during a save

# Runs in a child process: makes the "old" files, then saves the "new" ones with os.replace
# patched so that its `crash_at`-th call tears the file being moved in to half its size and
# SIGKILLs the process before the rename. Exit code 0: the save made fewer renames than that.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from ntk_attention import NTKConfig, get_ntk_model
    from support.testing_models import ARCHITECTURES, randomize_adapter

    kind, root, crash_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    ntk = get_ntk_model(ARCHITECTURES["llama"].build(), NTKConfig(rank=4))
    trainable = {n: p for n, p in ntk.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def take_step(seed):
        randomize_adapter(ntk, seed=seed)
        sum(p.square().sum() for p in trainable.values()).backward()
        optimizer.step(); scheduler.step(); optimizer.zero_grad()

    def snapshot(prefix):
        return {prefix + n: p.detach().clone() for n, p in trainable.items()}

    def save(step):
        if kind == "checkpoint":
            from ntk_attention.train.checkpoint import save_checkpoint
            save_checkpoint(root / "checkpoints", step=step, model=ntk, optimizer=optimizer,
                            scheduler=scheduler, trainer_state={"note": step})
        elif kind == "adapter":
            ntk.save_pretrained(root / "adapter")
        else:  # the end of a finetune run: the adapter directory is replaced as a whole
            from ntk_attention.atomic_files import atomic_directory
            with atomic_directory(root / "adapter") as tmp:
                ntk.save_pretrained(tmp)

    take_step(1); save(1); old = snapshot("old.")
    take_step(2); new = snapshot("new.")
    save_file({**old, **new}, root / "expected.safetensors")

    calls, replace = [0], os.replace
    def crashing_replace(src, dst, *args, **kwargs):
        calls[0] += 1
        if calls[0] == crash_at:
            if os.path.isfile(src):
                os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)
    os.replace = crashing_replace
    save(2)
    """
)


def _crash_outcomes(kind: str, tmp_path: Path, load) -> list[str]:
    """Kill a save at each of its renames in turn; ``load(root)`` returns the loaded trainable
    tensors or raises. Returns, per crash point, "old" or "new"."""
    outcomes = []
    for crash_at in range(1, 10):
        root = tmp_path / f"{kind}-{crash_at}"
        root.mkdir()
        child = subprocess.run([sys.executable, "-c", _CHILD, kind, str(root), str(crash_at)],
                               env=ENV, check=False, capture_output=True, text=True, timeout=300)
        if child.returncode == 0:
            break  # the save made fewer renames than crash_at: every crash point was tried
        assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
        expected = load_file(root / "expected.safetensors")
        loaded = load(root)
        matches = [
            version for version in ("old", "new")
            if all(torch.equal(loaded[name], expected[f"{version}.{name}"]) for name in loaded)
        ]
        assert len(loaded) > 0 and matches, f"crash at rename {crash_at}: a mix was loaded"
        outcomes.append(matches[0])
    else:
        pytest.fail("the save never finished")
    assert outcomes, "the save made no rename"
    return outcomes


def _fresh_ntk():
    from ntk_attention import NTKConfig, get_ntk_model

    return get_ntk_model(LLAMA.build(), NTKConfig(rank=4))


def _trainable(model) -> dict[str, torch.Tensor]:
    """The adapter's parameters (trainable in the child; a loaded adapter comes frozen)."""
    return {n: p.detach() for n, p in model.named_parameters() if ".ntk_" in n}


def test_a_checkpoint_save_killed_at_any_rename_leaves_a_loadable_checkpoint(tmp_path):
    def load(root):
        model = _fresh_ntk()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        checkpoint = latest_checkpoint(root / "checkpoints")
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        assert state["step"] == state["note"] == int(checkpoint.name.split("-")[1])
        return _trainable(model)

    outcomes = _crash_outcomes("checkpoint", tmp_path, load)
    # rename 1 moves step-2/ into place, rename 2 the latest.json pointer to it
    assert outcomes == ["old", "old"]


def test_an_adapter_save_killed_at_any_rename_loads_old_or_new(tmp_path):
    def load(root):
        return _trainable(NTKModel.from_pretrained(LLAMA.build(), root / "adapter"))

    # The weights file is renamed first, the config second; both halves of a save carry the
    # same config here, so a crash between them still pairs the weights with their config.
    assert _crash_outcomes("adapter", tmp_path, load) == ["old", "new"]


def test_a_finetune_adapter_save_killed_at_any_rename_never_loads_torn_files(tmp_path):
    """The finetune run replaces adapter/ as a whole; between its two renames the previous
    directory lies under a `.adapter.old-*` name (and the run's checkpoints, deleted only after
    the adapter is in place, let `--resume` write it again)."""

    def load(root):
        target = root / "adapter"
        if not target.exists():
            (old,) = root.glob(".adapter.old-*")
            target = old
        return _trainable(NTKModel.from_pretrained(LLAMA.build(), target))

    # renames 1-2 write the files into the temporary directory, 3 moves adapter/ aside, 4 the
    # new directory in: a crash at any of them leaves the previous adapter whole
    assert _crash_outcomes("finetune-adapter", tmp_path, load) == ["old"] * 4


def test_a_torn_adapter_file_does_not_load(tmp_path):
    ntk = _fresh_ntk()
    ntk.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        NTKModel.from_pretrained(LLAMA.build(), tmp_path)
