"""``python -m ntk_attention``: the ``ntk-attention`` command line."""

import sys

from .cli import main

sys.exit(main())
