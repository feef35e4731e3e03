"""Arithmetic problems from DeepMind's ``mathematics-dataset`` (PyPI ``mathematics-dataset``),
drawn from four of its ``mathematics_dataset.modules.arithmetic`` generators at the lowest
entropy of their training range (the easiest problems the package makes):

    add_or_sub        "What is -41 minus -0.3?"                 -40.7
    add_sub_multiple  "Calculate 6 + (4 - (6 - -2))."           2
    mul               "Product of 0.03 and -0.9."               -0.027
    div               "Divide 37 by 5."                         37/5

Each row is

    prompt "Question: Divide 37 by 5.\\nAnswer:"   completion " 37/5"

The training text is prompt + completion; the metric is exact match of the generated
continuation against the completion, both ``strip()``-ed. The generators are called in turn;
like ``mathematics_dataset.generate``, a problem whose question or answer is longer than the
package's limits is dropped, and so is one whose answer is longer than ``MAX_ANSWER_CHARS``
(so that answer + end-of-sequence fits the 16 new tokens of ``TrainConfig.max_new_tokens``).
A prompt already drawn is drawn again, so the splits never share a prompt: 4,000 train,
200 validation, 500 test, filled in that order. Building them takes about 3 s.

Seeding: the package draws from Python's global ``random`` and NumPy's global RNG, so
``problems`` seeds both with the seed and restores their previous states afterwards (not
thread-safe: another thread drawing from them meanwhile changes the rows).

sympy shim: mathematics-dataset 1.0.1 does ``from sympy.solvers.diophantine import
base_solution_linear``; current sympy keeps that function in the submodule
``sympy.solvers.diophantine.diophantine`` and no longer re-exports it from the package, so
the import fails. ``_import_generators`` puts the name back on the package before importing
mathematics-dataset (nothing else of sympy is touched). Default model: SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import random
from collections.abc import Callable, Iterator

import datasets
import numpy as np

from ... import models
from .base import DataUnavailableError, TaskSpec

__all__ = [
    "GENERATORS",
    "MAX_ANSWER_CHARS",
    "PIP_REQUIREMENT",
    "SIZES",
    "SPEC",
    "build",
    "problem",
    "problems",
]

SIZES = {"train": 4000, "validation": 200, "test": 500}
# Names in the dict that mathematics_dataset.modules.arithmetic.train() returns.
GENERATORS = ("add_or_sub", "add_sub_multiple", "mul", "div")
MAX_ANSWER_CHARS = 10
PIP_REQUIREMENT = "mathematics-dataset>=1.0.1,<1.1"
_MAX_DRAWS_PER_ROW = 10


def _add_sympy_diophantine_alias() -> None:
    """Re-export ``base_solution_linear`` from ``sympy.solvers.diophantine``, where
    mathematics-dataset 1.0.1 imports it from (see the module docstring)."""
    package = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(package, "base_solution_linear"):
        from sympy.solvers.diophantine.diophantine import base_solution_linear

        package.base_solution_linear = base_solution_linear


@functools.cache
def _import_generators() -> tuple[dict[str, Callable], int, int]:
    """``(name -> generator, max question length, max answer length)`` from the package;
    imported on first use (sympy and the package take ~0.5 s to import)."""
    try:
        _add_sympy_diophantine_alias()
        from mathematics_dataset import generate_settings
        from mathematics_dataset.modules import arithmetic
    except ImportError as err:
        raise DataUnavailableError(
            f"the arithmetic task needs the package 'mathematics-dataset', which cannot be "
            f"imported ({err}); install it with `pip install '{PIP_REQUIREMENT}'` "
            "(or `make install`, which installs the models extra)"
        ) from err
    # train(entropy_fn) maps each generator's training entropy range (lo, hi) through
    # entropy_fn; (lo, lo) fixes it at the easiest end.
    generators = arithmetic.train(lambda entropy_range: (entropy_range[0], entropy_range[0]))
    return (
        {name: generators[name] for name in GENERATORS},
        generate_settings.MAX_QUESTION_LENGTH,
        generate_settings.MAX_ANSWER_LENGTH,
    )


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's and NumPy's global RNGs; restore their previous states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def problem(question: str, answer: str) -> dict[str, str]:
    """One row: ``{"prompt": "Question: <question>\\nAnswer:", "completion": " <answer>"}``."""
    return {"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"}


def problems(seed: int, sizes: dict[str, int] = SIZES) -> dict[str, list[dict[str, str]]]:
    """Seeded rows with distinct prompts, ``sizes[split]`` per split (filled in order)."""
    generators, max_question, max_answer = _import_generators()
    max_answer = min(max_answer, MAX_ANSWER_CHARS)
    needed = sum(sizes.values())
    names = list(generators)
    rows: dict[str, dict[str, str]] = {}  # prompt -> row, in drawing order
    with _seeded_global_rngs(seed):
        for draw in range(needed * _MAX_DRAWS_PER_ROW):
            if len(rows) == needed:
                break
            drawn = generators[names[draw % len(names)]]()
            question, answer = str(drawn.question), str(drawn.answer)
            if len(question) <= max_question and len(answer) <= max_answer:
                row = problem(question, answer)
                rows.setdefault(row["prompt"], row)
    if len(rows) < needed:
        raise ValueError(
            f"sizes ask for {needed} distinct problems; {needed * _MAX_DRAWS_PER_ROW} draws "
            f"gave only {len(rows)}"
        )
    ordered = list(rows.values())
    out, start = {}, 0
    for split, size in sizes.items():
        out[split] = ordered[start : start + size]
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
    description=(
        "mathematics-dataset arithmetic (add_or_sub, add_sub_multiple, mul, div; easiest "
        "entropy), exact match"
    ),
    source=f"pip {PIP_REQUIREMENT}: mathematics_dataset.modules.arithmetic, seeded",
    build=build,
    default_model=models.smollm2_path,
    metric_names=("exact_match",),
)
