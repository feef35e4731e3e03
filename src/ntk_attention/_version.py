"""The package's version, in one place: pyproject.toml reads it (``[tool.setuptools.dynamic]``),
the package root exports it, and adapters record it in their config."""

__version__ = "0.1.0"
