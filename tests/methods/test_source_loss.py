"""The source cross-entropy's two averages, against plain references computed pixel by pixel.

``labelled``: the sum over labelled pixels divided by their number (PyTorch's mean with
``ignore_index``, the PLCA reference). ``all_pixels``: divided by every pixel of the batch,
ignored ones counting 0 (mmseg 0.16's ``weight_reduce_loss`` without ``avg_factor``, DAFormer).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from plca.config import ConfigError, LossConfig, build_config, load_config
from plca.methods.base import CE_AVERAGES, Method, MethodContext, cross_entropy
from plca.methods.self_training import weighted_cross_entropy

CONFIGS = Path(__file__).parent.parent.parent / "configs"
IGNORE = 255


def small_batch():
    """Logits (2, 3, 2, 3) and labels (2, 2, 3) with 4 of the 12 pixels ignored."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 2, 3, generator=g)
    labels = torch.tensor([[[0, 1, IGNORE], [2, IGNORE, 0]],
                           [[IGNORE, 2, 1], [1, 0, IGNORE]]])
    return logits, labels


def pixel_losses(logits, labels, weights=None):
    """``[-w * log softmax(logits)[label]]`` of every labelled pixel, written out one pixel at a time."""
    losses = []
    for b in range(labels.shape[0]):
        for y in range(labels.shape[1]):
            for x in range(labels.shape[2]):
                label = int(labels[b, y, x])
                if label == IGNORE:
                    continue
                scores = [float(logits[b, k, y, x]) for k in range(logits.shape[1])]
                log_p = scores[label] - math.log(sum(math.exp(s) for s in scores))
                w = 1.0 if weights is None else float(weights[b, y, x])
                losses.append(-w * log_p)
    return losses


def test_labelled_average_divides_by_the_labelled_pixels():
    logits, labels = small_batch()
    losses = pixel_losses(logits, labels)
    assert len(losses) == 8
    loss, valid = cross_entropy(logits, labels, average="labelled")
    assert int(valid) == 8
    assert loss.item() == pytest.approx(sum(losses) / 8, rel=1e-6)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE))


def test_all_pixels_average_divides_by_every_pixel_ignored_ones_counting_zero():
    logits, labels = small_batch()
    losses = pixel_losses(logits, labels)
    loss, valid = cross_entropy(logits, labels, average="all_pixels")
    assert int(valid) == 8
    assert loss.item() == pytest.approx(sum(losses) / 12, rel=1e-6)
    labelled, _ = cross_entropy(logits, labels, average="labelled")
    assert loss.item() == pytest.approx(labelled.item() * 8 / 12, rel=1e-6)  # the two differ with ignored pixels


def test_weights_multiply_each_pixel_before_either_average():
    logits, labels = small_batch()
    weights = torch.linspace(0.0, 1.0, 12).reshape(2, 2, 3)
    losses = pixel_losses(logits, labels, weights)
    assert cross_entropy(logits, labels, weights, "all_pixels")[0].item() == pytest.approx(sum(losses) / 12, rel=1e-6)
    assert cross_entropy(logits, labels, weights, "labelled")[0].item() == pytest.approx(sum(losses) / 8, rel=1e-6)
    # the mix loss of self-training is mmseg's: weighted, over all pixels
    assert weighted_cross_entropy(logits, labels, weights).item() == pytest.approx(sum(losses) / 12, rel=1e-6)


def test_no_labelled_pixel_gives_zero_with_a_zero_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), IGNORE)
    for average in CE_AVERAGES:
        loss, valid = cross_entropy(logits, labels, average=average)
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and int(valid) == 0 and not grad.any()
    with pytest.raises(ValueError, match="labelled, all_pixels"):
        cross_entropy(logits, labels, average="mean")


@pytest.mark.parametrize("average, divisor", [("labelled", 8), ("all_pixels", 12)])
def test_source_loss_follows_loss_ce_average(average, divisor):
    logits, labels = small_batch()
    method = Method(nn.Identity(), MethodContext(loss=LossConfig(lovasz_weight=0.0, ce_average=average)))
    loss, logs = method.source_loss(logits, labels)
    assert loss.item() == pytest.approx(sum(pixel_losses(logits, labels)) / divisor, rel=1e-6)
    assert logs["loss/source_ce"].item() == pytest.approx(loss.item())


def test_configs_choose_the_average():
    for name in ("gta2cityscapes_self_training", "synthia2cityscapes_self_training_plca",
                 "gta2cityscapes_daformer_mitb5", "folder_self_training"):
        assert load_config(CONFIGS / f"{name}.yaml").loss.ce_average == "all_pixels", name
    for name in ("gta2cityscapes_plca", "synthia2cityscapes_source_only", "folder_plca"):
        assert load_config(CONFIGS / f"{name}.yaml").loss.ce_average == "labelled", name
    minimal = {"data": {"classes": ["a", "b"], "source": {"format": "folder", "root": "/s"},
                        "target": {"format": "folder", "root": "/t"}}}
    assert build_config(minimal).loss.ce_average == "labelled"
    assert build_config(minimal, ["method=self_training"]).loss.ce_average == "all_pixels"  # the method's default
    with pytest.raises(ConfigError, match=r"loss\.ce_average"):
        build_config(minimal, ["loss.ce_average=pixels"])


def test_add_term_adds_the_weighted_term_and_logs_it_unweighted():
    from plca.methods.base import add_term

    value = torch.tensor(2.0, requires_grad=True)
    logs: dict = {}
    loss = add_term(torch.tensor(1.0), logs, "x", value, 0.5)
    assert loss.item() == 2.0 and logs["loss/x"].item() == 2.0 and not logs["loss/x"].requires_grad
    assert add_term(None, logs, "y", value).item() == 2.0 and set(logs) == {"loss/x", "loss/y"}
    loss.backward()
    assert value.grad.item() == 0.5
