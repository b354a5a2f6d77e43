"""The self-training method: its step, PLCA on top, resume with the teacher, the shipped folder configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dataset_writers import write_folder
from run_checks import assert_resume_is_exact
from tiny_runs import TINY_BACKBONE  # registers the tiny backbone
from plca.config import build_config, load_config
from plca.engine.trainer import train
from plca.methods import MethodContext, build_method
from plca.methods.self_training import weighted_cross_entropy
from plca.models import build_segmentor

CLASSES = ["road", "car", "sky"]
CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("st_data")
    write_folder(root, classes_count=3, splits={"train": 8, "val": 2}, size=(40, 56), seed=0)
    return root


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    source = {"image": torch.rand(2, 3, 32, 40, generator=g) * 255,
              "label": torch.randint(0, 3, (2, 32, 40), generator=g)}
    target = {"image": torch.rand(2, 3, 32, 40, generator=g) * 255,
              "label": torch.randint(0, 3, (2, 32, 40), generator=g)}
    return source, target


def method(loss_overrides=(), **option_changes):
    config = build_config({"method": "self_training",
                           "data": {"classes": CLASSES, "source": {"root": "/s"}, "target": {"root": "/t"}},
                           "model": {"backbone": "resnet18", "style": "pytorch"}}, list(loss_overrides))
    torch.manual_seed(0)
    segmentor = build_segmentor(config.model, 3).train()
    options = config.method_options
    for key, value in option_changes.items():
        section, _, name = key.rpartition("__")
        setattr(getattr(options, section) if section else options, name, value)
    context = MethodContext(loss=config.loss, options=options, plca=config.plca, classes=tuple(CLASSES),
                            model=config.model, seed=0)
    return build_method("self_training", segmentor, context)


def test_a_step_has_finite_non_zero_terms_and_the_teacher_gets_no_gradient():
    st = method(masking__enabled=True, masking__patch_size=8, pseudo_label__threshold=0.0)
    source, target = batches()
    out = st.training_step(source, target, 0)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    for key in ("loss/source_ce", "loss/mix_ce", "loss/masked_ce"):
        assert out.logs[key].item() > 0, key
    assert "pseudo/accuracy" in out.logs and 0 <= out.logs["pseudo/weight"].item() <= 1
    out.loss.backward()
    assert all(p.grad is None for p in st.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in st.student.parameters())
    assert any("teacher" in key for key in st.state_dict())


def test_teacher_follows_the_student_by_the_ema_formula_after_each_update():
    st = method()
    before = {k: v.clone() for k, v in st.teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in st.student.parameters():
            p.add_(1.0)
    st.after_update(1)  # alpha = min(1 - 1/2, 0.999) = 0.5
    for (name, t), s in zip(st.teacher.model.named_parameters(), st.student.parameters()):
        torch.testing.assert_close(t, 0.5 * before[name] + 0.5 * s)


def test_plca_on_top_adds_the_association_of_the_unmixed_target():
    source, target = batches(1)
    plain = method()
    combined = method(["plca.association.feature_weight=0.1", "plca.association.classifier_weight=0.1"])
    seen = []
    combined.student.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = combined.training_step(source, target, 0)
    assert torch.equal(seen[0], target["image"])  # the un-mixed, un-augmented target, forwarded first
    assert torch.equal(seen[1], source["image"])
    assert out.logs["loss/assoc_feature"].item() > 0 and out.logs["loss/assoc_classifier"].item() > 0
    assert "loss/assoc_feature" not in plain.training_step(source, target, 0).logs


def test_feature_distance_needs_imagenet_weights():
    with pytest.raises(ValueError, match="model.pretrained"):
        build_config({"method": "self_training", "data": {"classes": CLASSES, "source": {"root": "/s"},
                                                          "target": {"root": "/t"}},
                      "self_training": {"feature_distance": {"enabled": True}}})


def test_weighted_cross_entropy_is_daformers_mean_over_all_pixels():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 2]]])
    weights = torch.tensor([[[1.0, 0.5], [1.0, 0.0]]])
    ce = torch.nn.functional.cross_entropy(logits, labels.clamp(max=2), reduction="none")
    expected = (ce[0, 0, 0] * 1.0 + ce[0, 0, 1] * 0.5) / 4  # ignored and zero-weight pixels count in the mean
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, weights), expected)


def tiny_config(data, out, run_name, iters=4, **extra):
    config = {
        "method": "self_training",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(data), "split": "train"},
                 "target": {"format": "folder", "root": str(data), "split": "train"},
                 "val": {"format": "folder", "root": str(data), "split": "val"}, "num_workers": 0,
                 "rare_class_sampling": {"enabled": True, "min_pixels": 30}},
        "model": {"backbone": TINY_BACKBONE},
        "train": {"iters": iters, "batch_size": 2, "crop_size": [32, 32], "lr": 1e-3, "optimizer": "adamw",
                  "warmup_iters": 2, "eval_every": 0, "checkpoint_every": 100, "log_every": 1, "image_every": 0},
        "self_training": {"masking": {"enabled": True, "patch_size": 8}},
        "plca": {"association": {"feature_weight": 0.1, "classifier_weight": 0.1}},
        "output_dir": str(out), "run_name": run_name, "device": "cpu",
    }
    return build_config(config, [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.slow
@pytest.mark.parametrize("model", [
    {},
    # MiT + DAFormer head train with dropout / drop path: random draws of torch's global generator, which the
    # resume must continue where it stopped (nothing else may draw from it when the data stream restarts)
    {"model.backbone": "mit_b0", "model.head": "daformer", "model.features": "head_embedding"},
], ids=["resnet18", "mit_b0-dropout"])
def test_resumed_self_training_equals_an_uninterrupted_run_teacher_included(data, tmp_path, model):
    full, state = assert_resume_is_exact(lambda name: tiny_config(data, tmp_path, name, **model),
                                         teacher_prefix="teacher.")
    assert int(state["teacher.step"]) == 4
    lines = [json.loads(line) for line in (full.run_dir / "scalars.jsonl").read_text().splitlines()]
    assert all(line["loss/mix_ce"] > 0 and torch.isfinite(torch.tensor(line["loss/total"])) for line in lines)


@pytest.mark.slow
def test_both_students_and_teachers_metrics_are_written_when_asked(data, tmp_path):
    result = train(tiny_config(data, tmp_path, "both", iters=2, **{"eval.model": "both"}), progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["evaluated"] == "student" and "mIoU" in metrics["teacher"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["folder_self_training.yaml", "folder_self_training_plca.yaml"])
@pytest.mark.parametrize("backbone", [["model.backbone=resnet18"],
                                      ["model.backbone=mit_b0", "model.head=daformer",
                                       "model.features=head_embedding"]])
def test_shipped_folder_configs_run_with_the_documented_overrides(data, tmp_path, name, backbone):
    overrides = [f"data.source.root={data}", f"data.target.root={data}", f"data.val.root={data}",
                 *backbone, "model.pretrained=null", "train.iters=2", "train.batch_size=2",
                 "train.crop_size=[32,32]", "train.seed=1", f"output_dir={tmp_path}", "data.num_workers=0",
                 "device=cpu"]
    config = load_config(CONFIGS / name, overrides)
    result = train(config, progress=False)
    assert result.step == 2 and (result.run_dir / "metrics.json").is_file()
    assert "shortened from 1500 to 0" in (result.run_dir / "train.log").read_text()


def _grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


@pytest.mark.parametrize("masking", [False, True])
def test_staged_backward_gives_the_gradients_of_one_backward_of_the_sum(masking):
    import copy

    plca = ["plca.association.feature_weight=0.1", "plca.association.classifier_weight=0.1", "plca.lsr_weight=0.01"]
    single = method(plca, masking__enabled=masking, masking__patch_size=8, pseudo_label__threshold=0.0)
    staged = copy.deepcopy(single)
    source, target = batches(2)

    out = single.training_step(source, target, 0)  # no engine hook: the whole loss comes back
    out.loss.backward()
    parts = []

    def backward(loss):
        parts.append(loss.detach())
        loss.backward()

    with staged.early_backward(backward):
        staged_out = staged.training_step(source, target, 0)
    staged_out.loss.backward()

    assert len(parts) == (2 if masking else 1)  # the source part, and the mix before the masked forward
    torch.testing.assert_close(staged_out.logs["loss/total"], out.logs["loss/total"])
    torch.testing.assert_close(sum(parts) + staged_out.loss.detach(), out.loss.detach())
    for a, b in zip(_grads(staged.student), _grads(single.student), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(staged.buffers(), single.buffers(), strict=True):
        torch.testing.assert_close(a, b)


def test_one_backward_when_staging_is_off():
    st = method(staged_backward=False)
    parts = []
    with st.early_backward(lambda loss: parts.append(loss)):
        out = st.training_step(*batches(3), 0)
    assert parts == [] and out.loss.requires_grad
