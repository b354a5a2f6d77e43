"""A new backbone is a new file: a toy backbone defined here alone registers with its contract (its own
style, input normalisation per style, no-decay parameters, weight layout) and the project takes it as
it does a built-in one: the config checks its style, the segmentor normalises its input with its own
mean / std, AdamW leaves its declared parameters undecayed, it trains and resumes exactly, and
``plca weights`` names its files. Every registration is undone when its test ends."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plca.config import ConfigError, build_config, replace_model, validate
from plca.engine.optim import build_optimizer, no_decay_names
from plca.models.normalization import Normalization
from plca.models.registry import (BackboneContract, WeightLayout, WeightsIdentity, backbone_names, backbone_styles,
                                  is_known_backbone, register_backbone, unregister_backbone, weight_layouts)
from plca.models.segmentor import SegmentorSpec, build_segmentor
from plca.models.weights import LoadReport, load_strict, read_state_dict

TOY = "toy_net"
#: the toy's input with model.style null: BGR, its own mean / std in 0-255 units
PLAIN = Normalization(bgr=True, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))
#: its style "warm": RGB in [0, 1], its own mean / std
WARM = Normalization.from_unit_range(mean=(0.25, 0.5, 0.75), std=(0.5, 0.25, 0.125))
FILE_PREFIX = "toy."  # the toy's published weight layout names every tensor toy.<name>


class ToyBackbone(nn.Module):
    """Two levels at strides 4 and 8; ``gain`` is the parameter it declares exempt from weight decay."""

    out_channels = (8, 16)
    strides = (4, 8)

    def __init__(self, style: str | None = None) -> None:
        super().__init__()
        self.style = style
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.gain = nn.Parameter(torch.ones(1, 16, 1, 1))

    def forward(self, x):
        fine = F.relu(self.norm(self.stem(x)))
        return [fine, F.relu(self.down(fine)) * self.gain]

    def no_weight_decay(self) -> set[str]:
        return {"gain"}

    def load_pretrained(self, path, drop_head: bool = False) -> LoadReport:
        state = {key.removeprefix(FILE_PREFIX): value for key, value in read_state_dict(path).items()}
        return load_strict(self, state, Path(path), "toy backbone", ignored=[])


def identify_toy(tensors) -> WeightsIdentity | None:
    if f"{FILE_PREFIX}stem.weight" not in tensors:
        return None
    return WeightsIdentity("the toy net (two convolutions)", backbone=TOY, style="warm")


CONTRACT = BackboneContract(family="Toy", normalization=PLAIN, styles={"warm": WARM},
                            weight_layouts=(WeightLayout("toy-layout", "the toy's names under toy.", identify_toy),))


@contextlib.contextmanager
def registered_toy():
    register_backbone(TOY, contract=CONTRACT)(ToyBackbone)
    try:
        yield
    finally:
        unregister_backbone(TOY)


@pytest.fixture
def toy():
    with registered_toy():
        yield


def test_registration_is_undone():
    with registered_toy():
        assert is_known_backbone(TOY) and "warm" in backbone_styles()
        assert "toy-layout" in [layout.name for layout in weight_layouts()]
    assert not is_known_backbone(TOY) and TOY not in backbone_names()
    assert "warm" not in backbone_styles() and "toy-layout" not in [layout.name for layout in weight_layouts()]


def test_it_normalises_its_input_with_its_own_mean_and_std(toy):
    images = torch.rand(2, 3, 24, 32) * 255
    plain = build_segmentor(SegmentorSpec(backbone=TOY, head="deeplabv2_reduced"), 3)
    assert plain.style is None and plain.normalizer.normalization == PLAIN
    expected = (images.flip(1) - torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)) / torch.tensor(
        [2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(plain.normalizer(images), expected)

    warm = build_segmentor(SegmentorSpec(backbone=TOY, head="daformer", style="warm", head_width=8), 3)
    assert warm.style == warm.backbone.style == warm.normalizer.style == "warm"
    expected = (images / 255 - torch.tensor([0.25, 0.5, 0.75]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    torch.testing.assert_close(warm.normalizer(images), expected)
    assert warm.describe()["normalization"] == {"bgr": False, "mean": [63.75, 127.5, 191.25],
                                                "std": [127.5, 63.75, 31.875]}
    output = warm(images.to(torch.uint8))
    assert output["logits"].shape == (2, 3, 6, 8)


def test_the_config_checks_its_style_by_its_contract(toy):
    data = {"classes": ["road", "car"], "source": {"format": "folder", "root": "/s", "split": "train"}}
    config = build_config({"data": data, "model": {"backbone": TOY, "style": "warm", "head": "deeplabv2_reduced"}})
    assert config.model.style == "warm"
    with pytest.raises(ConfigError, match=f"model.style caffe is for the ResNet backbones only; {TOY} has its own"):
        build_config({"data": data, "model": {"backbone": TOY, "style": "caffe"}})
    with pytest.raises(ConfigError, match="model.style warm is for the Toy backbones only; resnet18 has its own"):
        build_config({"data": data, "model": {"backbone": "resnet18", "style": "warm"}})
    with pytest.raises(ConfigError, match="model.style must be 'caffe', 'pytorch', 'v1c', 'warm' or null"):
        build_config({"data": data, "model": {"backbone": TOY, "style": "tf"}})
    with pytest.raises(ValueError, match="backbone 'toy_net' has no style 'caffe'; leave model.style unset or "
                                         "choose one of: warm"):
        build_segmentor(SegmentorSpec(backbone=TOY, style="caffe"), 3)


def test_its_declared_parameters_are_the_no_decay_group(toy):
    model = build_segmentor(SegmentorSpec(backbone=TOY, head="deeplabv2_reduced"), 3)
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.01, head_lr_mult=10.0, kind="adamw")
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0.0
                 for p in group["params"]}
    assert undecayed == {"backbone.gain"}
    assert no_decay_names(model, "norm_bias_position") == {
        "backbone.gain", "backbone.stem.bias", "backbone.norm.weight", "backbone.norm.bias", "backbone.down.bias",
        "head.convs.0.bias", "head.convs.1.bias"}


def toy_config(data_root: Path, out: Path, run_name: str):
    from tiny_runs import tiny_source_only_config

    config = tiny_source_only_config(data_root, out, run_name, iters=4, optimizer="adamw", lr=1e-3,
                                     weight_decay=0.05)
    config = replace_model(config, backbone=TOY, style="warm", head="deeplabv2_reduced")
    validate(config)
    return config


@pytest.mark.slow
def test_it_trains_and_resumes_exactly(toy, tmp_path):
    from dataset_writers import write_folder
    from plca.engine.checkpoint import load_checkpoint
    from plca.engine.trainer import train
    from plca.models.trained import inspect_model_file, load_model_file

    data = tmp_path / "data"
    write_folder(data, classes_count=3, splits={"train": 8}, size=(40, 56), seed=0)
    full = train(toy_config(data, tmp_path / "runs", "full"), progress=False)
    part = train(toy_config(data, tmp_path / "runs", "part"), max_steps=2, progress=False)
    assert part.step == 2
    resumed = train(toy_config(data, tmp_path / "runs", "part"), resume=part.run_dir, progress=False)
    assert full.step == resumed.step == 4

    expected = load_checkpoint(full.run_dir / "checkpoints" / "last.pt")["model"]
    state = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")["model"]
    assert state.keys() == expected.keys() and "backbone.gain" in state
    for key in expected:
        assert torch.equal(state[key], expected[key]), key
    assert not torch.equal(expected["backbone.gain"], torch.ones(1, 16, 1, 1))  # it trained, undecayed

    file = inspect_model_file(full.run_dir / "checkpoints" / "last.pt")
    assert (file.description["backbone"], file.description["style"]) == (TOY, "warm")
    model = load_model_file(file)
    assert model.normalizer.normalization == WARM and dataclasses.asdict(WARM) == {
        "bgr": False, "mean": (63.75, 127.5, 191.25), "std": (127.5, 63.75, 31.875)}


def test_plca_weights_names_and_converts_its_layout(toy, tmp_path, capsys):
    from plca.cli import main

    torch.manual_seed(0)
    source = ToyBackbone()
    torch.save({FILE_PREFIX + key: value for key, value in source.state_dict().items()}, tmp_path / "toy.pth")
    assert main(["weights", "inspect", str(tmp_path / "toy.pth")]) == 0
    text = capsys.readouterr().out
    assert "toy-layout: the toy's names under toy." in text and f"model.backbone={TOY} model.style=warm" in text
    assert main(["weights", "convert", str(tmp_path / "toy.pth"), str(tmp_path / "toy.safetensors")]) == 0
    converted = ToyBackbone()
    converted.load_pretrained(tmp_path / "toy.safetensors")
    for key, value in source.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
