"""Without timm, a ``timm:`` backbone names the extra and how to install it without replacing torch."""

from __future__ import annotations

import sys

import pytest
import torch

from plca.models.timm_backbone import import_timm


def test_a_missing_timm_names_the_extra_and_pins_the_installed_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"need the \[timm\] extra") as info:
        import_timm()
    assert f"torch=={torch.__version__.split('+')[0]}" in str(info.value)
