"""Lovasz-softmax against a brute-force Lovasz extension of the Jaccard loss.

The reference below never sorts: it uses the definition of the Lovasz extension of a set
function F (with F(empty) = 0) at a point m >= 0 as the integral over t of F({i : m_i >= t}),
which for the Jaccard loss is piecewise constant in t and so integrates exactly over the
distinct error values.
"""

import pytest
import torch

from plca.data.labels import IGNORE_INDEX
from plca.losses.lovasz import lovasz_softmax

IGNORE = IGNORE_INDEX


def jaccard_loss(mispredicted: set[int], foreground: set[int]) -> float:
    """Delta_J(M) = |M| / |fg u M| (Berman et al., eq. 4); 0 for the empty set."""
    if not mispredicted:
        return 0.0
    return len(mispredicted) / len(foreground | mispredicted)


def lovasz_extension_by_integral(errors: list[float], foreground: set[int]) -> float:
    """Integral over t in [0, 1] of Delta_J({i : errors_i >= t})."""
    total, previous = 0.0, 0.0
    for level in sorted(set(errors)):
        if level <= 0:
            continue
        above = {i for i, error in enumerate(errors) if error >= level}
        total += (level - previous) * jaccard_loss(above, foreground)
        previous = level
    return total


def brute_force(probs: torch.Tensor, labels: torch.Tensor, classes: str) -> float:
    """Lovasz-softmax of the whole batch with python loops, float64."""
    num_classes = probs.shape[1]
    pixels = [(b, h, w) for b in range(labels.shape[0]) for h in range(labels.shape[1])
              for w in range(labels.shape[2]) if int(labels[b, h, w]) != IGNORE]
    if not pixels:
        return 0.0
    losses = []
    for c in range(num_classes):
        foreground = {k for k, (b, h, w) in enumerate(pixels) if int(labels[b, h, w]) == c}
        if classes == "present" and not foreground:
            continue
        errors = [abs(float(k in foreground) - float(probs[b, c, h, w])) for k, (b, h, w) in enumerate(pixels)]
        losses.append(lovasz_extension_by_integral(errors, foreground))
    return sum(losses) / len(losses)


def random_case(seed: int, shape=(2, 4, 3, 5), ignore_fraction=0.2, absent=()):
    generator = torch.Generator().manual_seed(seed)
    batch, num_classes, height, width = shape
    probs = torch.randn(shape, generator=generator, dtype=torch.float64).mul(2).softmax(dim=1)
    allowed = torch.tensor([c for c in range(num_classes) if c not in absent])
    labels = allowed[torch.randint(len(allowed), (batch, height, width), generator=generator)]
    labels[torch.rand((batch, height, width), generator=generator) < ignore_fraction] = IGNORE
    return probs, labels


@pytest.mark.parametrize("classes", ["present", "all"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_integral(seed, classes):
    probs, labels = random_case(seed, absent=(3,) if seed % 2 else ())
    expected = brute_force(probs, labels, classes)
    assert lovasz_softmax(probs, labels, classes=classes).item() == pytest.approx(expected, abs=1e-12)


def test_ties_in_the_errors_match_brute_force():
    probs, labels = random_case(7, shape=(1, 3, 4, 6), ignore_fraction=0.0)
    probs = (probs * 4).round() / 4  # many equal errors; not normalised, which the loss does not need
    for classes in ("present", "all"):
        expected = brute_force(probs, labels, classes)
        assert lovasz_softmax(probs, labels, classes=classes).item() == pytest.approx(expected, abs=1e-12)


def test_present_averages_only_classes_in_the_labels():
    probs, labels = random_case(3, shape=(2, 4, 4, 4), absent=(2, 3))
    per_class_all = 4 * lovasz_softmax(probs, labels, classes="all")
    present = lovasz_softmax(probs, labels, classes="present")
    # An absent class has an empty foreground: every error is its probability and
    # Delta_J(M) = 1 for any non-empty M, so its loss is its largest probability.
    valid = labels != IGNORE
    absent_terms = sum(probs[:, c][valid].max() for c in (2, 3))
    assert present.item() == pytest.approx((per_class_all - absent_terms).item() / 2, abs=1e-12)
    assert present.item() != pytest.approx(per_class_all.item() / 4)


def test_batch_is_flattened_not_averaged_per_image():
    probs, labels = random_case(5, shape=(2, 3, 3, 4))
    side_by_side = lovasz_softmax(torch.cat([probs[0], probs[1]], dim=-1)[None],
                                  torch.cat([labels[0], labels[1]], dim=-1)[None])
    per_image = (lovasz_softmax(probs[:1], labels[:1]) + lovasz_softmax(probs[1:], labels[1:])) / 2
    assert lovasz_softmax(probs, labels).item() == pytest.approx(side_by_side.item(), abs=1e-12)
    assert lovasz_softmax(probs, labels).item() != pytest.approx(per_image.item(), abs=1e-6)


@pytest.mark.parametrize("classes", ["present", "all"])
def test_perfect_prediction_costs_nothing(classes):
    labels = torch.tensor([[[0, 1, 2], [2, 2, IGNORE]]])
    probs = torch.nn.functional.one_hot(labels.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    probs[..., 1, 2] = 0.25  # the ignored pixel's probabilities do not matter
    assert lovasz_softmax(probs, labels, classes=classes).item() == 0.0


def test_ignored_pixels_neither_count_nor_receive_gradient():
    probs, labels = random_case(11)
    ignored = labels == IGNORE
    assert ignored.any()
    changed = probs.clone()
    changed.permute(0, 2, 3, 1)[ignored] = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    assert lovasz_softmax(changed, labels).item() == lovasz_softmax(probs, labels).item()
    leaf = probs.clone().requires_grad_(True)
    lovasz_softmax(leaf, labels).backward()
    assert leaf.grad.permute(0, 2, 3, 1)[ignored].abs().max() == 0
    assert leaf.grad.permute(0, 2, 3, 1)[~ignored].abs().max() > 0


def test_no_valid_pixel_gives_zero_with_finite_gradient():
    probs = torch.rand(2, 3, 4, 4, requires_grad=True)
    loss = lovasz_softmax(probs, torch.full((2, 4, 4), IGNORE))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(probs.grad, torch.zeros_like(probs))


@pytest.mark.parametrize("classes", ["present", "all"])
def test_gradient_matches_finite_differences(classes):
    probs, labels = random_case(2, shape=(1, 3, 3, 3), ignore_fraction=0.1, absent=(2,))
    probs.requires_grad_(True)
    # The loss is piecewise linear in the probabilities; random inputs stay inside one piece.
    assert torch.autograd.gradcheck(lambda p: lovasz_softmax(p, labels, classes=classes), (probs,), eps=1e-7)


def test_gradient_flows_through_softmax_in_float32():
    logits = torch.randn(2, 5, 6, 6, requires_grad=True)
    labels = torch.randint(5, (2, 6, 6))
    loss = lovasz_softmax(logits.softmax(dim=1), labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bad_arguments_raise_clear_errors():
    probs = torch.rand(1, 3, 2, 2)
    with pytest.raises(ValueError, match="classes must be"):
        lovasz_softmax(probs, torch.zeros(1, 2, 2, dtype=torch.long), classes="some")
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        lovasz_softmax(probs, torch.tensor([[[0, 7], [1, IGNORE]]]))
    with pytest.raises(ValueError, match="expected probs"):
        lovasz_softmax(probs, torch.zeros(1, 3, 2, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    probs, labels = random_case(4, shape=(2, 6, 16, 16))
    for classes in ("present", "all"):
        cpu = lovasz_softmax(probs, labels, classes=classes)
        gpu = lovasz_softmax(probs.cuda(), labels.cuda(), classes=classes)
        assert gpu.item() == pytest.approx(cpu.item(), abs=1e-12)
