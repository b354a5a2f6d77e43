"""Dilated ResNet backbones: layout, parameter counts, strides/dilations, output sizes, input normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plca.models.normalization import InputNormalizer
from plca.models.resnet import BasicBlock, Bottleneck, ResNet, style_normalization

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def meta_resnet(depth: int, style: str = "caffe") -> ResNet:
    """Shapes only, no memory or init cost (ResNet-101 has 42.5M parameters)."""
    with torch.device("meta"):
        return ResNet(depth, style)


# ---------------------------------------------------------------- layout and size

@pytest.mark.parametrize("depth, expected", [
    # torchvision's published totals minus the 1000-way fc (512 * 1000 + 1000 or 2048 * 1000 + 1000):
    # resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032; resnet101 44,549,160
    (18, 11_689_512 - 513_000), (34, 21_797_672 - 513_000),
    (50, 25_557_032 - 2_049_000), (101, 44_549_160 - 2_049_000),
])
def test_parameter_count_matches_torchvision_without_fc(depth, expected):
    assert sum(p.numel() for p in meta_resnet(depth).parameters()) == expected


def expected_keys(depth: int) -> set[str]:
    """torchvision's state-dict keys (no fc), written out from its naming rules."""
    bottleneck = depth >= 50
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight"} | {f"bn1.{b}" for b in bn}
    convs = (1, 2, 3) if bottleneck else (1, 2)
    for stage, count in enumerate(BLOCKS[depth], start=1):
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            for c in convs:
                keys.add(f"{prefix}.conv{c}.weight")
                keys |= {f"{prefix}.bn{c}.{b}" for b in bn}
            # a downsample branch where the shape changes: first block of every stage except
            # layer1 of the BasicBlock nets (64 -> 64, stride 1)
            if block == 0 and (bottleneck or stage > 1):
                keys.add(f"{prefix}.downsample.0.weight")
                keys |= {f"{prefix}.downsample.1.{b}" for b in bn}
    return keys


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_state_dict_keys_follow_torchvision_layout(depth):
    keys = set(meta_resnet(depth).state_dict())
    assert keys == expected_keys(depth)
    assert not any(k.startswith("fc.") for k in keys)


def test_known_torchvision_keys_spot_check():
    keys = set(meta_resnet(101).state_dict())
    for key in ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_mean", "layer3.22.conv3.weight", "layer3.22.bn3.bias",
                "layer4.2.bn3.weight", "layer4.0.downsample.1.num_batches_tracked"]:
        assert key in keys
    assert len(keys) == 624  # torchvision's resnet101 state dict has 626 entries, two of them fc
    assert len(meta_resnet(50).state_dict()) == 318  # 320 with fc
    assert len(meta_resnet(18).state_dict()) == 120  # 122 with fc


@pytest.mark.parametrize("depth, channels", [(18, 512), (34, 512), (50, 2048), (101, 2048)])
def test_out_channels(depth, channels):
    net = meta_resnet(depth)
    assert net.out_channels[-1] == channels and net.out_channels == tuple(channels // 8 * k for k in (1, 2, 4, 8))
    assert net.strides == (4, 8, 8, 8)


def test_unknown_depth_and_style_are_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match="18, 34, 50, 101"):
        ResNet(152)
    with pytest.raises(ValueError, match="caffe, pytorch"):
        ResNet(18, style="v1")
    with pytest.raises(ValueError, match="caffe, pytorch"):
        style_normalization("rgb")


# ---------------------------------------------------------------- strides and dilations

def convs_3x3(stage: nn.Module) -> list[nn.Conv2d]:
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


@pytest.mark.parametrize("depth", [18, 50, 101])
@pytest.mark.parametrize("style", ["caffe", "pytorch"])
def test_dilated_stages_use_the_new_dilation_in_every_block(depth, style):
    net = meta_resnet(depth, style)
    for stage, dilation in ((net.layer1, 1), (net.layer2, 1), (net.layer3, 2), (net.layer4, 4)):
        for conv in convs_3x3(stage):
            assert conv.dilation == (dilation, dilation)
            assert conv.padding == (dilation, dilation)
    for stage in (net.layer3, net.layer4):
        assert all(m.stride == (1, 1) for m in stage.modules() if isinstance(m, nn.Conv2d))
    assert net.layer2[0].downsample[0].stride == (2, 2)


@pytest.mark.parametrize("depth", [50, 101])
def test_bottleneck_stride_placement_depends_on_style(depth):
    caffe, pytorch = meta_resnet(depth, "caffe"), meta_resnet(depth, "pytorch")
    assert (caffe.layer2[0].conv1.stride, caffe.layer2[0].conv2.stride) == ((2, 2), (1, 1))
    assert (pytorch.layer2[0].conv1.stride, pytorch.layer2[0].conv2.stride) == ((1, 1), (2, 2))
    assert caffe.maxpool.ceil_mode and not pytorch.maxpool.ceil_mode


def test_basic_block_strides_in_its_first_3x3_in_both_styles():
    for style in ("caffe", "pytorch"):
        net = meta_resnet(18, style)
        assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
        assert net.maxpool.ceil_mode == (style == "caffe")


# ---------------------------------------------------------------- output sizes

def conv_size(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def pool_size(n: int, ceil_mode: bool) -> int:
    """MaxPool2d(3, stride 2, padding 1) output size, PyTorch's documented formula."""
    if not ceil_mode:
        return (n + 2 - 3) // 2 + 1
    out = math.ceil((n + 2 - 3) / 2) + 1
    if (out - 1) * 2 >= n + 1:  # the last window must start inside the input or the left padding
        out -= 1
    return out


def expected_size(n: int, style: str, bottleneck: bool) -> int:
    n = conv_size(n, 7, 2, 3)
    n = pool_size(n, ceil_mode=style == "caffe")
    if bottleneck and style == "caffe":
        return conv_size(n, 1, 2, 0)  # stride in the 1x1
    return conv_size(n, 3, 2, 1)  # stride in the 3x3 (the 1x1 downsample gives the same size)


@pytest.mark.parametrize("style", ["caffe", "pytorch"])
@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("size", [(65, 97), (64, 96), (71, 33)])
def test_output_stride_8_shapes(depth, style, size):
    net = meta_resnet(depth, style)
    levels = net(torch.empty(2, 3, *size, device="meta"))
    expected = tuple(expected_size(n, style, depth >= 50) for n in size)
    assert tuple(levels[-1].shape) == (2, net.out_channels[-1], *expected)
    assert [tuple(level.shape[:2]) for level in levels] == [(2, c) for c in net.out_channels]
    assert tuple(levels[1].shape[-2:]) == expected and tuple(levels[2].shape[-2:]) == expected  # dilated: stride 8


def test_ceil_mode_makes_caffe_output_larger_on_even_stem_sizes():
    # 64 -> conv1 32 (even) -> caffe pool 17 (pytorch 16) -> layer2 9 (pytorch 8)
    assert expected_size(64, "caffe", True) == 9 and expected_size(64, "pytorch", True) == 8
    assert expected_size(1024, "caffe", True) == 129 and expected_size(1024, "pytorch", True) == 128
    assert expected_size(65, "caffe", True) == expected_size(65, "pytorch", True) == 9


@pytest.mark.parametrize("style", ["caffe", "pytorch"])
@pytest.mark.parametrize("depth", [18, 50])
def test_real_forward_sizes(depth, style):
    torch.manual_seed(0)
    net = ResNet(depth, style).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 71))[-1]
    assert out.shape == (1, net.out_channels[-1], expected_size(64, style, depth >= 50),
                         expected_size(71, style, depth >= 50))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- blocks against plain functional code

def randomize_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)


def bn(x, m: nn.BatchNorm2d):
    shape = (1, -1, 1, 1)
    return ((x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
            * m.weight.view(shape) + m.bias.view(shape))


@pytest.mark.parametrize("style", ["caffe", "pytorch"])
def test_bottleneck_matches_functional_reference(style):
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    block = Bottleneck(8, 4, stride=2, dilation=2, downsample=down, style=style).eval()
    randomize_bn(block)
    x = torch.randn(2, 8, 9, 11)
    s1, s3 = (2, 1) if style == "caffe" else (1, 2)
    y = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=s1), block.bn1))
    y = F.relu(bn(F.conv2d(y, block.conv2.weight, stride=s3, padding=2, dilation=2), block.bn2))
    y = bn(F.conv2d(y, block.conv3.weight), block.bn3)
    skip = bn(F.conv2d(x, down[0].weight, stride=2), down[1])
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(y + skip), rtol=1e-5, atol=1e-5)


def test_basic_block_matches_functional_reference():
    torch.manual_seed(0)
    block = BasicBlock(6, 6, stride=1, dilation=4, downsample=None, style="caffe").eval()
    randomize_bn(block)
    x = torch.randn(1, 6, 10, 7)
    y = F.relu(bn(F.conv2d(x, block.conv1.weight, padding=4, dilation=4), block.bn1))
    y = bn(F.conv2d(y, block.conv2.weight, padding=4, dilation=4), block.bn2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(y + x), rtol=1e-5, atol=1e-5)


def test_resnet_forward_is_stem_then_four_stages():
    torch.manual_seed(0)
    net = ResNet(18, "caffe").eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        y = F.max_pool2d(F.relu(bn(F.conv2d(x, net.conv1.weight, stride=2, padding=3), net.bn1)),
                         3, stride=2, padding=1, ceil_mode=True)
        expected = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = stage(y)
            expected.append(y)
        for level, reference in zip(net(x), expected, strict=True):
            torch.testing.assert_close(level, reference)


# ---------------------------------------------------------------- input normalisation

def test_caffe_normalizer_is_bgr_minus_mean():
    rgb = torch.rand(2, 3, 5, 4) * 255
    out = InputNormalizer(style_normalization("caffe"))(rgb)
    # Caffe ImageNet mean, BGR (the DeepLab / PLCA reference values; docs/method.md rounds them)
    mean_bgr = (104.00698793, 116.66876762, 122.67891434)
    for channel, (source, mean) in enumerate(zip((2, 1, 0), mean_bgr)):
        torch.testing.assert_close(out[:, channel], rgb[:, source] - mean)
    assert mean_bgr == pytest.approx((104.008, 116.669, 122.679), abs=2e-3)


def test_pytorch_normalizer_is_imagenet_standardisation():
    rgb = torch.rand(2, 3, 5, 4) * 255
    out = InputNormalizer(style_normalization("pytorch"))(rgb)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (rgb[:, c] / 255 - mean[c]) / std[c])


@pytest.mark.parametrize("style", ["caffe", "pytorch"])
def test_normalizer_accepts_uint8_and_keeps_constants_out_of_state_dict(style):
    norm = InputNormalizer(style_normalization(style), style=style)
    images = torch.randint(0, 256, (1, 3, 4, 6), dtype=torch.uint8)
    out = norm(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, norm(images.float()))
    assert len(norm.state_dict()) == 0
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        norm(torch.zeros(3, 4, 4))
