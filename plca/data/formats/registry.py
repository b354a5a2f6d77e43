"""The registry of dataset formats: a format is registered once, by name, and looked up by every reader.

:func:`register_format` adds a :class:`~plca.data.formats.base.DatasetFormat` instance;
``plca/data/formats/__init__.py`` imports one module per built-in format, each registering its
own. Everything that names formats (dataset building, ``plca prepare``, the command line's
choices, config validation) asks this registry at the time it runs, so a format registered
later (a plug-in, a test) is known everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# a plca.data.formats.base.DatasetFormat; not imported, since base asks this registry for the layout a
# folder has (its "looks like a ... dataset" hint)
DatasetFormat = Any

__all__ = ["check_split", "format_names", "get_format", "guess_format", "register_format", "unregister_format"]

_FORMATS: dict[str, DatasetFormat] = {}


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    """Add ``fmt`` under ``fmt.name`` (a name registered already is a ``ValueError``); returns it."""
    name = getattr(fmt, "name", "")
    if not isinstance(name, str) or not name or name != name.strip() or " " in name:
        raise ValueError(f"a dataset format needs a name without spaces, got {name!r}")
    if name in _FORMATS:
        raise ValueError(f"dataset format '{name}' is registered already")
    _FORMATS[name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove the format ``name`` (a test's own format, after the test)."""
    if name not in _FORMATS:
        raise KeyError(f"dataset format '{name}' is not registered")
    del _FORMATS[name]


def format_names(*, prepare: bool = False) -> tuple[str, ...]:
    """The registered format names, in registration order; ``prepare``: only those ``plca prepare`` checks."""
    return tuple(name for name, fmt in _FORMATS.items() if not prepare or fmt.in_prepare)


def get_format(name: str) -> DatasetFormat:
    """The format registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown dataset format '{name}'; known formats: {', '.join(_FORMATS)}") from None


def guess_format(root: str | Path) -> str | None:
    """The format whose layout ``root`` has, or None: the highest :meth:`DatasetFormat.recognise` score
    (a more specific layout scores higher), the first registered on a tie."""
    root = Path(root)
    best, best_score = None, 0
    for name, fmt in _FORMATS.items():
        score = fmt.recognise(root)
        if score > best_score:
            best, best_score = name, score
    return best


def check_split(format: str, split: str) -> str | None:
    """What is wrong with ``split`` as a split of ``format`` (e.g. an unknown ACDC condition), in one line,
    or None; answerable without the data, for config validation. An unknown format is a ``KeyError``."""
    return get_format(format).check_split(split)
