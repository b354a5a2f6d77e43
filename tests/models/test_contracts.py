"""What the built-in backbones declare in their registry contracts: styles, the input of each, layouts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plca.models.normalization import IMAGENET_RGB, Normalization
from plca.models.registry import (backbone_contract, backbone_styles, families_with_style, head_contract,
                                  head_names, resolved_style, weight_layouts)
from plca.models.resnet import CAFFE_MEAN_BGR


def test_resnet_styles_and_the_input_of_each():
    contract = backbone_contract("resnet50")
    assert contract is backbone_contract("resnet18")  # one contract for the family
    assert list(contract.styles) == ["caffe", "pytorch", "v1c"] and contract.default_style == "caffe"
    caffe = Normalization(bgr=True, mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0))
    assert contract.input_normalization(None, None) == contract.input_normalization("caffe", None) == caffe
    assert contract.input_normalization("pytorch", None) == contract.input_normalization("v1c", None) == IMAGENET_RGB
    assert resolved_style("resnet101", None) == "caffe" and resolved_style("resnet101", "v1c") == "v1c"


def test_mit_and_efficientnet_lite_have_their_own_input():
    mit = backbone_contract("mit_b2")
    assert list(mit.styles) == ["pytorch"] and mit.input_normalization("pytorch", None) == IMAGENET_RGB
    assert resolved_style("mit_b2", None) is None
    lite = backbone_contract("efficientnet_lite0")
    assert not lite.styles and not lite.accepts("pytorch")
    # RGB in [0, 1], mean 0.5, std 0.5: [-1, 1]
    assert lite.input_normalization(None, None) == Normalization(bgr=False, mean=(127.5,) * 3, std=(127.5,) * 3)
    assert Normalization.from_unit_range((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) == IMAGENET_RGB


def test_timm_reads_the_input_from_the_model_and_checks_names_through_its_contract():
    contract = backbone_contract("timm:anything")
    own = Normalization(bgr=False, mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0))
    assert contract.input_normalization(None, SimpleNamespace(normalization=own)) == own
    assert contract.input_normalization("pytorch", SimpleNamespace(normalization=own)) == own
    assert contract.check_name is not None and resolved_style("timm:anything", None) is None


def test_styles_and_families_in_registration_order():
    assert backbone_styles() == ["caffe", "pytorch", "v1c"]
    assert families_with_style("pytorch") == ["ResNet", "MiT", "timm"]
    assert families_with_style("v1c") == ["ResNet"]
    assert resolved_style("not_registered", None) is None


def test_heads_widths_come_from_their_contracts():
    assert {name: head_contract(name).width for name in head_names()} == {
        "segformer": True, "daformer": True, "deeplabv2": False, "deeplabv2_reduced": False,
        "daformer_attention": True}
    with pytest.raises(ValueError, match="unknown head 'fcn'"):
        head_contract("fcn")


def test_every_weight_layout_is_registered_once_with_its_backbone():
    names = [layout.name for layout in weight_layouts()]
    assert names == ["caffe-resnet", "mmcv-resnet-v1c", "torchvision-resnet", "segformer-mit", "hf-mit", "plca-mit",
                     "efficientnet-pytorch-lite0", "timm-efficientnet-lite0", "plca-efficientnet-lite0"]
    assert all(layout.identify({"x": torch.empty(1, device="meta")}) is None for layout in weight_layouts())
