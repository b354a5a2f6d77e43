"""The PLCA training step: its objective is the sum of the docs/method.md terms with their weights,
and target labels never reach it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plca.config import LossConfig
from plca.losses.association import association_loss
from plca.losses.lovasz import lovasz_softmax
from plca.losses.lsr import lsr_loss
from plca.methods import MethodContext, build_method
from plca.methods.plca_objective import AssociationOptions, PLCAOptions
from plca.models.deeplab import build_deeplab_v2

NUM_CLASSES = 3


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    source = {"image": torch.rand(2, 3, 40, 48, generator=g) * 255,
              "label": torch.randint(0, NUM_CLASSES, (2, 40, 48), generator=g)}
    source["label"][:, :4] = 255
    target = {"image": torch.rand(2, 3, 32, 40, generator=g) * 255,
              "label": torch.randint(0, NUM_CLASSES, (2, 32, 40), generator=g)}
    return source, target


def model():
    torch.manual_seed(0)
    net = build_deeplab_v2(num_classes=NUM_CLASSES, backbone="resnet18", style="pytorch")
    return net.train()


def grads(net) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters() if p.grad is not None]


LOSS = LossConfig(lovasz_weight=3.0)
PLCA = PLCAOptions(lsr_weight=0.01, lsr_threshold=10.0,
                   association=AssociationOptions(feature_weight=0.1, classifier_weight=0.1, impl="dense"))


def plca_step(net, source, target, loss=LOSS, plca=PLCA):
    return build_method("plca", net, MethodContext(loss=loss, plca=plca)).training_step(source, target, 0)


def test_plca_objective_is_the_weighted_sum_of_its_terms():
    source, target = batches()
    net = model()
    step = plca_step(net, source, target)

    # the same objective written out from docs/method.md, with fresh forward passes in train mode
    net2 = model()
    src, tgt = net2(source["image"]), net2(target["image"])
    labels = source["label"]
    up = F.interpolate(src["logits"], size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, labels, ignore_index=255)
    lovasz = lovasz_softmax(up.softmax(dim=1), labels, ignore_index=255)
    lsr = lsr_loss(src["logits"], 10.0) + lsr_loss(tgt["logits"], 10.0)  # at the logits' own (1/8) resolution
    small = F.interpolate(labels[:, None].float(), size=src["features"].shape[-2:], mode="nearest")[:, 0].long()
    feat = association_loss(src["features"], tgt["features"], small, metric="cos", impl="dense")
    cls = association_loss(src["logits"].softmax(dim=1), tgt["logits"].softmax(dim=1), small, metric="kl",
                           impl="dense")
    expected = ce + 3.0 * lovasz + 0.01 * lsr + 0.1 * feat + 0.1 * cls
    assert feat.item() > 0 and cls.item() > 0
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert step.logs["loss/assoc_feature"].item() == pytest.approx(feat.item(), rel=1e-5)
    assert step.logs["loss/assoc_classifier"].item() == pytest.approx(cls.item(), rel=1e-5)

    step.loss.backward()
    expected.backward()
    for a, b in zip(grads(net), grads(net2)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_target_labels_are_diagnostic_only():
    source, target = batches(1)
    plca = PLCAOptions(association=AssociationOptions(impl="efficient"))
    results = []
    for labels in (target["label"], torch.randint(0, NUM_CLASSES, target["label"].shape), None):
        net = model()
        tgt = dict(target)
        if labels is None:
            tgt.pop("label")
        else:
            tgt["label"] = labels
        step = plca_step(net, source, tgt, LossConfig(), plca)
        step.loss.backward()
        results.append((step.loss.detach(), grads(net), step.logs))
    (loss_a, grads_a, logs_a), (loss_b, grads_b, logs_b), (loss_c, grads_c, logs_c) = results
    assert loss_a == loss_b == loss_c
    for a, b, c in zip(grads_a, grads_b, grads_c):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert "assoc/feature_target_acc" in logs_a and "assoc/feature_target_acc" not in logs_c
    # the diagnostic does look at the labels it is given
    assert logs_a["assoc/classifier_target_acc"] != logs_b["assoc/classifier_target_acc"] or \
        logs_a["assoc/feature_target_acc"] != logs_b["assoc/feature_target_acc"]


def test_zero_weights_switch_terms_off():
    source, target = batches(2)
    off = PLCAOptions(lsr_weight=0.0, association=AssociationOptions(feature_weight=0.0, classifier_weight=0.0))
    step = plca_step(model(), source, target, LossConfig(lovasz_weight=0.0), off)
    assert not any(key.startswith(("loss/assoc", "loss/lsr", "loss/source_lovasz")) for key in step.logs)
    assert step.loss.item() == pytest.approx(step.logs["loss/source_ce"].item())


def test_reference_weights_are_the_defaults():
    loss, plca = LossConfig(), PLCAOptions()
    assert (loss.lovasz_weight, plca.lsr_weight, plca.lsr_threshold) == (3.0, 0.01, 10.0)
    assert (plca.association.feature_weight, plca.association.classifier_weight) == (0.1, 0.1)
    assert plca.association.aggregate and plca.association.alpha == 0.5
    # and a plca step built without a plca section gets them
    assert build_method("plca", model(), MethodContext(loss=loss)).plca_options == plca


def test_lsr_is_computed_at_the_logits_own_resolution():
    source, target = batches(3)
    only_lsr = PLCAOptions(lsr_weight=1.0, association=AssociationOptions(feature_weight=0.0, classifier_weight=0.0))
    net = model()
    step = plca_step(net, source, target, LossConfig(lovasz_weight=0.0), only_lsr)
    with torch.no_grad():
        src, tgt = net(source["image"]), net(target["image"])
    assert src["logits"].shape[-1] < source["image"].shape[-1]  # 1/8 of the image
    native = lsr_loss(src["logits"], 10.0) + lsr_loss(tgt["logits"], 10.0)
    up = lambda logits, size: F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    upsampled = (lsr_loss(up(src["logits"], source["image"].shape[-2:]), 10.0)
                 + lsr_loss(up(tgt["logits"], target["image"].shape[-2:]), 10.0))
    assert step.logs["loss/lsr"].item() == pytest.approx(native.item(), rel=1e-5)
    assert abs(native.item() - upsampled.item()) > 1e-4  # the two choices are distinguishable here


def test_target_batch_is_forwarded_before_the_source_batch():
    source, target = batches(4)
    net = model()
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    plca_step(net, source, target)
    assert seen == [tuple(target["image"].shape), tuple(source["image"].shape)]
    # so the BatchNorm running statistics lean to the source batch, forwarded last
    bn = net.backbone.bn1
    reference = model()
    reference.backbone.bn1.momentum = bn.momentum
    reference(source["image"])
    reference(target["image"])
    assert not torch.allclose(bn.running_mean, reference.backbone.bn1.running_mean)
