"""Evaluation metrics, written out in plain Python so their definitions are visible:
accuracy, macro-F1, perplexity and exact match. Names match ``train.tasks.METRIC_NAMES``."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["accuracy", "exact_match", "macro_f1", "perplexity"]


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} vs {len(references)}"
        )
    if not references:
        raise ValueError("a metric needs at least one example, got none")


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Share of examples whose predicted class is the reference class."""
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def macro_f1(predictions: Sequence[int], references: Sequence[int], num_classes: int) -> float:
    """Unweighted mean over all ``num_classes`` classes of F1 = 2 TP / (2 TP + FP + FN).

    A class with no reference and no prediction (2 TP + FP + FN = 0) counts as F1 = 0, as in
    scikit-learn's ``zero_division=0``, so a small evaluation set cannot inflate the score.
    """
    _check_lengths(predictions, references)
    scores = []
    for cls in range(num_classes):
        tp = sum(p == cls and r == cls for p, r in zip(predictions, references, strict=True))
        fp = sum(p == cls and r != cls for p, r in zip(predictions, references, strict=True))
        fn = sum(p != cls and r == cls for p, r in zip(predictions, references, strict=True))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return sum(scores) / num_classes


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token), over the whole evaluation set
    (token-weighted, not a mean of per-batch perplexities)."""
    if total_tokens <= 0:
        raise ValueError(f"perplexity needs at least one predicted token, got {total_tokens}")
    return math.exp(total_nll / total_tokens)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of generated completions equal to the reference after stripping whitespace."""
    _check_lengths(predictions, references)
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)
