"""DAFormer and SegFormer heads: shapes for MiT and single-level backbones, structure, plain references, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plca.models.daformer_head import DAFormerHead, DepthwiseSeparableConv
from plca.models.registry import create_head, head_names
from plca.models.segformer_head import ConvBNReLU, PixelLinear, SegFormerHead

B0_CHANNELS = (32, 64, 160, 256)
HEADS = {"daformer": DAFormerHead, "segformer": SegFormerHead}


def mit_levels(batch: int = 2, height: int = 64, width: int = 96, channels=B0_CHANNELS, seed: int = 0) -> list[Tensor]:
    """Random maps shaped like MiT's levels at strides 4, 8, 16, 32."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, -(-height // s), -(-width // s), generator=g)
            for c, s in zip(channels, (4, 8, 16, 32))]


def randomise_batch_norms(head: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("name", list(HEADS))
def test_registered_and_shapes_for_mit_b0_levels(name):
    assert name in head_names()
    head = create_head(name, B0_CHANNELS, 19)
    assert isinstance(head, HEADS[name]) and head.embed_channels == 256
    levels = mit_levels()
    embedding = head.embed(levels)
    assert embedding.shape == (2, 256, 16, 24)
    assert head(levels).shape == (2, 19, 16, 24)


@pytest.mark.parametrize("name", list(HEADS))
def test_a_single_stride_8_level_works(name):
    head = create_head(name, (2048,), 7)
    levels = [torch.randn(2, 2048, 9, 13)]
    assert head.embed(levels).shape == (2, head.embed_channels, 9, 13)
    assert head(levels).shape == (2, 7, 9, 13)


@pytest.mark.parametrize("name", list(HEADS))
def test_any_channel_counts_and_level_counts(name):
    channels = (24, 40, 112)
    head = create_head(name, channels, 3)
    assert head(mit_levels(1, 32, 48, channels)).shape == (1, 3, 8, 12)
    with pytest.raises(ValueError, match="3 levels, got 2"):
        head(mit_levels(1, 32, 48, channels)[:2])
    with pytest.raises(ValueError, match=r"C = \(24, 40, 112\)"):
        head(mit_levels(1, 32, 48, (24, 40, 111)))
    with pytest.raises(ValueError, match="at least one level"):
        create_head(name, (), 3)


@pytest.mark.parametrize("name", list(HEADS))
def test_classify_of_embed_is_forward_in_eval_mode(name):
    torch.manual_seed(2)
    head = create_head(name, B0_CHANNELS, 5)
    randomise_batch_norms(head)
    head.eval()
    levels = mit_levels(seed=3)
    with torch.no_grad():
        assert torch.equal(head.classify(head.embed(levels)), head(levels))
        assert torch.equal(head(levels), head(levels))  # dropout is off


@pytest.mark.parametrize("name", list(HEADS))
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(4)
    head = create_head(name, B0_CHANNELS, 4).train()
    levels = [level.requires_grad_() for level in mit_levels(seed=5)]
    head(levels).square().mean().backward()
    for key, p in head.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, key
    assert all(torch.count_nonzero(level.grad) > 0 for level in levels)


def test_embed_dim_and_dropout_options():
    head = create_head("segformer", B0_CHANNELS, 19, embed_dim=768)
    assert head.embed_channels == 768 and head(mit_levels()).shape == (2, 19, 16, 24)
    assert head.dropout.p == 0.1 and isinstance(head.dropout, nn.Dropout2d)
    daformer = create_head("daformer", B0_CHANNELS, 19, embed_dim=64, channels=128, dropout=0.0)
    assert daformer.embed_channels == 128 and daformer.embed(mit_levels()).shape == (2, 128, 16, 24)
    assert daformer.fuse.branches[0].conv.in_channels == 4 * 64


# ---------------------------------------------------------------- DAFormer structure


def test_daformer_structure_matches_daformer_sepaspp():
    head = DAFormerHead((64, 128, 320, 512), 19)
    assert [tuple(e.weight.shape) for e in head.embeddings] == [(256, 64), (256, 128), (256, 320), (256, 512)]
    assert all(type(e) is PixelLinear for e in head.embeddings)
    fuse = head.fuse
    assert fuse.dilations == (1, 6, 12, 18) and len(fuse.branches) == 4
    first = fuse.branches[0]
    assert isinstance(first, ConvBNReLU)  # dilation 1: a plain 1x1 conv + BN + ReLU
    assert (first.conv.in_channels, first.conv.out_channels, first.conv.kernel_size) == (1024, 256, (1, 1))
    for branch, d in zip(fuse.branches[1:], (6, 12, 18)):
        assert isinstance(branch, DepthwiseSeparableConv)
        dw, pw = branch.depthwise.conv, branch.pointwise.conv
        assert dw.groups == dw.in_channels == dw.out_channels == 1024
        assert (dw.kernel_size, dw.dilation, dw.padding) == ((3, 3), (d, d), (d, d))
        assert (pw.in_channels, pw.out_channels, pw.kernel_size, pw.groups) == (1024, 256, (1, 1), 1)
        for block in (branch.depthwise, branch.pointwise):
            assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    bottleneck = fuse.bottleneck.conv
    assert (bottleneck.in_channels, bottleneck.out_channels, bottleneck.kernel_size, bottleneck.padding) == (
        1024, 256, (3, 3), (1, 1))
    convs_before_bn = [m for m in fuse.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs_before_bn) == 1 + 3 * 2 + 1 and all(m.bias is None for m in convs_before_bn)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    assert head.classifier.kernel_size == (1, 1) and head.classifier.bias is not None
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_he_initialisation_of_fusion_convs():
    torch.manual_seed(6)
    head = DAFormerHead(B0_CHANNELS, 19)
    conv = head.fuse.bottleneck.conv  # fan_out = 9 * 256
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 256)) ** 0.5, rel=0.05)
    bn = head.fuse.bottleneck[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


# ---------------------------------------------------------------- plain references (eval mode)


def bn_relu(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    y = (x - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    return y.clamp_min(0)


def embed_reference(head, levels: list[Tensor]) -> list[Tensor]:
    size = levels[0].shape[2:]
    out = []
    for linear, x in zip(head.embeddings, levels):
        y = torch.einsum("bchw,ec->behw", x, linear.weight) + linear.bias[:, None, None]
        out.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
    return out


def test_daformer_matches_a_plain_reference():
    torch.manual_seed(7)
    head = DAFormerHead((8, 12, 16), 3, embed_dim=6, channels=5, dilations=(1, 2, 3))
    randomise_batch_norms(head)
    head.eval()
    levels = mit_levels(2, 32, 40, (8, 12, 16), seed=8)
    x = torch.cat(embed_reference(head, levels), dim=1)  # finest first
    branches = []
    for branch, d in zip(head.fuse.branches, (1, 2, 3)):
        if d == 1:
            branches.append(bn_relu(F.conv2d(x, branch[0].weight), branch[1]))
            continue
        dw, pw = branch.depthwise, branch.pointwise
        # depthwise: every channel convolved alone with its own 3x3 kernel
        y = torch.cat([F.conv2d(x[:, i:i + 1], dw[0].weight[i:i + 1], padding=d, dilation=d)
                       for i in range(x.shape[1])], dim=1)
        y = bn_relu(y, dw[1])
        branches.append(bn_relu(F.conv2d(y, pw[0].weight), pw[1]))
    bottleneck = head.fuse.bottleneck
    embedding = bn_relu(F.conv2d(torch.cat(branches, dim=1), bottleneck[0].weight, padding=1), bottleneck[1])
    logits = F.conv2d(embedding, head.classifier.weight, head.classifier.bias)
    with torch.no_grad():
        torch.testing.assert_close(head.embed(levels), embedding)
        torch.testing.assert_close(head(levels), logits)


def test_segformer_matches_a_plain_reference():
    torch.manual_seed(9)
    head = SegFormerHead((8, 12, 16), 3, embed_dim=6)
    randomise_batch_norms(head)
    head.eval()
    levels = mit_levels(2, 32, 40, (8, 12, 16), seed=10)
    x = torch.cat(embed_reference(head, levels)[::-1], dim=1)  # coarsest first, as SegFormer
    embedding = bn_relu(F.conv2d(x, head.fuse[0].weight), head.fuse[1])
    logits = F.conv2d(embedding, head.classifier.weight, head.classifier.bias)
    with torch.no_grad():
        torch.testing.assert_close(head.embed(levels), embedding)
        torch.testing.assert_close(head(levels), logits)


# ---------------------------------------------------------------- with the segmentor


@pytest.mark.parametrize("name", list(HEADS))
def test_mit_b0_segmentor_end_to_end(name):
    import plca.models.mit  # noqa: F401 - registers mit_b0..b5
    from plca.models.segmentor import SegmentorSpec, build_segmentor

    torch.manual_seed(11)
    model = build_segmentor(SegmentorSpec(backbone="mit_b0", head=name, features="head_embedding"), 19).eval()
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
    assert out["logits"].shape == (1, 19, 16, 24)
    assert out["features"].shape == (1, 256, 16, 24)
    assert model.describe()["style"] is None


@pytest.mark.parametrize("name", list(HEADS))
def test_head_width_sets_the_embedding_and_fusion_channels(name):
    head = create_head(name, B0_CHANNELS, 5, width=24)
    assert head.embed_channels == 24
    assert all(module.out_features == 24 for module in head.modules() if isinstance(module, PixelLinear))
    assert head(mit_levels()).shape == (2, 5, 16, 24)


def test_a_deeplab_head_has_no_width():
    with pytest.raises(ValueError, match="no option 'width'.*class count"):
        create_head("deeplabv2", B0_CHANNELS, 5, width=24)
