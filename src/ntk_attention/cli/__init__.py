"""The ``ntk-attention`` command line, one module per group of commands:

    main.py         the parser, the command registry (``COMMANDS``), errors -> exit status 2
    finetune.py     finetune, compare, demo
    compression.py  compress-prompt, convert-prefix
    generation.py   generate
    ops_demo.py     ops-demo
    common.py       what they share (quiet offline transformers, threads, argument types)

``python -m ntk_attention.cli`` and ``python -m ntk_attention`` run it too (``torchrun ... -m
ntk_attention.cli finetune`` for data-parallel training).
"""

from .main import COMMANDS, EXIT_BAD_INPUT, build_parser, main

__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "build_parser", "main"]
