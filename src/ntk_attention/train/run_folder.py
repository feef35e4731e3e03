"""A run's output folder: its layout, whether it already holds a run, and the checks that
refuse to mix two runs in one folder (resuming needs the same settings).

    results.json        metrics, trainable parameters, step time, peak memory, wall time,
                        versions, git commit, hardware, command and the full config
    adapter/            ``save_pretrained`` of the trained model (PEFT format for adapters)
    checkpoints/        step-XXXXXXXX/ directories and latest.json (see checkpoint.py)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import latest_checkpoint
from .config import _RESUME_MAY_CHANGE, RunError, TrainConfig, _resolved_ntk_init

__all__ = [
    "ADAPTER", "CHECKPOINTS", "RESULTS", "RUN_RECORDS", "check_no_other_kind", "check_output",
    "holds_run",
]

RESULTS = "results.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
# The record each kind of run writes in its output folder: a folder holding another kind's
# record is refused (fine-tuning into a compressed prompt's folder would mix two runs).
RUN_RECORDS = {
    "finetune": RESULTS,
    "compare": "comparison.json",
    "compress-prompt": "compression.json",
    "convert-prefix": "conversion.json",
}


def check_no_other_kind(output: str | os.PathLike, kind: str, error: type[Exception]) -> None:
    """Raise ``error`` when ``output`` holds another kind of run than ``kind`` (a key of
    RUN_RECORDS): that kind's record, or a fine-tuning run's checkpoints or adapter folder
    for the commands that do not write those."""
    output = Path(output)
    markers = [record for name, record in RUN_RECORDS.items() if name != kind]
    if kind not in ("finetune", "compare"):
        markers += [CHECKPOINTS, ADAPTER]
    found = next((name for name in markers if (output / name).exists()), None)
    if found is not None:
        raise error(
            f"{output} holds another kind of run ({found}): give {kind} its own --output folder"
        )


def holds_run(output: str | os.PathLike) -> bool:
    """Whether ``output`` holds a run to continue or read back (results or a checkpoint)."""
    output = Path(output)
    checkpoints = output / CHECKPOINTS
    return (output / RESULTS).is_file() or (
        checkpoints.is_dir() and latest_checkpoint(checkpoints) is not None
    )


def check_output(output: Path, config: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh); refuses to mix two runs."""
    check_no_other_kind(output, "finetune", RunError)
    has_results = (output / RESULTS).is_file()
    checkpoint = latest_checkpoint(output / CHECKPOINTS) if (output / CHECKPOINTS).exists() else None
    if not resume:
        if has_results or checkpoint is not None:
            raise RunError(
                f"--output {output} already holds a run ({RESULTS} or {CHECKPOINTS}/): pass "
                "--resume to continue it, or choose another --output"
            )
        return None
    if checkpoint is None:
        return None
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("config", {})
    changes = _changed_settings(saved, config)
    if changes:
        raise RunError(
            f"--resume: the checkpoint in {output} was made with other settings ({changes}); "
            "resume with the same arguments or choose another --output"
        )
    return checkpoint


def _finished_results(output: Path, config: TrainConfig) -> dict | None:
    """The results of a finished run with this config in ``output`` (resume is then a no-op)."""
    try:
        results = json.loads((output / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    changes = _changed_settings(results.get("config", {}), config)
    if changes:
        raise RunError(
            f"--resume: {output / RESULTS} is a finished run with other settings ({changes}); "
            "choose another --output"
        )
    return results


def _changed_settings(saved: dict[str, Any], config: TrainConfig) -> str:
    """The settings in which a saved run's config differs from ``config``, as "key: saved ->
    current" (empty: the same run). A setting the saved run lacks (added by a later version)
    counts as its default, so older runs still resume and read back."""
    current = config.to_dict()
    saved = {**TrainConfig.defaults(), **saved}
    # ntk_init None means the kind's default: two runs differ only if what it means differs.
    from . import tasks

    builtin = tasks.TASKS.get(config.task)
    kind = builtin.kind if builtin is not None else config.task
    if config.method == "ntk":
        saved["ntk_init"] = _resolved_ntk_init(saved, kind)
        current["ntk_init"] = _resolved_ntk_init(current, kind)
    differ = sorted(
        key for key in set(saved) | set(current)
        if key not in _RESUME_MAY_CHANGE and saved.get(key) != current.get(key)
    )
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
