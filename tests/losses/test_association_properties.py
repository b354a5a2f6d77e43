"""Property tests: the association loss and spatial aggregation never produce NaN or inf, in the loss
or in its gradients, on degenerate inputs.

Degenerate means: constant maps (every pixel the same vector), zero vectors, one-pixel maps, a
single channel / class, labels that are all ignored or all one class, one-hot and saturated
probabilities for ``kl`` (exact zeros), and tied similarities. Both metrics, both implementations,
with and without spatial aggregation. Maps are tiny so that each example takes milliseconds.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plca.data.labels import IGNORE_INDEX
from plca.losses.association import LOSS_CLAMP, associate, spatial_aggregate

METRICS = ("cos", "kl")
IMPLS = ("dense", "efficient")
IGNORE = IGNORE_INDEX

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])

#: How the values of a map are made (see ``_values``).
COS_KINDS = ("arbitrary", "constant", "zeros", "some_zero_pixels", "ties", "scaled")
KL_KINDS = ("arbitrary", "constant", "zeros", "some_zero_pixels", "one_hot", "saturated", "uniform")
LABEL_KINDS = ("mixed", "all_ignore", "single_class", "one_valid_pixel")


def _values(draw, metric: str, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A ``(B, C, H, W)`` float32 map of the given kind: features for cos, probabilities for kl."""
    b, c, h, w = shape
    count = b * c * h * w
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":  # one vector repeated at every pixel
        vector = draw(st.lists(st.floats(-10, 10, width=32), min_size=c, max_size=c))
        x = torch.tensor(vector).view(1, c, 1, 1).expand(shape).clone()
    elif kind == "ties":  # few distinct values: many exactly equal similarities
        x = torch.tensor(draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=count, max_size=count)))
    elif kind == "scaled":  # tiny or huge magnitudes
        scale = draw(st.sampled_from([1e-30, 1e-12, 1e-6, 1e6, 1e12, 1e30]))
        seed = draw(st.integers(0, 2**31 - 1))
        x = torch.randn(count, generator=torch.Generator().manual_seed(seed)) * scale
    else:  # arbitrary / some_zero_pixels / one_hot / saturated / uniform: start from arbitrary values
        x = torch.tensor(draw(st.lists(st.floats(-100, 100, width=32), min_size=count, max_size=count)))
    x = x.reshape(shape).float()
    if kind == "some_zero_pixels":
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * h * w, max_size=b * h * w)))
        x = x * (~mask).reshape(b, 1, h, w)
    if metric == "cos":
        return x
    if kind == "one_hot":
        return torch.nn.functional.one_hot(x.argmax(dim=1), c).permute(0, 3, 1, 2).float()
    if kind == "saturated":  # softmax of huge logits: exact 0s and 1s in float32
        return (x * 1e4).softmax(dim=1)
    if kind == "uniform":
        return torch.full(shape, 1.0 / c)
    # non-negative values normalised per pixel; an all-zero pixel stays a zero vector
    x = x.abs()
    total = x.sum(dim=1, keepdim=True)
    return torch.where(total > 0, x / total.clamp(min=1e-30), x)


def _labels(draw, kind: str, shape: tuple[int, int, int], classes: int) -> torch.Tensor:
    b, h, w = shape
    count = b * h * w
    if kind == "all_ignore":
        return torch.full(shape, IGNORE, dtype=torch.long)
    if kind == "single_class":
        return torch.full(shape, draw(st.integers(0, classes - 1)), dtype=torch.long)
    if kind == "one_valid_pixel":
        labels = torch.full((count,), IGNORE, dtype=torch.long)
        labels[draw(st.integers(0, count - 1))] = draw(st.integers(0, classes - 1))
        return labels.reshape(shape)
    values = draw(st.lists(st.sampled_from([*range(classes), IGNORE]), min_size=count, max_size=count))
    return torch.tensor(values, dtype=torch.long).reshape(shape)


@st.composite
def association_inputs(draw, metric: str):
    """``(source, target, source_labels, description)``: tiny maps, often one-pixel, of degenerate kinds."""
    batch = draw(st.integers(1, 2))
    channels = draw(st.integers(1, 4))
    source_size = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    target_size = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kinds = COS_KINDS if metric == "cos" else KL_KINDS
    source_kind, target_kind = draw(st.sampled_from(kinds)), draw(st.sampled_from(kinds))
    label_kind = draw(st.sampled_from(LABEL_KINDS))
    source = _values(draw, metric, source_kind, (batch, channels, *source_size))
    target = _values(draw, metric, target_kind, (batch, channels, *target_size))
    labels = _labels(draw, label_kind, (batch, *source_size), classes=draw(st.integers(1, 3)))
    return source, target, labels, f"source {source_kind}, target {target_kind}, labels {label_kind}"


def check_finite_association(source, target, labels, metric, impl, aggregate, what):
    source = source.clone().requires_grad_(True)
    target = target.clone().requires_grad_(True)
    out = associate(source, target, labels, metric=metric, aggregate=aggregate, impl=impl)
    out.loss.backward()
    where = f"{metric}/{impl}/aggregate={aggregate}: {what}"
    assert torch.isfinite(out.loss), f"loss {out.loss.item()} ({where})"
    assert 0.0 <= out.loss.item() <= 2 * LOSS_CLAMP, where
    assert torch.isfinite(source.grad).all(), f"non-finite source gradient ({where})"
    assert torch.isfinite(target.grad).all(), f"non-finite target gradient ({where})"
    for name in ("positive_ratio", "cover_ratio"):
        value = getattr(out, name).item()
        assert 0.0 <= value <= 1.0, f"{name} {value} ({where})"
    if bool((labels == IGNORE).all()):
        assert out.loss.item() == 0.0 and source.grad.abs().max() == 0, where
    return out


@pytest.mark.parametrize("aggregate", [False, True], ids=["plain", "aggregate"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_loss_and_gradients_are_finite_on_degenerate_inputs(metric, impl, aggregate):
    @PROPERTY_SETTINGS
    @given(inputs=association_inputs(metric))
    def run(inputs):
        source, target, labels, what = inputs
        check_finite_association(source, target, labels, metric, impl, aggregate, what)

    run()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_spatial_aggregation_is_finite_on_degenerate_inputs(metric, impl):
    @PROPERTY_SETTINGS
    @given(inputs=association_inputs(metric))
    def run(inputs):
        _, target, _, what = inputs
        target = target.clone().requires_grad_(True)
        out = spatial_aggregate(target, metric, alpha=0.5, impl=impl)
        out.square().sum().backward()
        assert torch.isfinite(out).all(), f"{metric}/{impl}: {what}"
        assert torch.isfinite(target.grad).all(), f"{metric}/{impl} gradient: {what}"

    run()


def _one_hot(indices: list[list[int]], channels: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(indices), channels).permute(2, 0, 1)[None].float()


#: Each degenerate input, spelled out: (source, target, labels) per metric.
NAMED_CASES = {
    "constant_features": lambda metric: (torch.full((1, 3, 2, 3), 0.7), torch.full((1, 3, 3, 2), 0.7),
                                         torch.tensor([[[0, 1, 0], [1, 0, 1]]])),
    "zero_vectors": lambda metric: (torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2), torch.zeros(2, 2, 2).long()),
    "single_class_labels": lambda metric: (torch.rand(1, 3, 3, 3), torch.rand(1, 3, 3, 3),
                                           torch.zeros(1, 3, 3).long()),
    "all_ignore_labels": lambda metric: (torch.rand(1, 3, 3, 3), torch.rand(1, 3, 3, 3),
                                         torch.full((1, 3, 3), IGNORE)),
    "one_pixel_maps": lambda metric: (torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1), torch.zeros(1, 1, 1).long()),
    "one_pixel_source_large_target": lambda metric: (torch.rand(1, 3, 1, 1), torch.rand(1, 3, 3, 3),
                                                     torch.ones(1, 1, 1).long()),
    "single_channel": lambda metric: (torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.tensor([[[0, 1], [1, 0]]])),
    "one_hot_probabilities": lambda metric: (_one_hot([[0, 1], [2, 0]], 3), _one_hot([[1, 1], [0, 2]], 3),
                                             torch.tensor([[[0, 1], [2, 0]]])),
    "identical_one_hot_maps": lambda metric: (_one_hot([[0, 0], [0, 0]], 3), _one_hot([[0, 0], [0, 0]], 3),
                                              torch.zeros(1, 2, 2).long()),
    "saturated_probabilities": lambda metric: ((torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
                                                * 1e4).softmax(dim=1),
                                               (torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
                                                * 1e4).softmax(dim=1),
                                               torch.tensor([[[0, 1, 2], [3, 0, 1], [2, 3, IGNORE]]])),
}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", sorted(NAMED_CASES))
def test_named_degenerate_inputs(case, metric):
    source, target, labels = NAMED_CASES[case](metric)
    for impl in IMPLS:
        for aggregate in (False, True):
            out = check_finite_association(source, target, labels, metric, impl, aggregate, case)
            if case in ("constant_features", "identical_one_hot_maps", "single_class_labels", "one_pixel_maps"):
                # the case reaches the loss itself: some cycles are positive (ties go to the first pixel)
                assert out.positive_ratio.item() > 0, (case, metric, impl, aggregate)
