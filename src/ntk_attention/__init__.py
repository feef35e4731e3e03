"""ntk-attention: NTK-Attention for Hugging Face transformers.

The effect of an arbitrarily long attention prefix kept in a constant-size trainable state
(Z, kappa) per layer and KV head (arXiv 2406.14036), as exact, fast ops and as a PEFT-style
adapter.
"""

from . import ops
from ._version import __version__
from .ops import ntk_attention, prefix_attention

__all__ = ["__version__", "ntk_attention", "ops", "prefix_attention"]

# The adapter imports transformers (~3 s), so it loads on first use of one of its names.
_TUNER_EXPORTS = ("NTKConfig", "NTKModel", "get_ntk_model")
__all__ += list(_TUNER_EXPORTS)
_COMPRESS_EXPORTS = ("CompressConfig", "compress_prompt", "convert_prefix")
__all__ += list(_COMPRESS_EXPORTS)


def __getattr__(name: str):
    if name in _TUNER_EXPORTS:
        from . import tuner

        return getattr(tuner, name)
    if name in _COMPRESS_EXPORTS:
        from . import compress

        return getattr(compress, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
