"""Batch reduction of the association loss (positives pooled over the batch, the reference's, or
per-pair means), the exposed cycles ``j(i)`` / ``i'(i)``, and the precision of the products under
autocast, against the nested-loop reference (docs/method.md)."""

from __future__ import annotations

import pytest
import torch

import association_reference as reference
from test_association import make_maps
from plca import associate, association_loss
from plca.data.labels import IGNORE_INDEX

METRICS = ("cos", "kl")
IMPLS = ("dense", "efficient")


def unequal_batch(metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two pairs, 4 x 4 source and 3 x 4 target maps, 2 classes; the second pair keeps only 4 valid
    source pixels, so the two pairs have very different positive counts."""
    source, target = make_maps(metric, 2, 4, (4, 4), (3, 4), seed=17)
    labels = torch.randint(0, 2, (2, 4, 4), generator=torch.Generator().manual_seed(18))
    labels[1].view(-1)[4:] = IGNORE_INDEX
    return source, target, labels


def loss_and_grads(fn, source, target):
    source = source.detach().clone().requires_grad_(True)
    target = target.detach().clone().requires_grad_(True)
    loss = fn(source, target)
    grads = torch.autograd.grad(loss, (source, target), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (source, target))]
    return loss.detach(), *grads


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


def positives_per_pair(source, target, labels, metric, aggregate) -> list[int]:
    return [len(reference.pair(source[b], target[b], labels[b], metric, aggregate, 0.5, IGNORE_INDEX)[0])
            for b in range(source.shape[0])]


@pytest.mark.parametrize("aggregate", [False, True], ids=["plain", "aggregate"])
@pytest.mark.parametrize("metric", METRICS)
def test_pooled_and_pair_means_match_the_nested_reference(metric, aggregate):
    source, target, labels = unequal_batch(metric)
    counts = positives_per_pair(source, target, labels, metric, aggregate)
    assert counts[0] > 2 * counts[1] > 0, counts  # unequal, and both pairs in the loss

    results = {}
    for reduction in ("pooled", "pairs"):
        want = loss_and_grads(lambda s, t, reduction=reduction: reference.associate(
            s, t, labels, metric, aggregate, reduction=reduction)[0], source, target)
        for impl in IMPLS:
            got = loss_and_grads(lambda s, t, impl=impl, reduction=reduction: association_loss(
                s, t, labels, metric, aggregate, impl=impl, reduction=reduction), source, target)
            for name, a, b in zip(("loss", "source grad", "target grad"), got, want):
                assert rel_diff(a, b) < 1e-4, (reduction, impl, name, rel_diff(a, b))
        results[reduction] = want

    pooled, pairs = results["pooled"], results["pairs"]
    assert abs(pooled[0].item() - pairs[0].item()) > 1e-3 * pooled[0].item()
    assert rel_diff(pooled[1], pairs[1]) > 1e-2 and rel_diff(pooled[2], pairs[2]) > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_default_reduction_is_pooled(impl):
    source, target, labels = unequal_batch("cos")
    default = association_loss(source, target, labels, "cos", impl=impl)
    pooled = association_loss(source, target, labels, "cos", impl=impl, reduction="pooled")
    assert default.item() == pooled.item()
    assert associate(source, target, labels, "cos", impl=impl).loss.item() == pooled.item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_a_pair_without_positives_weighs_nothing_pooled_and_zero_per_pair(metric, impl):
    """Pair 1 has no valid pixel: the pooled loss is pair 0's own mean, the per-pair mean half of it;
    a batch without any positive costs 0 with a zero gradient in both reductions."""
    source, target, labels = unequal_batch(metric)
    labels[1] = IGNORE_INDEX
    alone = association_loss(source[:1], target[:1], labels[:1], metric, impl=impl)
    pooled = association_loss(source, target, labels, metric, impl=impl)
    pairs = association_loss(source, target, labels, metric, impl=impl, reduction="pairs")
    assert alone.item() > 0
    assert pooled.item() == pytest.approx(alone.item(), rel=1e-12)
    assert pairs.item() == pytest.approx(alone.item() / 2, rel=1e-12)
    labels[:] = IGNORE_INDEX
    for reduction in ("pooled", "pairs"):
        loss, grad_source, grad_target = loss_and_grads(
            lambda s, t, reduction=reduction: association_loss(s, t, labels, metric, impl=impl, reduction=reduction),
            source, target)
        assert loss.item() == 0.0
        assert grad_source.abs().max() == 0 and grad_target.abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_cycles_are_exposed_per_source_pixel(metric, impl):
    source, target, labels = unequal_batch(metric)
    *_, j, i_prime = reference.associate_with_cycles(source, target, labels, metric, True)
    out = associate(source, target, labels, metric, impl=impl)
    assert out.j.shape == out.i_prime.shape == (2, 16) and out.j.dtype == torch.long
    assert out.j.tolist() == j and out.i_prime.tolist() == i_prime
    assert (out.j[labels.view(2, -1) == IGNORE_INDEX] == -1).all()


# --------------------------------------------------------------------------- precision under autocast


def realistic_batch(metric: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 maps of 16 x 16 pixels (N = M = 256) with 64 channels (cos) or 19 classes (kl)."""
    channels = 64 if metric == "cos" else 19
    source, target = make_maps(metric, 2, channels, (16, 16), (16, 16), seed=seed, dtype=torch.float32)
    labels = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(seed + 1))
    return source, target, labels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_autocast_keeps_float32_products_by_default(metric, impl):
    """Under CPU bfloat16 autocast the default gives the cycles and the loss of float32 (the products
    run in float32); ``similarity_dtype="autocast"`` really runs them in bfloat16 here, which flips
    some top-1 associations on these inputs."""
    source, target, labels = realistic_batch(metric, seed=3)
    plain = associate(source, target, labels, metric, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        default = associate(source, target, labels, metric, impl=impl)
        reduced = associate(source, target, labels, metric, impl=impl, similarity_dtype="autocast")
    assert default.loss.dtype == torch.float32
    assert torch.equal(default.j, plain.j) and torch.equal(default.i_prime, plain.i_prime)
    assert default.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    flipped = (reduced.j != plain.j) | (reduced.i_prime != plain.i_prime)
    assert flipped.any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_gradients_under_autocast_default_equal_float32(metric, impl):
    """Forward under autocast, backward after it (as autocast's documentation asks)."""
    source, target, labels = realistic_batch(metric, seed=5)
    plain = loss_and_grads(lambda s, t: association_loss(s, t, labels, metric, impl=impl), source, target)

    def under_autocast(s, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return association_loss(s, t, labels, metric, impl=impl)

    mixed = loss_and_grads(under_autocast, source, target)
    for a, b in zip(mixed, plain):
        assert rel_diff(a, b) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs_are_cast_up_for_the_products(impl):
    """bfloat16 maps (a network run under autocast) are cast to float32: the result is that of the
    float32 copies of the same values."""
    source, target, labels = realistic_batch("cos", seed=7)
    source, target = source.bfloat16(), target.bfloat16()
    low = associate(source, target, labels, "cos", impl=impl)
    up = associate(source.float(), target.float(), labels, "cos", impl=impl)
    assert torch.equal(low.j, up.j) and torch.equal(low.i_prime, up.i_prime)
    assert low.loss.item() == pytest.approx(up.loss.item(), rel=1e-6)


def test_forced_bfloat16_products_match_autocast_products():
    source, target, labels = realistic_batch("cos", seed=3)
    forced = associate(source, target, labels, "cos", impl="dense", similarity_dtype="bfloat16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reduced = associate(source, target, labels, "cos", impl="dense", similarity_dtype="autocast")
    assert torch.equal(forced.j, reduced.j) and torch.equal(forced.i_prime, reduced.i_prime)
