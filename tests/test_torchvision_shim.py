"""The torchvision shim of ``conftest.py``: timm imports beside a torchvision whose compiled ops do not
load, and CI has timm, so the timm backbone tests run there instead of being skipped."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def test_ci_installs_timm_and_torchvision():
    if not os.environ.get("CI"):
        pytest.skip("only CI must have the optional timm extra")
    assert importlib.util.find_spec("torchvision") is not None
    assert importlib.util.find_spec("timm") is not None


def test_timm_and_torchvision_import_where_installed():
    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("timm") is None:
        pytest.skip("timm / torchvision not installed")
    import timm
    import torchvision

    schema = str(torch.ops.torchvision.nms.default._schema)
    assert "Tensor dets, Tensor scores, float iou_threshold" in schema, schema
    assert str(torch.ops.torchvision.qnms.default._schema).startswith("torchvision::qnms(Tensor dets")
    assert torchvision.__version__ and timm.create_model("resnet10t", pretrained=False, features_only=True)
