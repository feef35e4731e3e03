"""Arithmetic problems generated here with a seeded RNG (no dependency): addition
and subtraction of numbers 0..99 (subtraction never goes below 0) and multiplication of
0..99 by 0..9, asked as

    prompt "What is 37 + 45?\\nAnswer:"   completion " 82"

The training text is prompt + completion; the metric is exact match of the generated
continuation against the completion, both ``strip()``-ed. Problems are drawn without
repetition from the 16,050 distinct ones, so the splits never share a prompt: 4,000 train,
200 validation, 500 test. Default model: SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import operator

import datasets
import numpy as np

from ... import models
from .base import TaskSpec

__all__ = ["SIZES", "SPEC", "build", "problem", "problems"]

SIZES = {"train": 4000, "validation": 200, "test": 500}
# operator symbol -> (function, range of a, range of b); ranges are inclusive.
_OPERATIONS = {
    "+": (operator.add, (0, 99), (0, 99)),
    "-": (operator.sub, (0, 99), (0, 99)),
    "*": (operator.mul, (0, 99), (0, 9)),
}


def problem(a: int, symbol: str, b: int) -> dict[str, str]:
    """One row: ``{"prompt": "What is a <op> b?\\nAnswer:", "completion": " <result>"}``."""
    function = _OPERATIONS[symbol][0]
    return {"prompt": f"What is {a} {symbol} {b}?\nAnswer:", "completion": f" {function(a, b)}"}


def _all_problems() -> list[tuple[int, str, int]]:
    out = []
    for symbol, (_, (a_lo, a_hi), (b_lo, b_hi)) in _OPERATIONS.items():
        for a in range(a_lo, a_hi + 1):
            for b in range(b_lo, b_hi + 1):
                if symbol != "-" or a >= b:
                    out.append((a, symbol, b))
    return out


def problems(seed: int, sizes: dict[str, int] = SIZES) -> dict[str, list[dict[str, str]]]:
    """Disjoint seeded samples of distinct problems, ``sizes[split]`` rows per split."""
    pool = _all_problems()
    needed = sum(sizes.values())
    if needed > len(pool):
        raise ValueError(f"sizes ask for {needed} distinct problems; only {len(pool)} exist")
    chosen = np.random.default_rng(seed).choice(len(pool), size=needed, replace=False)
    out, start = {}, 0
    for split, size in sizes.items():
        out[split] = [problem(*pool[i]) for i in chosen[start : start + size]]
        start += size
    return out


def build(seed: int) -> datasets.DatasetDict:
    features = datasets.Features(
        {"prompt": datasets.Value("string"), "completion": datasets.Value("string")}
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(rows, features=features)
            for split, rows in problems(seed).items()
        }
    )


SPEC = TaskSpec(
    name="arithmetic",
    kind="generation",
    description="generated arithmetic problems (+, -, * on small integers), exact match",
    source="generated (seeded numpy RNG)",
    build=build,
    default_model=models.smollm2_path,
    metric_names=("exact_match",),
)
