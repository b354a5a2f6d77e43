"""``self_training.pseudo_label.image_margins``: HRDA's pseudo-label cropping v2, from the config to the loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dataset_writers import write_folder
from tiny_runs import TINY_BACKBONE  # registers the tiny backbone
from plca.config import ConfigError, build_config, load_config
from plca.engine.trainer import train
from plca.methods import MethodContext, build_method
from plca.methods.addons.pseudo_labels import pseudo_labels
from plca.models import build_segmentor

CLASSES = ["road", "car", "sky"]
CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"
HRDA_MARGINS = [30, 240, 30, 30]  # lhoyer/HRDA/configs/hrda/gtaHR2csHR_hrda.py, crop_pseudo_margins


def config_dict(**pseudo_label):
    return {"method": "self_training",
            "data": {"classes": CLASSES, "source": {"root": "/s"}, "target": {"root": "/t"}},
            "model": {"backbone": TINY_BACKBONE}, "self_training": {"pseudo_label": pseudo_label}}


def method(**pseudo_label):
    config = build_config(config_dict(**pseudo_label))
    torch.manual_seed(0)
    segmentor = build_segmentor(config.model, len(CLASSES)).train()
    context = MethodContext(loss=config.loss, options=config.method_options, plca=config.plca,
                            classes=tuple(CLASSES), model=config.model, seed=0)
    return build_method("self_training", segmentor, context)


def target_batch(with_mask=True):
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.rand(2, 3, 16, 24, generator=g) * 255, "label": torch.full((2, 16, 24), 255)}
    if with_mask:
        batch["border_valid"] = torch.rand(2, 16, 24, generator=g) > 0.3
    return batch


def test_the_weights_are_the_confidence_share_times_the_border_mask():
    st = method(image_margins=[1, 2, 3, 4], threshold=0.0)
    assert st.target_border_margins() == (1, 2, 3, 4)
    target, logs = target_batch(), {}
    labels, weights = st._pseudo_labels(target, logs)
    reference_labels, reference = pseudo_labels(st.teacher(target["image"])["logits"].float(), (16, 24), 0.0)
    assert torch.equal(labels, reference_labels) and bool((reference == 1.0).all())
    torch.testing.assert_close(weights, reference * target["border_valid"].float())
    torch.testing.assert_close(logs["pseudo/weight"], weights.mean())


def test_without_margins_no_mask_is_asked_for_or_applied():
    st = method(threshold=0.0)
    assert st.target_border_margins() is None
    _, weights = st._pseudo_labels(target_batch(), {})
    assert bool((weights == 1.0).all())


def test_a_target_batch_without_its_mask_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="image_margins is set but the target batch has no 'border_valid'"):
        method(image_margins=[1, 1, 1, 1])._pseudo_labels(target_batch(with_mask=False), {})


@pytest.mark.parametrize("options, message", [
    ({"image_margins": [1, 2, 3]}, r"image_margins must be \[top, bottom, left, right\]"),
    ({"image_margins": [1, 2, 3, -1]}, r"image_margins must be \[top, bottom, left, right\]"),
    ({"image_margins": [1, 2, 3, 4], "ignore_top": 15}, "two ways to mask the borders"),
])
def test_bad_margins_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        build_config(config_dict(**options))


def test_the_cityscapes_target_hrda_configs_crop_pseudo_labels_as_hrda():
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(path)
        if config.method != "self_training":
            continue
        margins = config.method_options.pseudo_label.image_margins
        hrda_on_cityscapes = config.model.hrda.enabled and config.data.target.format == "cityscapes"
        assert margins == (HRDA_MARGINS if hrda_on_cityscapes else None), path.name
        if hrda_on_cityscapes:
            assert config.method_options.pseudo_label.ignore_top == 0, path.name


@pytest.mark.slow
def test_a_run_masks_the_pseudo_labels_within_the_margins(tmp_path):
    """Through the loader and the engine: margins covering every image leave no pseudo-label weight."""
    write_folder(tmp_path / "data", classes_count=3, splits={"train": 4}, size=(24, 32), seed=0)

    def logged_weights(run_name, margins):
        config = build_config({
            **config_dict(threshold=0.0, image_margins=margins),
            "data": {"classes": CLASSES, "num_workers": 0,
                     "source": {"format": "folder", "root": str(tmp_path / "data"), "split": "train"},
                     "target": {"format": "folder", "root": str(tmp_path / "data"), "split": "train"}},
            "train": {"iters": 2, "batch_size": 2, "crop_size": [16, 16], "eval_every": 0, "log_every": 1,
                      "image_every": 0},
            "output_dir": str(tmp_path / "runs"), "run_name": run_name, "device": "cpu"})
        run = train(config, progress=False)
        lines = (run.run_dir / "scalars.jsonl").read_text().splitlines()
        return [json.loads(line)["pseudo/weight"] for line in lines]

    assert logged_weights("none", [0, 0, 0, 0]) == [1.0, 1.0]
    assert logged_weights("all", [0, 24, 0, 0]) == [0.0, 0.0]  # every row is within 24 of the bottom
