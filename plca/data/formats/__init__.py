"""Dataset formats, one module each, registered by name.

A format is a :class:`~plca.data.formats.base.DatasetFormat`: its layout in words, how it lists a
split (images, labels, sample names), the :class:`~plca.data.formats.base.LabelMap` from its label
files to the run's classes, whether a split may be a target's unlabelled images, and how
``plca prepare`` recognises its folders. :func:`plca.data.datasets.build_dataset`, ``plca prepare``,
the command line and config validation all read the registry.

Adding a format: one module here that defines and registers it (``register_format(MyFormat())``),
one import line below, and a config piece in ``configs/_base_/data/``.
"""

from plca.data.formats.base import DatasetFormat, Issues, LabelMap, Listing, Sample
from plca.data.formats.registry import (
    check_split, format_names, get_format, guess_format, register_format, unregister_format,
)

# The built-in formats, in the order they are listed (each module registers its format).
from plca.data.formats import gta5  # noqa: E402,F401
from plca.data.formats import synthia  # noqa: E402,F401
from plca.data.formats import cityscapes  # noqa: E402,F401
from plca.data.formats import folder  # noqa: E402,F401
from plca.data.formats import synthetic  # noqa: E402,F401
from plca.data.formats import acdc  # noqa: E402,F401
from plca.data.formats import darkzurich  # noqa: E402,F401

__all__ = [
    "DatasetFormat", "Issues", "LabelMap", "Listing", "Sample", "check_split", "format_names", "get_format",
    "guess_format", "register_format", "unregister_format",
]
