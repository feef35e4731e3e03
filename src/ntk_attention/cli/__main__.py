"""``python -m ntk_attention.cli``: the ``ntk-attention`` command line (as torchrun launches it)."""

import sys

from .main import main

sys.exit(main())
