"""What PEFT's loaders say when they are handed an NTK-Attention adapter folder.

PEFT reads ``adapter_config.json``'s ``peft_type`` and looks it up in
``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``; for "NTK_ATTENTION" that is a bare
``KeyError: 'NTK_ATTENTION'``. PEFT has no public way to add a method (``register_peft_method``
only takes names already in its ``PeftType``), so once this package is imported the mapping
gets one entry whose every use raises a ValueError that says what to call instead. The entry
registers nothing that loads or trains: it only replaces the KeyError. If PEFT's internals
change, the entry is simply not added (the KeyError stays, nothing else breaks).
"""

from __future__ import annotations

from .config import PEFT_TYPE

__all__ = ["NOT_A_PEFT_ADAPTER", "install"]

NOT_A_PEFT_ADAPTER = (
    "this folder holds an NTK-Attention adapter (peft_type 'NTK_ATTENTION'), which PEFT cannot "
    "load: use ntk_attention.NTKModel.from_pretrained(base_model, path)"
)


class _NotAPeftConfig:
    """Stands in PEFT's config mapping for NTK_ATTENTION: every use names the right loader."""

    def __init__(self, *args, **kwargs) -> None:
        raise ValueError(NOT_A_PEFT_ADAPTER)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise ValueError(NOT_A_PEFT_ADAPTER)

    @classmethod
    def from_peft_type(cls, *args, **kwargs):
        raise ValueError(NOT_A_PEFT_ADAPTER)


def install() -> None:
    """Add the entry (idempotent; a no-op where PEFT is missing or laid out otherwise)."""
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    except ImportError:
        return
    if isinstance(PEFT_TYPE_TO_CONFIG_MAPPING, dict):
        PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(PEFT_TYPE, _NotAPeftConfig)
