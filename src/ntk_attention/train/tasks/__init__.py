"""Built-in offline tasks and user data for fine-tuning.

    TASKS                       name -> TaskSpec: bbc-news, drug-review, fashion-mnist,
                                wiki-lm, arithmetic (one module each, see their docstrings)
    load_task(name, seed=0, max_train=None, max_eval=None) -> Task
    load_user_data(path, kind, label_names=None) -> datasets.Dataset
    user_task(path, kind, seed=0, ...) -> Task

Metric names (``METRIC_NAMES``) are computed by ``ntk_attention.train.metrics``.

A ``Task`` holds its ``TaskSpec`` and a ``datasets.DatasetDict`` with disjoint ``train`` /
``validation`` / ``test`` splits fixed by the seed; columns depend on the kind (``base.py``).
"""

from __future__ import annotations

from . import arithmetic, bbc_news, drug_review, fashion_mnist, wiki_lm
from .base import (
    COLUMNS,
    KINDS,
    METRIC_NAMES,
    SPLITS,
    DataError,
    DataUnavailableError,
    Task,
    TaskSpec,
    check_limit,
    limit_rows,
)
from .user_data import load_user_data, user_task

__all__ = [
    "COLUMNS",
    "KINDS",
    "METRIC_NAMES",
    "SPLITS",
    "TASKS",
    "DataError",
    "DataUnavailableError",
    "Task",
    "TaskSpec",
    "load_task",
    "load_user_data",
    "user_task",
]

TASKS: dict[str, TaskSpec] = {
    module.SPEC.name: module.SPEC
    for module in (bbc_news, drug_review, fashion_mnist, wiki_lm, arithmetic)
}


def load_task(
    name: str, *, seed: int = 0, max_train: int | None = None, max_eval: int | None = None
) -> Task:
    """Build a built-in task's splits for ``seed`` and keep the first ``max_train`` train rows
    and ``max_eval`` rows of validation and test (None: all)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    check_limit("max_train", max_train)
    check_limit("max_eval", max_eval)
    spec = TASKS[name]
    return Task(
        spec=spec,
        data=limit_rows(spec.build(seed), max_train=max_train, max_eval=max_eval),
        seed=seed,
    )
