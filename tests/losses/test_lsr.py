"""The LSR regulariser against a per-pixel loop and its analytic gradient."""

import math

import pytest
import torch

from plca.losses.lsr import lsr_loss


def per_pixel_loop(logits: torch.Tensor, threshold: float) -> float:
    """mean over pixels of (l / t - 1) * l, l = -(1/K) sum_c log softmax_c, with python floats."""
    batch, num_classes, height, width = logits.shape
    terms = []
    for b in range(batch):
        for h in range(height):
            for w in range(width):
                scores = [float(logits[b, c, h, w]) for c in range(num_classes)]
                log_normaliser = math.log(sum(math.exp(s) for s in scores))
                ell = -sum(s - log_normaliser for s in scores) / num_classes
                terms.append((ell / threshold - 1.0) * ell)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("threshold", [10.0, 2.0])
def test_value_matches_per_pixel_loop(threshold):
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 4
    assert lsr_loss(logits, threshold).item() == pytest.approx(per_pixel_loop(logits, threshold), abs=1e-12)


def test_uniform_prediction_has_l_equal_log_k():
    logits = torch.zeros(1, 19, 2, 2)
    ell = math.log(19)
    assert lsr_loss(logits).item() == pytest.approx((ell / 10 - 1) * ell, rel=1e-6)


def test_gradient_is_detached_coefficient_times_dl():
    logits = (torch.randn(2, 4, 3, 3, dtype=torch.float64) * 5).requires_grad_(True)
    threshold = 3.0
    lsr_loss(logits, threshold).backward()
    # l = logsumexp(x) - mean_c(x), so dl/dx_c = softmax_c - 1/K; the coefficient (l/t - 1) is a constant.
    with torch.no_grad():
        num_classes = logits.shape[1]
        ell = torch.logsumexp(logits, dim=1, keepdim=True) - logits.mean(dim=1, keepdim=True)
        pixels = ell.numel()
        expected = (ell / threshold - 1) * (logits.softmax(dim=1) - 1 / num_classes) / pixels
    torch.testing.assert_close(logits.grad, expected, rtol=1e-10, atol=1e-14)


def test_gradient_pushes_l_towards_the_threshold():
    # A very peaked pixel (l >> t) and a near-uniform one (l < t).
    logits = torch.tensor([[[[40.0, 0.0]], [[0.0, 0.1]], [[0.0, 0.0]]]], requires_grad=True)  # (1, 3, 1, 2)
    threshold = 5.0
    lsr_loss(logits, threshold).backward()
    step = logits.detach() - 0.5 * logits.grad
    l_before = -torch.log_softmax(logits.detach(), dim=1).mean(dim=1).flatten()
    l_after = -torch.log_softmax(step, dim=1).mean(dim=1).flatten()
    assert l_before[0] > threshold and l_after[0] < l_before[0]
    assert l_before[1] < threshold and l_after[1] > l_before[1]


def test_non_positive_threshold_is_rejected():
    with pytest.raises(ValueError, match="threshold"):
        lsr_loss(torch.zeros(1, 3, 2, 2), threshold=0.0)
