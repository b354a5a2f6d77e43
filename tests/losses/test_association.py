"""The association loss and spatial aggregation against the nested-loop reference (docs/method.md),
and the blockwise implementation against the dense one."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import association_reference as reference
from plca import association_loss, associate, spatial_aggregate
from plca.data.labels import IGNORE_INDEX
from plca.losses import association_efficient as efficient

METRICS = ("cos", "kl")
IMPLS = ("dense", "efficient")


def make_maps(metric: str, batch: int, channels: int, source_size: tuple[int, int], target_size: tuple[int, int],
              seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random source / target maps: features for cos, softmax probabilities for kl."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, channels, *source_size, generator=g, dtype=dtype)
    target = torch.randn(batch, channels, *target_size, generator=g, dtype=dtype)
    if metric == "kl":
        source, target = (2 * source).softmax(dim=1), (2 * target).softmax(dim=1)
    return source, target


def make_labels(batch: int, size: tuple[int, int], classes: int, ignore_fraction: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch, *size), generator=g)
    labels[torch.rand(batch, *size, generator=g) < ignore_fraction] = IGNORE_INDEX
    return labels


def loss_and_grads(fn, source: torch.Tensor, target: torch.Tensor):
    source = source.detach().clone().requires_grad_(True)
    target = target.detach().clone().requires_grad_(True)
    loss = fn(source, target)
    grad_source, grad_target = torch.autograd.grad(loss, (source, target), allow_unused=True)
    grad_source = torch.zeros_like(source) if grad_source is None else grad_source
    grad_target = torch.zeros_like(target) if grad_target is None else grad_target
    return loss.detach(), grad_source, grad_target


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


CASES = [
    # (batch, channels, source size, target size, aggregate, ignore fraction)
    (1, 3, (3, 4), (3, 4), False, 0.0),
    (2, 4, (3, 3), (2, 5), True, 0.2),
    (1, 5, (4, 3), (3, 3), True, 0.0),
    (2, 3, (2, 4), (4, 4), False, 0.3),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}c{c[1]}s{c[2]}t{c[3]}agg{int(c[4])}ign{c[5]}")
def test_loss_and_gradients_match_nested_reference(metric, impl, case):
    batch, channels, source_size, target_size, aggregate, ignore = case
    source, target = make_maps(metric, batch, channels, source_size, target_size, seed=hash(case) % 1000)
    # few classes so that cycles are often positive
    labels = make_labels(batch, source_size, classes=2, ignore_fraction=ignore)

    ref_loss, ref_gs, ref_gt = loss_and_grads(
        lambda s, t: reference.associate(s, t, labels, metric, aggregate)[0], source, target)
    loss, gs, gt = loss_and_grads(
        lambda s, t: association_loss(s, t, labels, metric=metric, aggregate=aggregate, impl=impl),
        source, target)
    assert ref_loss.item() > 0, "the case should have positive cycles"
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-9)
    assert rel_diff(gs, ref_gs) < 1e-8 and rel_diff(gt, ref_gt) < 1e-8
    assert ref_gs.abs().sum() > 0 and ref_gt.abs().sum() > 0

    _, ref_positive, ref_cover = reference.associate(source, target, labels, metric, aggregate)
    out = associate(source, target, labels, metric=metric, aggregate=aggregate, impl=impl)
    assert out.positive_ratio.item() == pytest.approx(ref_positive, abs=1e-6)
    assert out.cover_ratio.item() == pytest.approx(ref_cover, abs=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_spatial_aggregation_matches_nested_reference(metric, impl):
    x, _ = make_maps(metric, 2, 3, (3, 4), (1, 1), seed=5)
    alpha = 0.3
    ref, ref_grad, _ = loss_and_grads(lambda a, _: (reference.aggregate_map(a, metric, alpha) ** 2).sum(), x, x)
    out, grad, _ = loss_and_grads(lambda a, _: (spatial_aggregate(a, metric, alpha, impl=impl) ** 2).sum(), x, x)
    assert out.item() == pytest.approx(ref.item(), rel=1e-10)
    assert rel_diff(grad, ref_grad) < 1e-9
    aggregated = spatial_aggregate(x, metric, alpha, impl=impl)
    assert rel_diff(aggregated, reference.aggregate_map(x, metric, alpha)) < 1e-10
    assert not torch.allclose(aggregated, x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_first_pixel(metric, impl):
    """Duplicated target pixels: j(i) is the first copy (cover ratio shows it); duplicated source
    pixels with different labels: i'(j) is the first copy (positives show it)."""
    base_source, base_target = make_maps(metric, 1, 3, (1, 3), (1, 3), seed=11)
    target = torch.cat([base_target, base_target], dim=3)  # pixel k and k + 3 are equal
    source = torch.cat([base_source, base_source], dim=3)
    labels = torch.tensor([[[0, 1, 0, 1, 0, 1]]])
    _, ref_positive, ref_cover = reference.associate(source, target, labels, metric, aggregate_target=False)
    out = associate(source, target, labels, metric=metric, aggregate=False, impl=impl)
    assert ref_cover <= 0.5  # only first copies are ever reached
    assert out.cover_ratio.item() == pytest.approx(ref_cover)
    assert out.positive_ratio.item() == pytest.approx(ref_positive)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_no_positive_gives_zero_loss_and_zero_finite_gradients(metric, impl):
    # all ignored
    source, target = make_maps(metric, 2, 4, (3, 3), (2, 2))
    labels = torch.full((2, 3, 3), IGNORE_INDEX)
    loss, gs, gt = loss_and_grads(lambda s, t: association_loss(s, t, labels, metric=metric, impl=impl),
                                  source, target)
    assert loss.item() == 0.0 and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert gs.abs().max() == 0 and gt.abs().max() == 0

    # valid pixels but every cycle comes back to a pixel of the other class
    source = torch.tensor([[[[4.0, 0.0]], [[0.0, 4.0]]]], dtype=torch.float64)  # pixel 0 ~ e1, pixel 1 ~ e2
    target = torch.tensor([[[[4.0]], [[0.5]]]], dtype=torch.float64)  # one target pixel, close to e1
    if metric == "kl":
        source, target = source.softmax(dim=1), target.softmax(dim=1)
    labels = torch.tensor([[[IGNORE_INDEX, 1]]])  # the only valid pixel (1) comes back to pixel 0
    out = associate(source, target, labels, metric=metric, aggregate=False, impl=impl)
    assert out.loss.item() == 0.0 and out.positive_ratio.item() == 0.0
    assert reference.associate(source, target, labels, metric, aggregate_target=False)[1] == 0.0


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("aggregate", [False, True])
@pytest.mark.parametrize("shape", [((6, 7), (5, 9), 16), ((9, 9), (9, 9), 5), ((4, 12), (10, 3), 33)])
def test_efficient_equals_dense_float32(metric, aggregate, shape):
    source_size, target_size, channels = shape
    source, target = make_maps(metric, 2, channels, source_size, target_size, seed=3, dtype=torch.float32)
    labels = make_labels(2, source_size, classes=3, ignore_fraction=0.25)
    dense = loss_and_grads(lambda s, t: association_loss(s, t, labels, metric, aggregate, impl="dense"),
                           source, target)
    for block_size in (None, 7):  # one block and several blocks of rows
        efficient = loss_and_grads(
            lambda s, t, block_size=block_size: association_loss(s, t, labels, metric, aggregate, impl="efficient",
                                                                 block_size=block_size), source, target)
        for want, got in zip(dense, efficient):
            assert rel_diff(got, want) < 1e-4
    assert dense[0].item() > 0


@pytest.mark.parametrize("metric", METRICS)
def test_target_accuracy_counts_cycles_landing_on_the_right_class(metric):
    source, target = make_maps(metric, 1, 3, (3, 3), (3, 3), seed=7)
    labels = make_labels(1, (3, 3), classes=2, ignore_fraction=0.0)
    same = associate(source, source.clone(), labels, metric=metric, aggregate=False, target_labels=labels)
    assert same.target_accuracy.item() == 1.0  # source == target: every j(i) is i itself
    flipped = associate(source, source.clone(), labels, metric=metric, aggregate=False, target_labels=1 - labels)
    assert flipped.target_accuracy.item() == 0.0
    # the diagnostic never changes the loss
    plain = associate(source, source.clone(), labels, metric=metric, aggregate=False)
    assert plain.loss.item() == same.loss.item() and plain.target_accuracy is None


def test_bad_arguments_are_named():
    source, target = make_maps("cos", 2, 3, (3, 3), (3, 3))
    labels = make_labels(2, (3, 3), 2, 0.0)
    with pytest.raises(ValueError, match="metric"):
        association_loss(source, target, labels, metric="l2")
    with pytest.raises(ValueError, match="impl"):
        association_loss(source, target, labels, impl="fast")
    with pytest.raises(ValueError, match="source_labels"):
        association_loss(source, target, labels[:, :2])
    with pytest.raises(ValueError, match="batch size"):
        association_loss(source, target[:1], labels)
    with pytest.raises(ValueError, match="channel"):
        association_loss(source, target[:, :2], labels)
    with pytest.raises(ValueError, match="alpha"):
        association_loss(source, target, labels, alpha=1.5)
    with pytest.raises(ValueError, match="reduction"):
        association_loss(source, target, labels, reduction="mean")
    with pytest.raises(ValueError, match="similarity_dtype"):
        association_loss(source, target, labels, similarity_dtype="float16")
    with pytest.raises(ValueError, match="similarity_dtype"):
        spatial_aggregate(source, "cos", similarity_dtype="half")


# --------------------------------------------------------------------------- aggregation backends (SDPA)

BACKENDS = ("blockwise", "sdpa")


@pytest.mark.parametrize("kind", ["gaussian", "relu"])
@pytest.mark.parametrize("shape", [(300, 16), (40, 64)], ids=["covariance", "products"])
def test_covariance_row_scale_equals_row_std_of_the_similarity(kind, shape):
    """1 / scale - 1e-10 is the unbiased std of each row of q @ k.T, from the keys' covariance when
    2C < n (else from blocks of the products); post-ReLU-like features have a large common mean,
    the case where an uncentred E[s^2] - E[s]^2 would cancel."""
    n, c = shape
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(n, c, generator=g), torch.randn(n // 3, c, generator=g)
    if kind == "relu":
        keys, queries = torch.relu(keys + 0.5), torch.relu(queries + 0.5)
    keys, queries = F.normalize(keys, dim=1), F.normalize(queries, dim=1)
    exact = (queries.double() @ keys.double().t()).std(dim=1)
    dense32 = (queries @ keys.t()).std(dim=1).double()
    std32 = 1 / efficient.covariance_row_scale(queries, keys, block=7).double() - 1e-10
    assert rel_diff(std32, exact) < 1e-5
    assert rel_diff(std32, exact) < 10 * rel_diff(dense32, exact) + 1e-7  # as good as the dense float32 std
    std64 = 1 / efficient.covariance_row_scale(queries.double(), keys.double(), block=7) - 1e-10
    assert rel_diff(std64, exact) < 1e-12


def test_covariance_row_scale_edge_cases_and_autocast():
    x = F.normalize(torch.randn(30, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    single = efficient.covariance_row_scale(x, x[:1], block=8)  # one key: std 0
    assert torch.equal(single, torch.full((30,), 1e10))
    plain = efficient.covariance_row_scale(x, x, block=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = efficient.covariance_row_scale(x, x, block=8)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(7, 9, 5), (6, 11, 40)], ids=["covariance", "products"])
def test_aggregation_backends_equal_dense(metric, backend, dtype, shape):
    """Value and gradient of both backends against dense; the SDPA path must find a fused kernel
    (no fallback warning) for non-contiguous maps whose channel count is not a multiple of 8."""
    h, w, c = shape
    x, _ = make_maps(metric, 2, c, (h, w), (1, 1), seed=4, dtype=dtype)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    dense = loss_and_grads(lambda a, _: (spatial_aggregate(a, metric, 0.4, impl="dense") * weight).sum(), x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = loss_and_grads(lambda a, _: (efficient.efficient_spatial_aggregate(
            a, metric, 0.4, block_size=5, backend=backend) * weight).sum(), x, x)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_diff(got[0], dense[0]) < tolerance and rel_diff(got[1], dense[1]) < tolerance


@pytest.mark.parametrize("heads", [1, 2, 3, 5])
def test_sdpa_query_groups_do_not_change_the_result(heads):
    """The query rows split into groups ("heads") sharing keys and values, the last one zero-padded."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(13, 6, generator=g, dtype=torch.float64) for _ in range(3))
    scale = torch.rand(13, generator=g, dtype=torch.float64) + 0.5
    weight = torch.randn(13, 6, generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad((out * weight).sum(), leaves)]

    want = grads(lambda a, b, c: torch.lerp(c, (scale[:, None] * a @ b.t()).softmax(dim=1) @ c, 0.3))
    got = grads(lambda a, b, c: efficient.sdpa_aggregate(a, b, c, 0.3, scale, torch.float64, heads=heads))
    for x, y in zip(got, want):
        assert rel_diff(x, y) < 1e-12


def test_sdpa_without_a_fused_kernel_falls_back_to_blockwise(monkeypatch):
    """Never SDPA's math fallback (an M x M matrix): no fused kernel -> the blockwise path, with a warning."""
    def no_kernel(*args, **kwargs):
        raise RuntimeError("No available kernel.  Aborting execution.")

    x, _ = make_maps("kl", 1, 4, (3, 5), (1, 1), seed=6, dtype=torch.float32)
    blockwise = efficient.efficient_spatial_aggregate(x, "kl", 0.5, backend="blockwise")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_kernel)
    with pytest.warns(RuntimeWarning, match="blockwise"):
        fallback = efficient.efficient_spatial_aggregate(x, "kl", 0.5, backend="sdpa")
    assert torch.equal(fallback, blockwise)


def test_aggregation_backend_choice():
    assert efficient.resolve_aggregate_backend("auto", torch.zeros(3, 19)) == "sdpa"
    assert efficient.resolve_aggregate_backend("auto", torch.zeros(3, efficient.SDPA_MAX_CHANNELS + 1)) == "blockwise"
    assert efficient.resolve_aggregate_backend("blockwise", torch.zeros(3, 19)) == "blockwise"
    assert efficient.resolve_aggregate_backend("sdpa", torch.zeros(3, 2048)) == "sdpa"
    with pytest.raises(ValueError, match="backend"):
        efficient.resolve_aggregate_backend("flash", torch.zeros(3, 19))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_association_with_each_aggregation_backend_equals_dense_float32(metric, backend):
    source, target = make_maps(metric, 2, 6, (5, 6), (4, 7), seed=8, dtype=torch.float32)
    labels = make_labels(2, (5, 6), classes=3, ignore_fraction=0.2)
    dense = loss_and_grads(lambda s, t: association_loss(s, t, labels, metric, True, impl="dense"), source, target)
    got = loss_and_grads(lambda s, t: efficient.efficient_associate(
        s, t, labels, metric, True, 0.5, IGNORE_INDEX, None, aggregate_backend=backend).loss, source, target)
    assert dense[0].item() > 0
    for want, value in zip(dense, got):
        assert rel_diff(value, want) < 1e-4


def test_sdpa_aggregation_under_autocast_returns_float32():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(5))
    plain = efficient.aggregate_rows(x, "cos", 0.5, None, "sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = efficient.aggregate_rows(x, "cos", 0.5, None, "sdpa", similarity_dtype="autocast")
        default = efficient.aggregate_rows(x, "cos", 0.5, None, "sdpa")
    assert mixed.dtype == torch.float32 and default.dtype == torch.float32
    assert 0 < rel_diff(mixed, plain) < 3e-2  # bf16 products, float32 statistics
    assert torch.equal(default, plain)  # float32 products by default, autocast or not


def test_normalize_rows_equals_f_normalize_with_zero_and_tiny_rows():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    x[2] = 0
    x[4] *= 1e-14  # norm below F.normalize's eps
    weight = torch.randn(7, 5, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    want = loss_and_grads(lambda a, _: (F.normalize(a, dim=1) * weight).sum(), x, x)
    got = loss_and_grads(lambda a, _: (efficient.normalize_rows(a) * weight).sum(), x, x)
    assert rel_diff(got[0], want[0]) < 1e-12 and rel_diff(got[1], want[1]) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_cos_with_zero_and_tiny_feature_rows_equals_dense(backend):
    """The blockwise cos normalises on the fly; rows of norm 0 or below 1e-12 follow F.normalize."""
    source, target = make_maps("cos", 1, 4, (3, 4), (3, 4), seed=12)
    source[0, :, 0, 0] = 0
    source[0, :, 1, 2] *= 1e-14
    target[0, :, 2, 3] *= 1e-14
    labels = make_labels(1, (3, 4), classes=2, ignore_fraction=0.0)
    for aggregate in (False, True):
        dense = loss_and_grads(lambda s, t, aggregate=aggregate: association_loss(s, t, labels, "cos", aggregate,
                                                                                  impl="dense"), source, target)
        got = loss_and_grads(lambda s, t, aggregate=aggregate: efficient.efficient_associate(
            s, t, labels, "cos", aggregate, 0.5, IGNORE_INDEX, None, aggregate_backend=backend).loss, source, target)
        assert dense[0].item() > 0
        for want, value in zip(dense, got):
            assert rel_diff(value, want) < 1e-9


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("tile", [1, 4, 64])
def test_cosine_tiles_equal_dense(alpha, tile):
    """The symmetric tiled cos aggregation (each tile of the similarity used for its rows and, transposed,
    for its columns; online softmax across tiles) against dense in float64: one tile, several with a
    partial last one, and single-pixel tiles; alpha at both ends."""
    x, _ = make_maps("cos", 1, 6, (3, 7), (1, 1), seed=21)
    x = x + 0.3 * torch.arange(21, dtype=x.dtype).reshape(1, 1, 3, 7)  # later pixels grow: the running max moves
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(22), dtype=x.dtype)
    dense = loss_and_grads(lambda a, _: (spatial_aggregate(a, "cos", alpha, impl="dense") * weight).sum(), x, x)
    got = loss_and_grads(lambda a, _: (efficient.efficient_spatial_aggregate(
        a, "cos", alpha, block_size=tile, backend="blockwise") * weight).sum(), x, x)
    assert rel_diff(got[0], dense[0]) < 1e-10 and rel_diff(got[1], dense[1]) < 1e-10


def test_cosine_tiles_with_identical_pixels_stay_finite_and_uniform():
    """All pixels equal: every row's std is 0 (scale 1e10), so the softmax must stay that of equal
    logits (uniform) and the output equal to the input, with finite gradients, in any tiling."""
    x = torch.randn(1, 5, 1, 1, generator=torch.Generator().manual_seed(23)).expand(1, 5, 3, 4).contiguous()
    for tile in (2, 5, 64):
        got = loss_and_grads(lambda a, _, tile=tile: efficient.efficient_spatial_aggregate(
            a, "cos", 0.5, block_size=tile, backend="blockwise").pow(2).sum(), x, x)
        out = efficient.efficient_spatial_aggregate(x, "cos", 0.5, block_size=tile, backend="blockwise")
        assert torch.allclose(out, x, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(got[1]).all()


def test_cosine_tiles_under_autocast_return_float32():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(24))
    plain = efficient.aggregate_rows(x, "cos", 0.5, 8, "blockwise")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = efficient.aggregate_rows(x, "cos", 0.5, 8, "blockwise", similarity_dtype="autocast")
        default = efficient.aggregate_rows(x, "cos", 0.5, 8, "blockwise")
    assert mixed.dtype == torch.float32 and default.dtype == torch.float32
    assert 0 < rel_diff(mixed, plain) < 3e-2  # bf16 products, float32 statistics
    assert torch.equal(default, plain)  # float32 products by default, autocast or not


def test_cosine_tiles_keep_a_running_max_when_a_logit_passes_float32_range():
    """One distinct pixel among 10,000 equal ones: its own standardised logit is about sqrt(M) = 100,
    e^100 is past float32; it sits in the first tile and later tiles have lower maxima, so only a
    running max (not each tile's own) keeps the sums finite. Every pixel then attends to its own kind."""
    x = torch.zeros(1, 4, 100, 100)
    x[:, 0] = 1.0
    x[0, :, 0, 0] = torch.tensor([0.6, 0.8, 0.0, 0.0])
    got = loss_and_grads(lambda a, _: efficient.efficient_spatial_aggregate(
        a, "cos", 0.5, block_size=4096, backend="blockwise").pow(2).sum(), x, x)
    out = efficient.efficient_spatial_aggregate(x, "cos", 0.5, block_size=4096, backend="blockwise")
    assert torch.allclose(out, x, atol=1e-4)
    assert torch.isfinite(got[1]).all()
