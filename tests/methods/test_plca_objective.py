"""PLCA's objective: one function over a table of terms, its own checked ``plca:`` section, and a new
term that reaches both methods with PLCA's terms from its own module alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from plca.config import ConfigError, build_config, to_dict
from plca.engine.trainer import build_training_method
from plca.losses.association import association_loss, associate
from plca.losses.lsr import lsr_loss
from plca.methods import plca_objective as objective_module
from plca.methods.plca_objective import AssociationOptions, PLCAOptions, PLCATerm, plca_objective

NUM_CLASSES = 3


def forwards(seed: int = 0, requires_grad: bool = False):
    """Two segmentor outputs (features and logits at different sizes, as DeepLab's) and labels."""
    g = torch.Generator().manual_seed(seed)

    def output(h, w):
        return {"features": torch.randn(2, 8, h, w, generator=g).requires_grad_(requires_grad),
                "logits": (2 * torch.randn(2, NUM_CLASSES, h + 1, w + 1, generator=g)).requires_grad_(requires_grad)}

    src, tgt = output(5, 6), output(4, 5)
    source_labels = torch.randint(0, NUM_CLASSES, (2, 20, 24), generator=g)
    source_labels[:, :3] = 255
    target_labels = torch.randint(0, NUM_CLASSES, (2, 16, 20), generator=g)
    return src, tgt, source_labels, target_labels


def nearest(labels, size):
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def written_out(src, tgt, labels, options: PLCAOptions):
    """The objective as the removed ``lsr_terms`` + ``association_terms`` computed it (docs/method.md)."""
    assoc = options.association
    kwargs = dict(aggregate=assoc.aggregate, alpha=assoc.alpha, impl=assoc.impl, reduction=assoc.reduction)
    lsr = lsr_loss(src["logits"].float(), options.lsr_threshold) + lsr_loss(tgt["logits"].float(),
                                                                           options.lsr_threshold)
    feature = association_loss(src["features"], tgt["features"], nearest(labels, src["features"].shape[-2:]),
                               metric="cos", **kwargs)
    classifier = association_loss(src["logits"].softmax(dim=1), tgt["logits"].softmax(dim=1),
                                  nearest(labels, src["logits"].shape[-2:]), metric="kl", **kwargs)
    total = options.lsr_weight * lsr + assoc.feature_weight * feature + assoc.classifier_weight * classifier
    return total, {"loss/lsr": lsr, "loss/assoc_feature": feature, "loss/assoc_classifier": classifier}


@pytest.mark.parametrize("impl", ["dense", "efficient"])
def test_the_objective_is_the_old_lsr_plus_association_sum(impl):
    options = PLCAOptions(lsr_weight=0.02, lsr_threshold=8.0,
                          association=AssociationOptions(feature_weight=0.3, classifier_weight=0.2, impl=impl))
    src, tgt, labels, _ = forwards(0, requires_grad=True)
    loss, logs = plca_objective(options, src, tgt, labels)
    expected, terms = written_out(src, tgt, labels, options)
    assert all(value.item() != 0 for value in terms.values())  # LSR is negative below its threshold
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for key, value in terms.items():
        assert logs[key].item() == pytest.approx(value.item(), rel=1e-6), key
        assert not logs[key].requires_grad
    for level in ("feature", "classifier"):
        assert 0 < logs[f"assoc/{level}_positive_ratio"].item() <= 1
        assert f"assoc/{level}_cover_ratio" in logs and f"assoc/{level}_target_acc" not in logs
    grads = torch.autograd.grad(loss, [src["features"], tgt["logits"]], retain_graph=True)
    expected_grads = torch.autograd.grad(expected, [src["features"], tgt["logits"]])
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_target_labels_only_add_diagnostics():
    options = PLCAOptions()
    src, tgt, labels, target_labels = forwards(1)
    plain, plain_logs = plca_objective(options, src, tgt, labels)
    diagnosed, logs = plca_objective(options, src, tgt, labels, target_labels)
    unlabelled, unlabelled_logs = plca_objective(options, src, tgt, labels, torch.full_like(target_labels, 255))
    assert plain == diagnosed == unlabelled
    assert "assoc/feature_target_acc" in logs and "assoc/classifier_target_acc" in logs
    assert not any(key.endswith("target_acc") for key in (*plain_logs, *unlabelled_logs))
    # the diagnostic is the association's own, on the labels resized to each map
    probs = (src["logits"].softmax(dim=1), tgt["logits"].softmax(dim=1))
    direct = associate(*probs, nearest(labels, probs[0].shape[-2:]), metric="kl",
                       target_labels=nearest(target_labels, probs[1].shape[-2:]))
    assert logs["assoc/classifier_target_acc"].item() == pytest.approx(direct.target_accuracy.item())


def test_a_term_of_weight_zero_is_not_computed(monkeypatch):
    def fails(inputs, options):
        raise AssertionError("computed")

    monkeypatch.setattr(objective_module, "TERMS", [*objective_module.TERMS, PLCATerm("never", "lsr_weight", fails)])
    off = PLCAOptions(lsr_weight=0.0, association=AssociationOptions(feature_weight=0.0, classifier_weight=0.0))
    src, tgt, labels, _ = forwards(2)
    loss, logs = plca_objective(off, src, tgt, labels)
    assert loss.item() == 0.0 and logs == {} and not off.enabled()
    assert objective_module.zero_weights() == {"lsr_weight": 0.0,
                                               "association": {"feature_weight": 0.0, "classifier_weight": 0.0}}


@pytest.mark.parametrize("override, message", [
    ("plca.lsr_weight=-0.1", "plca.lsr_weight must be >= 0"),
    ("plca.lsr_threshold=0", "plca.lsr_threshold must be > 0"),
    ("plca.association.feature_weight=-1", "plca.association.feature_weight must be >= 0"),
    ("plca.association.classifier_weight=-1", "plca.association.classifier_weight must be >= 0"),
    ("plca.association.alpha=1.5", r"plca.association.alpha must be in \[0, 1\]"),
    ("plca.association.impl=fast", "plca.association.impl must be one of dense, efficient"),
    ("plca.association.reduction=mean", "plca.association.reduction must be one of pooled, pairs"),
    ("plca.association.similarity_dtype=float16", "plca.association.similarity_dtype must be one of"),
])
def test_the_section_checks_itself_naming_the_key(override, message):
    for method in ("plca", "self_training"):
        with pytest.raises(ConfigError, match=message):
            build_config(CONFIG, [f"method={method}", override])


def test_the_section_check_is_the_options_own():
    with pytest.raises(ValueError, match=r"plca.association.alpha must be in \[0, 1\]"):
        PLCAOptions(association=AssociationOptions(alpha=-0.5)).validate()
    PLCAOptions().validate()


CONFIG = {"data": {"classes": ["road", "car", "sky"], "source": {"root": "/s"}, "target": {"root": "/t"}},
          "model": {"backbone": "resnet18", "style": "pytorch"}, "device": "cpu"}


@pytest.mark.parametrize("override, key", [
    ("plca.association.bogus=1", "plca.association.bogus"),
    ("plca.lsr_wieght=1", "plca.lsr_wieght"),
    ("plca.association.aggregate=3", "plca.association.aggregate"),
    ("plca.lsr_weight=much", "plca.lsr_weight"),
    ("plca=5", "plca"),
])
def test_unknown_keys_and_wrong_types_in_the_section_are_named(override, key):
    for method in ("plca", "self_training"):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            build_config(CONFIG, [f"method={method}", override])


def test_source_only_has_no_plca_section():
    config = build_config(CONFIG, ["method=source_only"])
    assert config.plca is None and "plca" not in to_dict(config)
    with pytest.raises(ConfigError, match="unknown config key 'plca': method source_only has no plca section"):
        build_config(CONFIG, ["method=source_only", "plca.lsr_weight=0.01"])


# --------------------------------------------------------------------------- a new term, in this file alone


@dataclasses.dataclass
class ToyOptions(PLCAOptions):
    toy_weight: float = 0.5  # a toy term: the mean squared source logit


SEEN: list[torch.Tensor] = []


def toy_term(inputs, options):
    SEEN.append(inputs.source["logits"].detach())
    return inputs.source["logits"].float().pow(2).mean(), {"toy/target_logit_mean": inputs.target["logits"].mean()}


@pytest.fixture
def toy_term_added(monkeypatch):
    """The new term: a field of the section and a row of the table, nothing else."""
    monkeypatch.setattr(objective_module, "PLCAOptions", ToyOptions)
    monkeypatch.setattr(objective_module, "TERMS", [*objective_module.TERMS, PLCATerm("toy", "toy_weight", toy_term)])
    SEEN.clear()


def batches():
    g = torch.Generator().manual_seed(5)
    source = {"image": torch.rand(2, 3, 32, 40, generator=g) * 255,
              "label": torch.randint(0, NUM_CLASSES, (2, 32, 40), generator=g)}
    target = {"image": torch.rand(2, 3, 32, 40, generator=g) * 255}
    return source, target


def test_a_toy_term_added_to_the_objective_alone_is_computed_and_logged_by_both_methods(toy_term_added):
    plca = build_config(CONFIG, ["method=plca"])
    self_training = build_config(CONFIG, ["method=self_training", "plca.toy_weight=0.25"])
    # typed, defaulted per method (on for plca, off for self_training), saved with the run, checked
    assert isinstance(plca.plca, ToyOptions) and plca.plca.toy_weight == 0.5
    assert build_config(CONFIG, ["method=self_training"]).plca.toy_weight == 0.0
    assert to_dict(self_training)["plca"]["toy_weight"] == 0.25
    with pytest.raises(ConfigError, match="plca.toy_weight must be >= 0"):
        build_config(CONFIG, ["method=plca", "plca.toy_weight=-1"])

    source, target = batches()
    for config, weight in ((plca, 0.5), (self_training, 0.25)):
        torch.manual_seed(0)
        method = build_training_method(config, torch.device("cpu"))  # the engine's own way
        out = method.training_step(source, target, 0)
        toy = SEEN[-1].pow(2).mean()
        assert out.logs["loss/toy"].item() == pytest.approx(toy.item(), rel=1e-6), config.method
        assert "toy/target_logit_mean" in out.logs
        logs = out.logs
        if config.method == "plca":
            others = (logs["loss/source_ce"] + 3.0 * logs["loss/source_lovasz"] + 0.01 * logs["loss/lsr"]
                      + 0.1 * logs["loss/assoc_feature"] + 0.1 * logs["loss/assoc_classifier"])
        else:  # only the toy term is on: the target is forwarded for it all the same
            assert not any(key in logs for key in ("loss/lsr", "loss/assoc_feature", "loss/assoc_classifier"))
            others = logs["loss/source_ce"] + logs["loss/mix_ce"]
        assert logs["loss/total"].item() == pytest.approx((others + weight * toy).item(), rel=1e-5)
    assert len(SEEN) == 2
