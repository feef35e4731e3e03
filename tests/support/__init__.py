"""Helpers for the tests only (not shipped in the wheel): float64 references and tolerances
(``support.testing``), tiny random models and a character tokenizer
(``support.testing_models``).

pytest (rootdir-relative ``prepend`` import mode, ``tests/`` has no ``__init__.py``) puts
``tests/`` on ``sys.path``, so tests import ``support.testing``. A test that starts a Python
subprocess which imports them passes :func:`subprocess_env`, which adds ``tests/`` to its
``PYTHONPATH``."""

from __future__ import annotations

import os
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with ``tests/`` first on ``PYTHONPATH`` (so that a child
    Python process can ``import support``)."""
    paths = [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(paths)}
