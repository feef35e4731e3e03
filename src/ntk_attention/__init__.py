"""ntk-attention: NTK-Attention for Hugging Face transformers.

The effect of an arbitrarily long attention prefix kept in a constant-size trainable state
(Z, kappa) per layer and KV head (arXiv 2406.14036), as exact, fast ops and as a PEFT-style
adapter.
"""

from . import ops
from .ops import ntk_attention, prefix_attention

__version__ = "0.1.0"

__all__ = ["__version__", "ntk_attention", "ops", "prefix_attention"]
