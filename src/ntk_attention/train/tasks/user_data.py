"""Bring-your-own data: a CSV or JSONL file with the columns of a task kind

    classification   text, label
    generation       prompt, completion
    causal-lm        text

read into a ``datasets.Dataset`` (other columns are dropped), and ``user_task`` to split it
into a seeded ``Task``. The whole file is parsed and checked in memory before any Dataset is
built, and nothing is written to disk (no datasets cache), so a bad file leaves nothing
behind. Every problem raises ``DataError`` naming the file, the line where there is one, what
was expected and what was found: a missing or empty file, a header without rows, missing
columns (listing the columns found), a malformed JSONL line or CSV row, a null or non-text
value, labels outside a given label set.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import datasets

from ... import models
from .base import DataError, Task, TaskSpec, limit_rows, split_indices

__all__ = ["DEFAULT_MODELS", "FORMATS", "USER_COLUMNS", "load_user_data", "user_task"]

USER_COLUMNS: dict[str, tuple[str, ...]] = {
    "classification": ("text", "label"),
    "generation": ("prompt", "completion"),
    "causal-lm": ("text",),
}
# The offline model a user data file of each kind trains by default (models.MODEL_PATHS).
DEFAULT_MODELS = {"classification": "minilm", "generation": "smollm2-135m", "causal-lm": "smollm2-135m"}
_USER_METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "generation": ("exact_match",),
    "causal-lm": ("perplexity",),
}
_Rows = list[tuple[int, dict]]  # (1-based line number where the record starts, record)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}: line {line}: expected UTF-8 text, found byte {data[err.start]:#04x}"
        ) from None


def _read_jsonl(path: Path, text: str) -> tuple[_Rows, list[str]]:
    rows: _Rows = []
    seen: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: line {number}: malformed JSON ({err.msg} at column {err.colno})"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: line {number}: expected a JSON object, got {type(record).__name__}"
            )
        rows.append((number, record))
        seen.update(dict.fromkeys(record))
    return rows, list(seen)


def _read_csv(path: Path, text: str) -> tuple[_Rows, list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: _Rows = []
    start = 1
    for fields in reader:
        line, start = start, reader.line_num + 1
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if header is None:
            header = [f.strip() for f in fields]
            continue
        if len(fields) != len(header):
            raise DataError(
                f"{path}: line {line}: malformed CSV row: expected {len(header)} fields "
                f"({', '.join(header)}), got {len(fields)}"
            )
        rows.append((line, dict(zip(header, fields, strict=False))))
    return rows, header or []


FORMATS = {".csv": _read_csv, ".jsonl": _read_jsonl}


def _label_sort_key(label: str):
    try:
        return (0, int(label), "")
    except ValueError:
        return (1, 0, label)


def load_user_data(
    path: str | os.PathLike, kind: str, *, label_names: list[str] | tuple[str, ...] | None = None
) -> datasets.Dataset:
    """Read and check a user data file; see the module docstring for columns and errors.

    For classification the ``label`` column becomes a ``ClassLabel`` over ``label_names``
    when given (a label outside it is an error), else over the labels found (sorted, numerically
    when they are all integers). Labels are compared as strings (JSON ``1`` equals CSV ``"1"``).
    """
    if kind not in USER_COLUMNS:
        raise ValueError(f"kind must be one of {sorted(USER_COLUMNS)} for user data, got {kind!r}")
    path = Path(path)
    reader = FORMATS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: expected a {' or '.join(FORMATS)} file, got suffix {path.suffix!r}"
        )
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = _decode(path)
    if not text.strip():
        raise DataError(
            f"{path}: file is empty; expected rows with columns {', '.join(USER_COLUMNS[kind])}"
        )
    rows, found = reader(path, text)
    required = USER_COLUMNS[kind]
    missing = [c for c in required if c not in found]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}: {kind} data needs "
            f"{', '.join(required)}; found columns: {', '.join(found) or '(none)'}"
        )
    if not rows:
        raise DataError(f"{path}: has a header but no rows; expected at least one {kind} example")
    columns: dict[str, list[str]] = {c: [] for c in required}
    for line, record in rows:
        for column in required:
            value = record.get(column)
            if value is None:
                raise DataError(f"{path}: line {line}: column {column!r} is missing or null")
            if column == "label" and isinstance(value, (int, str)) and not isinstance(value, bool):
                value = str(value).strip()
            if not isinstance(value, str):
                raise DataError(
                    f"{path}: line {line}: column {column!r} must be text, got {type(value).__name__}"
                )
            columns[column].append(value)
    features = {c: datasets.Value("string") for c in required}
    if kind == "classification":
        labels = columns["label"]
        if label_names is None:
            names = sorted(set(labels), key=_label_sort_key)
        else:
            names = [str(n) for n in label_names]
            first_line = {}
            for (line, _), label in zip(rows, labels, strict=False):
                if label not in names:
                    first_line.setdefault(label, line)
            if first_line:
                listed = ", ".join(
                    f"{label!r} (line {line})" for label, line in list(first_line.items())[:5]
                )
                raise DataError(
                    f"{path}: {len(first_line)} unknown label(s): {listed}; expected one of {names}"
                )
        index = {name: i for i, name in enumerate(names)}
        columns["label"] = [index[label] for label in labels]
        features["label"] = datasets.ClassLabel(names=names)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def user_task(
    path: str | os.PathLike,
    kind: str,
    *,
    seed: int = 0,
    label_names: list[str] | tuple[str, ...] | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> Task:
    """A ``Task`` over a user data file: seeded random train / validation / test splits with
    ``max(1, round(fraction * n))`` rows in each evaluation split (at least 3 rows needed).
    Its default model is the kind's offline model (DEFAULT_MODELS); any other is passed as
    a directory."""
    data = load_user_data(path, kind, label_names=label_names)
    n = len(data)
    if n < 3:
        raise DataError(
            f"{path}: expected at least 3 rows for train / validation / test splits, got {n}"
        )
    counts = {
        name: max(1, round(f * n))
        for name, f in (("validation", validation_fraction), ("test", test_fraction))
    }
    if sum(counts.values()) >= n:
        raise DataError(
            f"{path}: {n} rows leave no training rows after evaluation splits of {counts}"
        )
    parts = split_indices(n, {name: count / n for name, count in counts.items()}, seed=seed)
    splits = datasets.DatasetDict(
        {s: data.select(parts[s]) for s in ("train", "validation", "test")}
    )
    label_feature = data.features.get("label")
    spec = TaskSpec(
        name=f"user:{Path(path).name}",
        kind=kind,
        description=f"user data from {path}",
        source=str(path),
        build=lambda _seed: splits,
        default_model=models.MODEL_PATHS[DEFAULT_MODELS[kind]],
        label_names=tuple(label_feature.names) if label_feature is not None else (),
        metric_names=_USER_METRICS[kind],
    )
    return Task(
        spec=spec, data=limit_rows(splits, max_train=max_train, max_eval=max_eval), seed=seed
    )
