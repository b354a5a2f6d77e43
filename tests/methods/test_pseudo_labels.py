"""Pseudo-labels: logits upsampled before the softmax, one confidence weight per batch, row cropping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plca.methods.addons import pseudo_label_accuracy, pseudo_labels


def test_hand_made_teacher_output():
    # 1 image, 3 classes, 2 x 2 pixels; probabilities chosen by hand through log-probabilities
    probs = torch.tensor([[[0.98, 0.10], [0.30, 0.01]],
                          [[0.01, 0.85], [0.30, 0.98]],
                          [[0.01, 0.05], [0.40, 0.01]]]).unsqueeze(0)
    labels, weight = pseudo_labels(probs.log(), size=(2, 2), threshold=0.968)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[[0, 1], [2, 1]]]
    # two of four pixels reach 0.968
    assert weight.dtype == torch.float32
    assert torch.equal(weight, torch.full((1, 2, 2), 0.5))


def test_logits_are_upsampled_before_the_softmax():
    logits = torch.tensor([[[[8.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    labels, weight = pseudo_labels(logits, size=(1, 4), threshold=0.968)
    # bilinear (align_corners False) logits of class 0: 8, 6, 2, 0 -> max probs .9997, .9975, .88, .5
    up = F.interpolate(logits, size=(1, 4), mode="bilinear", align_corners=False)
    assert up[0, 0, 0].tolist() == [8.0, 6.0, 2.0, 0.0]
    assert torch.equal(weight, torch.full((1, 1, 4), 0.5))
    # upsampling the probabilities instead would give 1/4 (0.9997, 0.875, 0.625, 0.5)
    probs_first = F.interpolate(logits.softmax(1), size=(1, 4), mode="bilinear", align_corners=False)
    assert (probs_first.max(1).values >= 0.968).float().mean() == 0.25
    assert labels[0, 0].tolist() == [0, 0, 0, 0]  # the tie at the last pixel goes to class 0


def test_one_weight_for_the_whole_batch():
    confident = torch.tensor([10.0, -10.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    unsure = torch.zeros(1, 2, 3, 3)
    labels, weight = pseudo_labels(torch.cat([confident, unsure]), size=(3, 3))
    # 9 of the batch's 18 pixels are confident: both images get 0.5, not 1 and 0
    assert torch.equal(weight, torch.full((2, 3, 3), 0.5))
    assert (labels[0] == 0).all()


def test_random_logits_against_a_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, generator=g) * 4
    labels, weight = pseudo_labels(logits, size=(9, 13), threshold=0.9)
    probs = F.interpolate(logits, size=(9, 13), mode="bilinear", align_corners=False).softmax(1)
    confidence, expected = probs.max(1)
    assert torch.equal(labels, expected)
    fraction = (confidence >= 0.9).sum().item() / confidence.numel()
    assert 0 < fraction < 1
    torch.testing.assert_close(weight, torch.full_like(weight, fraction))


def test_ignored_rows_get_zero_after_the_fraction():
    logits = torch.tensor([10.0, -10.0]).view(1, 2, 1, 1).expand(2, 2, 10, 4).clone()
    logits[:, :, 5:] = 0.0  # the lower half is unsure
    _, weight = pseudo_labels(logits, size=(10, 4), ignore_top=2, ignore_bottom=3)
    assert (weight[:, :2] == 0).all()
    assert (weight[:, 7:] == 0).all()
    # the fraction counts all rows, the ignored ones included
    assert torch.equal(weight[:, 2:7], torch.full((2, 5, 4), 0.5))
    _, weight = pseudo_labels(logits, size=(10, 4), ignore_top=0, ignore_bottom=0)
    assert torch.equal(weight, torch.full((2, 10, 4), 0.5))


def test_no_autograd_history():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels, weight = pseudo_labels(logits, size=(4, 4))
    assert not labels.requires_grad and not weight.requires_grad
    with pytest.raises(ValueError):
        pseudo_labels(torch.randn(3, 2, 2), size=(4, 4))


def test_accuracy():
    labels = torch.tensor([[[0, 1], [2, 2]]])
    target = torch.tensor([[[0, 2], [2, 255]]])
    assert pseudo_label_accuracy(labels, target).item() == pytest.approx(2 / 3)
    assert math.isnan(pseudo_label_accuracy(labels, torch.full_like(target, 255)).item())
    with pytest.raises(ValueError):
        pseudo_label_accuracy(labels, target[:, :1])
