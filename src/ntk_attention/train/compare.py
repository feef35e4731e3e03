"""Several methods on one task: train each with the same settings (``loop.train``), then a
markdown table and a matplotlib plot side by side.

    output/
      <method>/            one run per method (results.json, adapter/)
      comparison.md        the table, with the settings and the command
      comparison.json      the rows of the table and each run's results file
      comparison.png       training loss per step, and the test metric per method
"""

from __future__ import annotations

import dataclasses
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..atomic_files import atomic_write_bytes, atomic_write_json
from ..provenance import environment
from .config import RunError, TrainConfig
from .loop import train
from .methods import METHODS
from .prepare import load_task_data
from .run_folder import RESULTS, RUN_RECORDS, check_no_other_kind, check_output

__all__ = ["compare", "format_table", "plot_comparison", "table_rows"]

# Metric names as table headers.
_HEADERS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "perplexity": "perplexity",
    "exact_match": "exact match",
}


def table_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: parameters, test metrics, step time, memory, wall time."""
    rows = []
    for method, results in runs.items():
        test = results["metrics"]["test"]
        names = [m for m in _HEADERS if m in test]
        rows.append({
            "method": method,
            "trainable_parameters": results["trainable_parameters"],
            **{name: test[name] for name in names},
            "step_time_s": results["step_time_s"]["median"],
            "peak_rss_mib": results["peak_memory_mib"]["rss_mib"],
            "wall_time_s": results["wall_time_s"],
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (metrics on the test split)."""
    metric_names = [m for m in _HEADERS if any(m in row for row in rows)]
    header = (["method", "trainable params"] + [f"test {_HEADERS[m]}" for m in metric_names]
              + ["step time (s)", "peak RSS (MiB)", "wall time (s)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], f"{row['trainable_parameters']:,}"]
        for name in metric_names:
            value = row.get(name)
            cells.append("–" if value is None else f"{value:.3f}")
        step = row["step_time_s"]
        cells += ["–" if step is None else f"{step:.2f}", f"{row['peak_rss_mib']:.0f}",
                  f"{row['wall_time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_comparison(runs: dict[str, dict[str, Any]], title: str) -> bytes:
    """PNG bytes: (left) training loss per step, moving average over 10 steps; (right) the
    task's headline metric on the test split per method, labelled with trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, results in runs.items():
        losses = results["history"]["train_loss"]
        left.plot(range(1, len(losses) + 1), _moving_average(losses, 10), label=method)
    left.set_xlabel("step")
    left.set_ylabel("training loss (moving average, 10 steps)")
    left.legend()
    left.grid(alpha=0.3)

    primary = next(iter(runs.values()))["primary_metric"]
    methods = list(runs)
    values = [runs[m]["metrics"]["test"][primary] for m in methods]
    bars = right.bar(methods, values, color=[f"C{i}" for i in range(len(methods))])
    for bar, method in zip(bars, methods, strict=False):
        right.annotate(
            f"{runs[method]['trainable_parameters']:,} params",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center", va="bottom", fontsize=8,
        )
    right.set_ylabel(f"test {_HEADERS[primary]}")
    right.grid(alpha=0.3, axis="y")
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def compare(
    base: TrainConfig,
    methods: Sequence[str],
    *,
    output: str | Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
) -> dict[str, Any] | None:
    """Train ``base`` with each of ``methods`` (each in ``output/<method>``; the learning rate
    is each method's default unless ``base.lr`` is set) and write the comparison files.
    Returns {"rows", "table", "runs", "files"}."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise RunError(
            f"--methods must be distinct names from {sorted(METHODS)}, got {list(methods)}"
        )
    output = Path(output)
    configs = {
        method: dataclasses.replace(base, method=method, output=str(output / method))
        for method in methods
    }
    # Every argument and output folder is checked before the first run starts.
    check_no_other_kind(output, "compare", RunError)
    for config in configs.values():
        if not (resume and (Path(config.output) / RESULTS).is_file()):
            check_output(Path(config.output), config, resume)
    task = load_task_data(base)  # loaded once, shared by the runs

    runs: dict[str, dict[str, Any]] = {}
    for method, config in configs.items():
        log(f"\n== {method}: {METHODS[method].description}")
        results = train(config, resume=resume, task=task, progress=progress, log=log,
                        stop_after_steps=stop_after_steps)
        if results is None:
            return None
        runs[method] = results

    rows = table_rows(runs)
    table = format_table(rows)
    first = next(iter(runs.values()))
    title = f"{first['task']}: {', '.join(methods)} ({first['steps']} steps each)"
    settings = ", ".join(
        f"{k}={v}" for k, v in base.to_dict().items() if k not in ("method", "output")
    )
    markdown = (
        f"# {title}\n\n{table}\n\nTest split metrics; step time is the median over steps; "
        f"peak RSS is sampled during each run.\n\nSettings: {settings}\n\n"
        f"Command: `{' '.join(sys.argv)}`\n"
    )
    atomic_write_bytes(output / "comparison.png", plot_comparison(runs, title))
    atomic_write_bytes(output / "comparison.md", markdown.encode())
    atomic_write_json(output / RUN_RECORDS["compare"], {
        "rows": rows,
        "results": {m: str(Path(c.output) / RESULTS) for m, c in configs.items()},
        "config": base.to_dict(),
        **environment(),
        "command": sys.argv,
    })
    files = {name: output / name for name in ("comparison.md", "comparison.png", RUN_RECORDS["compare"])}
    return {"rows": rows, "table": table, "runs": runs, "files": files}


# ------------------------------------------------------------------------------------- demo

# The embedded default demo (`ntk-attention demo`, `make demo`): MiniLM on BBC News,
# NTK-Attention vs LoRA vs prefix tuning at about the same number of trainable parameters
# (~76k each: an elu state per head, LoRA r=8 on query/value, a 16-token prefix), reduced to
# fit a few minutes on 2 CPU cores.
DEMO_METHODS = ("ntk", "lora", "prefix")
DEMO_SETTINGS = {
    "task": "bbc-news",
    "max_train": 480,
    "max_eval": 120,
    "max_length": 64,
    "batch_size": 16,
    "epochs": 2,
    "save_every": 0,
}
DEMO_MARKER = ".ntk-attention-demo"


def demo_config(**overrides: Any) -> TrainConfig:
    """The demo's shared settings (``method`` is set per run), with ``overrides`` applied."""
    settings = {**DEMO_SETTINGS, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(method=DEMO_METHODS[0], **settings)


def demo_note(config: TrainConfig) -> str:
    """What the demo's reduced setting is, in words."""
    steps = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs} epochs"
    return (
        f"Reduced setting for a few minutes on 2 CPU cores: the first {config.max_train} of "
        f"1,779 training articles, {config.max_eval} validation and {config.max_eval} test "
        f"articles, the first {config.max_length} tokens of each, batch {config.batch_size}, "
        f"{steps}. The full task: `ntk-attention compare --task bbc-news`."
    )


def prepare_demo_output(output: str | Path) -> Path:
    """The demo writes a fresh run every time: an empty or missing ``output``, or the
    folder of an earlier demo (it carries a marker file) which is removed. Anything else is
    refused, so the demo never deletes files it did not make."""
    import shutil

    output = Path(output)
    if output.exists():
        if not output.is_dir():
            raise RunError(f"--output {output} exists and is not a directory")
        if any(output.iterdir()):
            if not (output / DEMO_MARKER).is_file():
                raise RunError(
                    f"--output {output} is not empty and was not made by the demo; choose "
                    "another --output"
                )
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / DEMO_MARKER).write_text("made by `ntk-attention demo`; replaced by the next demo\n")
    return output
