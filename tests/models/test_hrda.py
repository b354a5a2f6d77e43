"""HRDA's multi-resolution pieces: the fusion against a written-out reference, the detail box, sliding windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plca.config import ConfigError, build_config
from plca.models import build_segmentor
from plca.models.hrda import HRDAOptions, MultiResolution
from plca.models.multi_resolution import fuse_scales, sample_detail_box, slide_boxes, slide_predict


def test_fusion_at_equal_scales_is_attention_weighted_detail_in_the_box_and_context_elsewhere():
    g = torch.Generator().manual_seed(0)
    context, detail_full = torch.randn(2, 3, 8, 10, generator=g), torch.randn(2, 3, 8, 10, generator=g)
    attention = torch.rand(2, 3, 8, 10, generator=g)
    box = (2, 6, 3, 9)
    detail = detail_full[..., 2:6, 3:9]
    fused = fuse_scales(context, detail, attention, context_scale=1.0, box=box)
    expected = torch.empty_like(context)
    for b in range(2):
        for k in range(3):
            for y in range(8):
                for x in range(10):
                    if 2 <= y < 6 and 3 <= x < 9:
                        a = attention[b, k, y, x]
                        expected[b, k, y, x] = a * detail_full[b, k, y, x] + (1 - a) * context[b, k, y, x]
                    else:
                        expected[b, k, y, x] = context[b, k, y, x]
    torch.testing.assert_close(fused, expected)


def test_fusion_at_half_scale_is_hrdas_formula_and_the_context_far_from_the_box():
    g = torch.Generator().manual_seed(1)
    context, attention = torch.randn(1, 2, 6, 6, generator=g), torch.rand(1, 2, 6, 6, generator=g)
    detail = torch.randn(1, 2, 4, 4, generator=g)
    box = (4, 8, 2, 6)  # on the 12 x 12 grid; (2, 4, 1, 3) on the context's
    fused = fuse_scales(context, detail, attention, context_scale=0.5, box=box)
    # written out: att masked to the box on the context grid, (1 - att) * context, both upsampled x2; detail inserted
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 2:4, 1:3] = 1
    up = lambda t: F.interpolate(t, size=(12, 12), mode="bilinear", align_corners=False)  # noqa: E731
    inserted = torch.zeros(1, 2, 12, 12)
    inserted[..., 4:8, 2:6] = detail
    torch.testing.assert_close(fused, up(mask * attention) * inserted + up((1 - mask * attention) * context))
    # two or more detail pixels away from the box the prediction is the upsampled context
    torch.testing.assert_close(fused[..., :2, :], up(context)[..., :2, :])
    torch.testing.assert_close(fused[..., :, 8:], up(context)[..., :, 8:])
    # with a constant attention a, away from the box's edge: a x detail + (1 - a) x upsampled context
    constant = fuse_scales(context, detail, torch.full_like(attention, 0.3), context_scale=0.5, box=box)
    inner = (..., slice(5, 7), slice(3, 5))
    torch.testing.assert_close(constant[inner], (0.3 * inserted + 0.7 * up(context))[inner])


@pytest.mark.parametrize("size, crop, divisible", [((1024, 1024), (512, 512), 8), ((64, 96), (32, 32), 8),
                                                   ((40, 40), (40, 40), 8), ((37, 50), (16, 24), 4)])
def test_the_detail_box_lies_inside_the_crop_with_divisible_corners(size, crop, divisible):
    g = torch.Generator().manual_seed(0)
    corners = set()
    for _ in range(200):
        y1, y2, x1, x2 = sample_detail_box(*size, crop, divisible, generator=g)
        assert 0 <= y1 and y2 <= size[0] and 0 <= x1 and x2 <= size[1]
        assert (y2 - y1, x2 - x1) == tuple(crop)
        assert y1 % divisible == 0 and x1 % divisible == 0
        corners.add((y1, x1))
    if size[0] - crop[0] >= 2 * divisible:
        assert len(corners) > 1  # it is drawn at random


def test_a_detail_crop_larger_than_the_crop_is_a_clear_error():
    with pytest.raises(ValueError, match="detail_crop_size"):
        sample_detail_box(32, 32, (64, 64), 8)


def test_sliding_windows_cover_the_image_and_stay_inside():
    boxes = slide_boxes(1024, 2048, (1024, 1024), (512, 512))  # HRDA's test windows on Cityscapes
    assert boxes == [(0, 1024, 0, 1024), (0, 1024, 512, 1536), (0, 1024, 1024, 2048)]
    boxes = slide_boxes(100, 70, (64, 64), (32, 32))
    covered = torch.zeros(100, 70)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= 100 and 0 <= x1 < x2 <= 70 and (y2 - y1, x2 - x1) == (64, 64)
        covered[y1:y2, x1:x2] = 1
    assert bool(covered.all())


def _local_model(x):
    """Output a known local function of the input: 4 x 4 means and their squares (stride 4)."""
    pooled = F.avg_pool2d(x, 4)
    return torch.cat([pooled, pooled ** 2], dim=1)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("crop, stride", [((32, 32), (16, 16)), ((32, 48), (32, 48)), ((16, 16), (8, 12))])
def test_sliding_window_of_a_known_local_function_equals_the_whole_image_output(crop, stride, batched):
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    slid = slide_predict(_local_model, images, crop, stride, output_stride=4, batched=batched)
    torch.testing.assert_close(slid, _local_model(images))


class _LocalNet(nn.Module):
    """A segmentor whose every map is a local function of its input (pooling and 1x1 convolutions)."""

    features = "backbone_last"

    def __init__(self):
        super().__init__()
        self.head = _LocalHead(3, 4)

    def levels(self, images):
        return [F.avg_pool2d(images, 4)]


class _LocalHead(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, classes, 1)

    def embed(self, levels):
        return levels[-1]

    def classify(self, embedding):
        return self.conv(embedding)

    def forward(self, levels):
        return self.classify(self.embed(levels))


def test_hrda_detail_by_sliding_windows_equals_the_detail_of_the_whole_image_for_a_local_network():
    torch.manual_seed(0)
    net = _LocalNet()
    options = HRDAOptions(enabled=True, detail_crop_size=[32, 32], test_crop_size=None)
    fusion = MultiResolution(_LocalHead(3, 4), options)
    images = torch.rand(1, 3, 64, 96) * 255
    slid = fusion.encode_decode(net, images)
    options.slide_detail = False
    torch.testing.assert_close(slid, fusion.encode_decode(net, images))
    assert slid.shape == (1, 4, 16, 24)


def _hrda_model(**hrda):
    config = build_config({"method": "source_only", "data": {"classes": ["a", "b", "c"], "source": {"root": "-"}},
                           "model": {"backbone": "mit_b0", "head": "daformer", "head_width": 16,
                                     "hrda": {"enabled": True, "detail_crop_size": [32, 32],
                                              "attention_head": "daformer_attention", **hrda}}})
    torch.manual_seed(0)
    return build_segmentor(config.model, 3)


def test_the_training_forward_fuses_its_own_views_and_inference_slides_at_full_resolution():
    model = _hrda_model(test_crop_size=[64, 64], test_stride=[32, 32]).train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    out = model(images, return_bottleneck=True)
    y1, y2, x1, x2 = out["detail_box"].tolist()
    assert (y2 - y1, x2 - x1) == (32, 32) and y1 % 8 == 0 and x1 % 8 == 0
    assert out["logits"].shape == (2, 3, 16, 16) and out["detail_logits"].shape == (2, 3, 8, 8)
    assert out["bottleneck"].shape[-1] == 1  # the context view (32 x 32) at stride 32
    assert float(out["detail_loss_weight"]) == pytest.approx(0.1)
    model.eval()
    assert model(images)["logits"].shape == (2, 3, 16, 16)  # one test window: at the output stride
    assert model(torch.rand(1, 3, 64, 128) * 255)["logits"].shape == (1, 3, 64, 128)  # windows: full resolution
    assert model(torch.rand(1, 3, 70, 90) * 255)["logits"].shape == (1, 3, 70, 90)  # padded to the grid, cropped back
    assert "hrda" in model.describe() and any("scale_attention" in n for n, _ in model.parameter_parts()["head"])


def test_test_time_aggregation_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="test_time_aggregation"):
        _hrda_model().eval().extract_features(torch.rand(1, 3, 64, 64))


def test_bad_hrda_keys_name_the_key():
    with pytest.raises(ConfigError, match="model.hrda.context_scale"):
        build_config({"method": "source_only", "data": {"classes": ["a"], "source": {"root": "-"}},
                      "model": {"hrda": {"enabled": True, "context_scale": 1.5}}})


def test_the_scale_attention_learns_at_the_heads_rate_as_hrdas_head_key_gives_it():
    from plca.engine.optim import build_optimizer

    model = _hrda_model()
    optimizer = build_optimizer(model, lr=1e-4, head_lr_mult=10.0, kind="adamw")
    attention = {id(p) for p in model.multi_resolution.parameters()}
    by_group = [{id(p) for p in group["params"]} & attention for group in optimizer.param_groups]
    assert set().union(*by_group) == attention
    assert all(group["lr_mult"] == 10.0 for group, ids in zip(optimizer.param_groups, by_group) if ids)


def test_a_box_off_the_context_grid_is_truncated_onto_it_as_hrda_does():
    # output stride 8, crop_divisible 8, scale 0.5 (HRDA's DeepLab-v2 runs): detail pixel 8 is context cell 0.5
    context, detail = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 2, 2)
    fused = fuse_scales(context, detail, torch.ones(1, 1, 4, 4), context_scale=0.5, box=(1, 3, 1, 3))
    # the attention's box on the context grid is int(0.5)..int(1.5) = 0..1: cell 0 only
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 0:1, 0:1] = 1
    inserted = torch.zeros(1, 1, 8, 8)
    inserted[..., 1:3, 1:3] = 1
    up = F.interpolate(mask, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fused, up * inserted)
