"""Which adapter each row of a batch uses during one call (per-sample adapter mixing).

A call with ``adapter_names=[...]`` names one adapter per row (``BASE_ADAPTER`` = no adapter).
The names reach the places that need them by two routes:

* attention layers get them as a keyword argument (``ADAPTER_NAMES_KWARG``) that transformers
  passes from the model's forward down to the attention function. Being an argument, it is
  captured by gradient checkpointing (the recomputation in backward sees the same names) and
  passed on by ``generate()`` at every step;
* modules outside the layers (position embeddings, modules_to_save heads) read them from a
  context variable set for the duration of the call.

Batches that ``generate()`` expands (``num_return_sequences``, beam search) repeat every row
``k`` times in place; :func:`expand_rows` repeats the names the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

__all__ = [
    "ADAPTER_NAMES_KWARG",
    "BASE_ADAPTER",
    "call_adapter_names",
    "current_adapter_names",
    "expand_rows",
]

BASE_ADAPTER = "__base__"
ADAPTER_NAMES_KWARG = "ntk_adapter_names"

_ADAPTER_NAMES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "ntk_adapter_names", default=None
)


@contextlib.contextmanager
def call_adapter_names(names: tuple[str, ...] | None) -> Iterator[None]:
    """Make ``names`` the per-row adapters of the calls inside the block (None: no mixing)."""
    token = _ADAPTER_NAMES.set(names)
    try:
        yield
    finally:
        _ADAPTER_NAMES.reset(token)


def current_adapter_names() -> tuple[str, ...] | None:
    """The per-row adapter names of the running call, or None outside a mixed call."""
    return _ADAPTER_NAMES.get()


def expand_rows(names: Sequence[str], batch: int) -> tuple[str, ...]:
    """``names`` for a batch of ``batch`` rows: as is, or each repeated ``batch // len`` times
    in place (the layout of generate's expanded batches)."""
    count = len(names)
    if batch == count:
        return tuple(names)
    if count == 0 or batch % count != 0:
        raise ValueError(
            f"adapter_names has {count} entries, but the batch has {batch} rows "
            "(expected one name per row, or a divisor of the batch for expanded batches)"
        )
    repeat = batch // count
    return tuple(name for name in names for _ in range(repeat))
