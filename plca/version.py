"""The package's version: the one place it is written (pyproject.toml reads it, run records record it)."""

__version__ = "0.1.0"
