"""The ``v1c`` ResNet (mmsegmentation's ResNetV1c, DAFormer's DeepLab-v2): deep stem, contracted
first dilation, mmcv's key names, weights told apart from 7x7-stem files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plca.models.normalization import InputNormalizer
from plca.models.resnet import ResNet, style_normalization
from plca.models.weights import WeightsError

from test_resnet import bn, expected_keys, meta_resnet, randomize_bn

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def v1c_keys(depth: int) -> set[str]:
    """mmcv's ``resnet*_v1c`` names: torchvision's layout with ``stem.{0,3,6}`` convs and
    ``stem.{1,4,7}`` BatchNorms in place of ``conv1`` / ``bn1``."""
    keys = expected_keys(depth) - {"conv1.weight"} - {f"bn1.{b}" for b in BN}
    keys |= {f"stem.{i}.weight" for i in (0, 3, 6)}
    keys |= {f"stem.{i}.{b}" for i in (1, 4, 7) for b in BN}
    return keys


@pytest.mark.parametrize("depth", [50, 101])
def test_keys_are_mmcvs_and_the_parameter_count_is_the_7x7_nets_plus_the_deep_stems(depth):
    net = meta_resnet(depth, "v1c")
    assert set(net.state_dict()) == v1c_keys(depth)
    plain = sum(p.numel() for p in meta_resnet(depth, "pytorch").parameters())
    seven_by_seven = 3 * 64 * 49 + 2 * 64
    deep = (3 * 32 + 32 * 32 + 32 * 64) * 9 + 2 * (32 + 32 + 64)
    assert sum(p.numel() for p in net.parameters()) == plain - seven_by_seven + deep
    if depth == 101:
        assert plain - seven_by_seven + deep == 42_519_392


@pytest.mark.parametrize("depth", [50, 101])
def test_first_block_of_a_dilated_stage_has_half_the_dilation_and_strides_sit_in_the_3x3(depth):
    net = meta_resnet(depth, "v1c")
    for stage, dilation in ((net.layer3, 2), (net.layer4, 4)):
        assert stage[0].conv2.dilation == (dilation // 2,) * 2 and stage[0].conv2.padding == (dilation // 2,) * 2
        for block in list(stage)[1:]:
            assert block.conv2.dilation == (dilation,) * 2 and block.conv2.padding == (dilation,) * 2
    assert (net.layer2[0].conv1.stride, net.layer2[0].conv2.stride) == ((1, 1), (2, 2))
    assert not net.maxpool.ceil_mode
    assert [m.stride for m in net.stem if isinstance(m, nn.Conv2d)] == [(2, 2), (1, 1), (1, 1)]


@pytest.mark.parametrize("size", [(65, 97), (64, 96)])
def test_output_stride_is_8_as_the_other_styles(size):
    v1c = meta_resnet(50, "v1c")(torch.empty(1, 3, *size, device="meta"))
    pytorch = meta_resnet(50, "pytorch")(torch.empty(1, 3, *size, device="meta"))
    assert [level.shape for level in v1c] == [level.shape for level in pytorch]


def test_forward_is_the_deep_stem_then_the_stages():
    torch.manual_seed(0)
    net = ResNet(18, "v1c").eval()
    randomize_bn(net)
    x = torch.randn(1, 3, 37, 41)
    with torch.no_grad():
        y = x
        for conv, norm, stride in ((net.stem[0], net.stem[1], 2), (net.stem[3], net.stem[4], 1),
                                   (net.stem[6], net.stem[7], 1)):
            y = F.relu(bn(F.conv2d(y, conv.weight, stride=stride, padding=1), norm))
        y = F.max_pool2d(y, 3, stride=2, padding=1)
        expected = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = stage(y)
            expected.append(y)
        for level, reference in zip(net(x), expected, strict=True):
            torch.testing.assert_close(level, reference, rtol=1e-4, atol=1e-4)


def test_v1c_input_is_imagenet_rgb():
    images = torch.rand(1, 3, 4, 4) * 255
    torch.testing.assert_close(InputNormalizer(style_normalization("v1c"))(images),
                               InputNormalizer(style_normalization("pytorch"))(images))


def test_a_v1c_file_loads_and_a_7x7_stem_file_is_refused_naming_the_style(tmp_path):
    torch.manual_seed(0)
    source = ResNet(18, "v1c")
    torch.save({"meta": {}, "state_dict": {**source.state_dict(), "fc.weight": torch.zeros(2, 2)}},
               tmp_path / "v1c.pth")
    target = ResNet(18, "v1c")
    target.load_pretrained(tmp_path / "v1c.pth")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)

    torch.save(ResNet(18, "pytorch").state_dict(), tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="7x7 stem.*model.style to pytorch or caffe"):
        ResNet(18, "v1c").load_pretrained(tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="deep-stem.*model.style=v1c"):
        ResNet(18, "caffe").load_pretrained(tmp_path / "v1c.pth")


def test_config_accepts_v1c_for_resnets_only():
    from plca.config import ConfigError, build_config

    data = {"classes": ["road", "car"], "source": {"format": "folder", "root": "/s", "split": "train"}}
    config = build_config({"method": "source_only", "data": data, "model": {"backbone": "resnet101", "style": "v1c"}})
    assert config.model.style == "v1c"
    with pytest.raises(ConfigError, match="model.style v1c is for the ResNet backbones only"):
        build_config({"method": "source_only", "data": data,
                      "model": {"backbone": "mit_b0", "style": "v1c", "head": "daformer"}})
