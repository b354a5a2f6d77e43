"""HRDA inside the methods: its loss, PLCA on the detail crops, 2-update runs and exact resume with the teacher."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dataset_writers import write_folder
from run_checks import assert_resume_is_exact
from plca.config import ConfigError, build_config
from plca.engine.trainer import train
from plca.methods import MethodContext, build_method
from plca.methods.addons import detail_view, multi_resolution_loss
from plca.models import build_segmentor

CLASSES = ["road", "car", "sky"]
HRDA = {"enabled": True, "detail_crop_size": [32, 32], "attention_head": "daformer_attention"}
MODEL = {"backbone": "mit_b0", "head": "daformer", "head_width": 16, "features": "head_embedding", "hrda": HRDA}
#: no dropout or drop-path: a resumed run's global RNG differs from the uninterrupted one's (the data loader's
#: new iterator draws from it), so the exact-resume test uses a network without global draws in its step;
#: output stride 8 at context scale 0.5: the detail box on a 16-pixel grid, the attention head a copy of the head
RESUME_MODEL = {"backbone": "resnet18", "style": "pytorch", "head": "deeplabv2_reduced",
                "hrda": {"enabled": True, "detail_crop_size": [32, 32], "crop_divisible": 16}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hrda_data")
    write_folder(root, classes_count=3, splits={"train": 6, "val": 2}, size=(72, 96), seed=0)
    return root


def test_the_multi_resolution_loss_is_hrdas_weighted_sum_of_fused_and_detail_in_its_box():
    g = torch.Generator().manual_seed(0)
    output = {"logits": torch.randn(2, 3, 16, 16, generator=g), "detail_logits": torch.randn(2, 3, 8, 8, generator=g),
              "detail_box": torch.tensor([8, 40, 24, 56]), "detail_loss_weight": torch.tensor(0.1),
              "features": torch.randn(2, 5, 8, 8, generator=g)}
    labels = torch.randint(0, 3, (2, 64, 64), generator=g)

    def ce(logits, target, _weights):
        return F.cross_entropy(F.interpolate(logits, size=target.shape[-2:], mode="bilinear"), target)

    total, detail = multi_resolution_loss(output, labels, ce)
    expected_detail = ce(output["detail_logits"], labels[:, 8:40, 24:56], None)
    torch.testing.assert_close(detail, expected_detail)
    torch.testing.assert_close(total, 0.9 * ce(output["logits"], labels, None) + 0.1 * expected_detail)
    view, cropped = detail_view(output, labels)
    assert view["logits"] is output["detail_logits"] and torch.equal(cropped, labels[:, 8:40, 24:56])
    single = {"logits": output["logits"], "features": output["features"]}
    assert detail_view(single, labels) == (single, labels)
    torch.testing.assert_close(multi_resolution_loss(single, labels, ce)[0], ce(output["logits"], labels, None))


def _method(name, **sections):
    config = build_config({"method": name, "data": {"classes": CLASSES, "source": {"root": "/s"},
                                                    "target": {"root": "/t"}},
                           "model": MODEL, "train": {"crop_size": [64, 64]}, **sections})
    torch.manual_seed(0)
    context = MethodContext(loss=config.loss, options=config.method_options, plca=config.plca,
                            classes=tuple(CLASSES), model=config.model, seed=0)
    return build_method(name, build_segmentor(config.model, 3).train(), context)


def test_a_self_training_step_with_mic_and_plca_on_hrda_has_every_term_and_plca_reads_the_detail_crops():
    st = _method("self_training", self_training={"masking": {"enabled": True, "patch_size": 8},
                                                 "pseudo_label": {"threshold": 0.0}},
                 plca={"association": {"feature_weight": 0.1, "classifier_weight": 0.1}},
                 eval={"test_time_aggregation": False})
    g = torch.Generator().manual_seed(0)
    source = {"image": torch.rand(2, 3, 64, 64, generator=g) * 255,
              "label": torch.randint(0, 3, (2, 64, 64), generator=g)}
    target = {"image": torch.rand(2, 3, 64, 64, generator=g) * 255}
    seen = []
    original = st.segment
    st.segment = lambda images, **kw: seen.append(original(images, **kw)) or seen[-1]  # type: ignore[method-assign]
    out = st.training_step(source, target, 0)
    for key in ("loss/source_ce", "loss/source_ce_detail", "loss/mix_ce", "loss/masked_ce", "loss/assoc_feature"):
        assert key in out.logs and torch.isfinite(out.logs[key]), key
    assert all("detail_logits" in o for o in seen)  # every student forward is HRDA's
    out.loss.backward()
    grads = [p.grad for p in st.student.multi_resolution.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in st.teacher.parameters())


def test_plca_with_hrda_needs_test_time_aggregation_off():
    with pytest.raises(ConfigError, match="eval.test_time_aggregation"):
        build_config({"method": "plca",
                      "data": {"classes": CLASSES, "source": {"root": "/s"}, "target": {"root": "/t"}},
                      "model": MODEL, "train": {"crop_size": [64, 64]}})


def _config(data, out, run_name, method="self_training", iters=2, model=None, **extra):
    config = {
        "method": method,
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(data), "split": "train"},
                 "target": {"format": "folder", "root": str(data), "split": "train"},
                 "val": {"format": "folder", "root": str(data), "split": "val"}, "num_workers": 0},
        "model": model or MODEL,
        "train": {"iters": iters, "batch_size": 2, "crop_size": [64, 64], "lr": 1e-3, "optimizer": "adamw",
                  "warmup_iters": 1, "eval_every": 0, "checkpoint_every": 100, "log_every": 1, "image_every": 0},
        "eval": {"test_time_aggregation": False},
        "output_dir": str(out), "run_name": run_name, "device": "cpu",
    }
    if method == "self_training":
        config["self_training"] = {"masking": {"enabled": True, "patch_size": 8}, "pseudo_label": {"threshold": 0.0}}
    if method in ("self_training", "plca"):
        config["plca"] = {"association": {"feature_weight": 0.1, "classifier_weight": 0.1}}
    return build_config(config, [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["source_only", "plca"])
def test_source_only_and_plca_train_two_updates_with_hrda(data, tmp_path, method):
    result = train(_config(data, tmp_path, method, method=method), progress=False)
    assert result.step == 2
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 100.0
    lines = [json.loads(line) for line in (result.run_dir / "scalars.jsonl").read_text().splitlines()]
    assert all(line["loss/source_ce_detail"] > 0 for line in lines)
    # the saved model rebuilds as HRDA from the file alone (its description carries model.hrda)
    from plca.inference import load_for_inference

    model, _, _ = load_for_inference(result.run_dir)
    assert model.multi_resolution is not None and model.multi_resolution.options.detail_crop_size == [32, 32]
    with torch.no_grad():
        assert model(torch.rand(1, 3, 72, 96) * 255)["logits"].shape == (1, 3, 18, 24)


@pytest.mark.slow
def test_resumed_hrda_self_training_with_mic_and_plca_equals_an_uninterrupted_run_teacher_included(data, tmp_path):
    full, _ = assert_resume_is_exact(lambda name: _config(data, tmp_path, name, iters=4, model=RESUME_MODEL),
                                     teacher_prefix="teacher.model.multi_resolution.")
    lines = [json.loads(line) for line in (full.run_dir / "scalars.jsonl").read_text().splitlines()]
    assert all(line["loss/masked_ce"] > 0 and line["loss/assoc_feature"] >= 0 for line in lines)


CONFIGS = __import__("pathlib").Path(__file__).resolve().parent.parent.parent / "configs"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gta2cityscapes_hrda_mitb5.yaml", "gta2cityscapes_mic_hrda_mitb5_plca.yaml",
                                  "synthia2cityscapes_mic_hrda_mitb5.yaml", "gta2cityscapes_hrda_deeplabv2_plca.yaml"])
def test_shipped_hrda_configs_train_two_updates_at_reduced_sizes(data, tmp_path, name):
    from plca.config import load_config

    small_model = (["model.backbone=mit_b0", "model.head_width=16"] if "mitb5" in name
                   else ["model.backbone=resnet18", "model.style=pytorch", "model.hrda.crop_divisible=16"])
    folder = [f"data.{split}.{key}" for split in ("source", "target", "val") for key in ("format=folder",)]
    overrides = [*folder, f"data.source.root={data}", f"data.target.root={data}", f"data.val.root={data}",
                 "data.source.split=train", "data.target.split=train", "data.val.split=val",
                 f"data.classes=[{','.join(CLASSES)}]", "data.rare_class_sampling.min_pixels=30", "data.num_workers=0",
                 *small_model, "model.pretrained=null", "self_training.feature_distance.enabled=false",
                 "model.hrda.detail_crop_size=[32,32]", "model.hrda.test_crop_size=[64,64]",
                 "model.hrda.test_stride=[32,32]", "self_training.masking.patch_size=8",
                 "train.crop_size=[64,64]", "train.shorter_side=null", "train.target_shorter_side=null",
                 "eval.size=null", "train.iters=2", "train.batch_size=2", f"output_dir={tmp_path}", "device=cpu"]
    config = load_config(CONFIGS / name, overrides)
    assert config.model.hrda.enabled and config.model.hrda.context_scale == 0.5
    result = train(config, progress=False)
    assert result.step == 2 and (result.run_dir / "metrics.json").is_file()
    lines = [json.loads(line) for line in (result.run_dir / "scalars.jsonl").read_text().splitlines()]
    assert all(line["loss/source_ce_detail"] > 0 for line in lines)
    assert ("loss/masked_ce" in lines[-1]) == ("mic" in name)
    assert ("loss/assoc_feature" in lines[-1]) == name.endswith("_plca.yaml")
