"""The bounded test-time aggregation: unchanged under the bound, the dense reference per window above
it, an estimate before a large map and a cost linear in its area."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plca.evaluation import aggregation
from plca.evaluation.aggregation import (AggregationBudgetError, bounded_spatial_aggregate, plan_aggregation,
                                         window_shape)
from plca.evaluation.evaluator import predict_scores
from plca.losses.association import dense_spatial_aggregate, spatial_aggregate


class StrideEight(nn.Module):
    """A segmentor's test-time interface: features at 1/8 (average pool, 1x1 conv), 1x1 classifier."""

    def __init__(self, channels: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.num_classes = num_classes
        self.embed = nn.Conv2d(3, channels, 1)
        self.head = nn.Conv2d(channels, num_classes, 1)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(F.avg_pool2d(images / 255.0, 8))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> dict:
        return {"logits": self.classify(self.extract_features(images))}


def nearest_window_reference(x: torch.Tensor, metric: str, alpha: float, max_pixels: int) -> torch.Tensor:
    """Each pixel's value from the dense reference on the window (same size, starts every ceil(2/3)
    of it, the last on the border) whose centre is nearest to the pixel's centre, ties to the earlier."""
    _, _, height, width = x.shape
    win_h, win_w = window_shape(height, width, max_pixels)

    def starts(length: int, window: int) -> list[int]:
        stride = -(-2 * window // 3)
        found = list(range(0, length - window + 1, stride))
        return found if found[-1] == length - window else found + [length - window]

    def nearest(p: int, found: list[int], window: int) -> int:
        distances = [abs(p + 0.5 - (s + window / 2)) for s in found]
        return found[distances.index(min(distances))]

    tops, lefts = starts(height, win_h), starts(width, win_w)
    dense = {(t, l): dense_spatial_aggregate(x[:, :, t:t + win_h, l:l + win_w], metric, alpha)
             for t in tops for l in lefts}
    out = torch.empty_like(x)
    for row in range(height):
        for col in range(width):
            t, l = nearest(row, tops, win_h), nearest(col, lefts, win_w)
            out[:, :, row, col] = dense[(t, l)][:, :, row - t, col - l]
    return out


def features(shape: tuple[int, ...], metric: str, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.softmax(dim=1) if metric == "kl" else x


@pytest.mark.parametrize("metric", ["cos", "kl"])
def test_under_the_bound_the_aggregation_is_the_same_call_as_before(metric):
    x = features((2, 6, 12, 16), metric)
    got = bounded_spatial_aggregate(x, metric, 0.5, max_pixels=12 * 16)
    assert torch.equal(got, spatial_aggregate(x, metric, 0.5))
    torch.testing.assert_close(got, dense_spatial_aggregate(x, metric, 0.5), rtol=1e-5, atol=1e-6)
    assert torch.equal(bounded_spatial_aggregate(x, metric, 0.5, max_pixels=None), got)


def test_predict_scores_under_the_bound_equals_the_unbounded_composition():
    model = StrideEight().eval()
    images = torch.rand(1, 3, 96, 128) * 255
    with torch.no_grad():  # what predict_scores computed before the bound
        aggregated = spatial_aggregate(model.extract_features(images), "cos", 0.5)
        expected = spatial_aggregate(model.classify(aggregated).softmax(1), "kl", 0.5)
    assert torch.equal(predict_scores(model, images, True, 0.5), expected)


@pytest.mark.parametrize("metric", ["cos", "kl"])
@pytest.mark.parametrize("shape, max_pixels", [((13, 29), 64), ((9, 40), 50), ((30, 7), 40)])
def test_above_the_bound_each_pixel_is_the_dense_reference_on_its_nearest_window(metric, shape, max_pixels):
    x = features((2, 5, *shape), metric, seed=1)
    got = bounded_spatial_aggregate(x, metric, 0.4, max_pixels)
    torch.testing.assert_close(got, nearest_window_reference(x, metric, 0.4, max_pixels), rtol=1e-5, atol=1e-6)
    # and it is not the global aggregation: the bound changed something
    assert not torch.allclose(got, spatial_aggregate(x, metric, 0.4), atol=1e-4)


@pytest.mark.parametrize("height, width, max_pixels", [(13, 29, 64), (500, 375, 32768), (128, 257, 32768),
                                                       (3, 900, 100), (181, 181, 32761), (1, 1, 1)])
def test_the_plan_s_windows_fit_the_bound_and_their_cores_tile_the_map(height, width, max_pixels):
    plan = plan_aggregation(height, width, max_pixels)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for w in plan.windows:
        assert w.height * w.width <= max_pixels
        assert 0 <= w.top <= w.rows[0] < w.rows[1] <= w.top + w.height <= height
        assert 0 <= w.left <= w.cols[0] < w.cols[1] <= w.left + w.width <= width
        covered[w.rows[0]:w.rows[1], w.cols[0]:w.cols[1]] += 1
    assert bool((covered == 1).all())
    assert plan.exact == (height * width <= max_pixels)
    assert plan.pairs <= 4 * height * width * max_pixels  # the documented bound (exact: pixels ** 2)


def test_cityscapes_at_stride_8_stays_exact_under_the_default_bound():
    assert plan_aggregation(128, 256).exact
    assert not plan_aggregation(129, 256).exact


def test_a_large_image_gets_an_estimate_and_a_linear_cost(capsys, monkeypatch):
    """A 1536 x 2048 image at stride 8 (192 x 256 = 49,152 feature pixels) under a bound of 1,024:
    the estimate (pairs x channels / rate) is printed before the aggregation, every aggregation call
    stays within the bound and the pairs computed stay within 4 N x bound (exact: N^2, 12x more)."""
    calls = []
    real = aggregation.spatial_aggregate

    def counting(x, metric, alpha=0.5):
        calls.append((metric, x.shape[-2] * x.shape[-1]))
        return real(x, metric, alpha)

    monkeypatch.setattr(aggregation, "spatial_aggregate", counting)
    monkeypatch.setattr(aggregation, "measured_rate", lambda like, metric: 1e7 if metric == "cos" else 2e7)
    monkeypatch.setattr(aggregation, "_ANNOUNCED", set())
    pairs = plan_aggregation(192, 256, 1024).pairs
    model = StrideEight().eval()
    images = torch.rand(1, 3, 1536, 2048) * 255
    probs = predict_scores(model, images, True, 0.5, aggregation_max_pixels=1024)
    printed = capsys.readouterr().out
    assert "test-time aggregation: 192 x 256 feature map (49,152 pixels) > eval.aggregation_max_pixels=1,024" in printed
    assert f"windows of 32 x 32; about {pairs * 8 / 1e7 + pairs * 5 / 2e7:,.1f} s per 1 image(s)" in printed
    window_calls = [pixels for metric, pixels in calls]
    assert len(window_calls) == 2 * len(plan_aggregation(192, 256, 1024).windows) and max(window_calls) <= 1024
    pixels = 192 * 256
    assert sum(p * p for p in window_calls) <= 2 * 4 * pixels * 1024 < 2 * pixels ** 2 / 6
    assert probs.shape == (1, 5, 192, 256)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 192, 256))
    # printed once per map size: a second image of the same size says nothing more
    predict_scores(model, images[:, :, :, :], True, 0.5, aggregation_max_pixels=1024)
    assert "test-time aggregation" not in capsys.readouterr().out


def test_the_free_memory_is_known_on_this_machine():
    assert aggregation.free_memory_bytes(torch.device("cpu")) > 0


def test_exact_aggregation_beyond_the_free_memory_is_refused_with_what_to_set(monkeypatch):
    monkeypatch.setattr(aggregation, "free_memory_bytes", lambda device: 1 << 20)
    model = StrideEight().eval()
    with pytest.raises(AggregationBudgetError) as error:
        predict_scores(model, torch.rand(1, 3, 1032, 2048) * 255, True, 0.5, aggregation_max_pixels=None)
    message = str(error.value)
    assert "129 x 256 feature map (33,024 pixels" in message and "set eval.aggregation_max_pixels=32768" in message
    # within the default bound exact aggregation is never refused (it is what ran before)
    predict_scores(model, torch.rand(1, 3, 64, 64) * 255, True, 0.5, aggregation_max_pixels=None)


def test_the_config_key_is_checked():
    from pathlib import Path

    from plca.config import ConfigError, load_config

    config = Path(__file__).resolve().parents[2] / "configs" / "cityscapes2acdc_plca.yaml"
    assert load_config(config).eval.aggregation_max_pixels == 32768
    assert load_config(config, ["eval.aggregation_max_pixels=null"]).eval.aggregation_max_pixels is None
    with pytest.raises(ConfigError, match="eval.aggregation_max_pixels must be null or a positive number"):
        load_config(config, ["eval.aggregation_max_pixels=0"])


def test_predict_full_bounds_the_aggregation_of_each_pass(capsys, monkeypatch):
    """``plca predict``'s inference (whole image) goes through the bound and prints its estimate."""
    monkeypatch.setattr(aggregation, "_ANNOUNCED", set())
    monkeypatch.setattr(aggregation, "_CALIBRATION_WORK", 1e7)
    from plca.tools.predict import InferenceOptions, predict_full

    model = StrideEight().eval()
    images = (torch.rand(1, 3, 384, 512) * 255).to(torch.uint8)
    bounded = predict_full(model, images, InferenceOptions(test_time_aggregation=True, aggregation_max_pixels=300))
    assert "48 x 64 feature map (3,072 pixels) > eval.aggregation_max_pixels=300" in capsys.readouterr().out
    exact = predict_full(model, images, InferenceOptions(test_time_aggregation=True, aggregation_max_pixels=None))
    assert capsys.readouterr().out == ""  # exact within the default bound: nothing to announce
    assert bounded.shape == exact.shape == (1, 5, 384, 512)
    assert not torch.allclose(bounded, exact, atol=1e-5)
    with pytest.raises(Exception, match="eval.aggregation_max_pixels must be null or a positive"):
        InferenceOptions(test_time_aggregation=True, aggregation_max_pixels=0)


def test_the_rate_is_measured_once_per_device_metric_and_channels(monkeypatch):
    monkeypatch.setattr(aggregation, "_RATES", {})
    monkeypatch.setattr(aggregation, "_CALIBRATION_WORK", 1e7)
    calls = []
    real = aggregation.spatial_aggregate
    monkeypatch.setattr(aggregation, "spatial_aggregate", lambda x, metric: calls.append(x.shape) or real(x, metric))
    like = torch.zeros(1, 16, 4, 4)
    rate = aggregation.measured_rate(like, "cos")
    side = aggregation.calibration_side(16)
    assert 0 < rate < float("inf") and calls[-1] == (1, 16, side, side) and side ** 4 * 16 >= 0.5e7
    assert aggregation.measured_rate(like, "cos") == rate and len(calls) == 2  # cached: no new timing
    aggregation.measured_rate(like, "kl")
    assert len(calls) == 4
