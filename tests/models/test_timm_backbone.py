"""timm models as backbones: levels, strides, input sizes, strict loading of hub-style files, no network."""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm", reason="timm (with a torchvision that matches torch) is not importable")

from safetensors.torch import save_file  # noqa: E402

from plca.models.registry import IMAGENET_RGB, create_backbone, is_known_backbone  # noqa: E402
from plca.models.timm_backbone import (  # noqa: E402
    SimpleFeaturePyramid,
    TimmBackbone,
    normalization_from_cfg,
)
from plca.models.weights import WeightsError  # noqa: E402

VIT_DYNAMIC = {"dynamic_img_size": True, "dynamic_img_pad": True}


@dataclass(frozen=True)
class Family:
    name: str
    kwargs: dict
    out_channels: tuple[int, ...]
    strides: tuple[float, ...]
    #: keys of the classification model's file that the feature extractor has no use for
    ignored: frozenset[str]
    #: forward_intermediates indices of the source model that are our levels (the ViT: its last block)
    indices: tuple[int, ...]

    @property
    def plain(self) -> bool:
        return self.name.startswith("vit_")


FAMILIES = {
    "resnet": Family("resnet10t", {}, (64, 128, 256, 512), (4, 8, 16, 32),
                     frozenset({"fc.weight", "fc.bias"}), (1, 2, 3, 4)),
    "resnext": Family("resnext26ts", {}, (256, 512, 1024, 2048), (4, 8, 16, 32),
                      frozenset({"head.fc.weight", "head.fc.bias"}), (1, 2, 3, 4)),
    "convnext": Family("convnext_atto", {}, (40, 80, 160, 320), (4, 8, 16, 32),
                       frozenset({"head.fc.weight", "head.fc.bias", "head.norm.weight", "head.norm.bias"}),
                       (0, 1, 2, 3)),
    # DINOv2 ViT-S/14 with two blocks instead of twelve; no classifier (num_classes 0), final norm unused
    "dinov2": Family("vit_small_patch14_dinov2", {"depth": 2}, (96, 192, 384, 384), (3.5, 7, 14, 28),
                     frozenset({"norm.weight", "norm.bias"}), (1,)),
}


def source_model(family: Family) -> torch.nn.Module:
    """The whole classification model, as a hub file holds it (the ViT built to take any input size;
    the flags change no parameter)."""
    extra = VIT_DYNAMIC if family.plain else {}
    return timm.create_model(family.name, pretrained=False, **family.kwargs, **extra).eval()


def write_files(model: torch.nn.Module, folder: Path) -> dict[str, Path]:
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    files = {"safetensors": folder / "model.safetensors", "pth": folder / "pytorch_model.bin",
             "wrapped": folder / "checkpoint.pth"}
    save_file(state, str(files["safetensors"]))
    torch.save(state, files["pth"])
    torch.save({"state_dict": state, "epoch": 300}, files["wrapped"])
    return files


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family_setup(request, tmp_path_factory):
    family = FAMILIES[request.param]
    torch.manual_seed(0)
    source = source_model(family)
    files = write_files(source, tmp_path_factory.mktemp(request.param))
    return family, source, files


# ---------------------------------------------------------------- building

def test_prefix_name_builds_a_timm_backbone():
    assert is_known_backbone("timm:convnext_atto")
    backbone = create_backbone("timm:convnext_atto")
    assert isinstance(backbone, TimmBackbone) and backbone.name == "convnext_atto"
    assert backbone.out_channels == FAMILIES["convnext"].out_channels


@pytest.mark.parametrize("key", list(FAMILIES))
def test_levels_channels_strides_on_an_odd_input_size(key):
    family = FAMILIES[key]
    backbone = TimmBackbone(family.name, **family.kwargs).eval()
    assert backbone.out_channels == family.out_channels
    assert backbone.strides == family.strides
    height, width = 70, 98
    with torch.no_grad():
        levels = backbone(torch.randn(2, 3, height, width))
    assert [level.shape[1] for level in levels] == list(family.out_channels)
    for level, stride in zip(levels, family.strides):
        assert level.shape[0] == 2
        # "about H / stride": floor or ceil, by the model's padding
        assert math.floor(height / stride) <= level.shape[2] <= math.ceil(height / stride)
        assert math.floor(width / stride) <= level.shape[3] <= math.ceil(width / stride)


def test_vit_takes_sizes_that_are_not_multiples_of_the_patch():
    backbone = TimmBackbone("vit_small_patch14_dinov2", depth=2).eval()
    assert backbone.model_kwargs["dynamic_img_size"] and backbone.model_kwargs["dynamic_img_pad"]
    with torch.no_grad():
        levels = backbone(torch.randn(1, 3, 71, 99))  # padded to 84 x 112: a 6 x 8 patch grid
    assert [tuple(level.shape[2:]) for level in levels] == [(24, 32), (12, 16), (6, 8), (3, 4)]


def test_vit_patch16_pyramid_strides_are_integers():
    backbone = TimmBackbone("vit_tiny_patch16_224", depth=1)
    assert backbone.strides == (4, 8, 16, 32) and all(isinstance(s, int) for s in backbone.strides)
    assert backbone.out_channels == (48, 96, 192, 192)


def test_normalization_comes_from_the_pretrained_cfg():
    assert TimmBackbone("resnet10t").normalization == IMAGENET_RGB
    # timm's ViT-Ti/16 (AugReg) weights expect mean = std = 0.5
    inception = TimmBackbone("vit_tiny_patch16_224", depth=1).normalization
    assert inception.bgr is False and inception.mean == (127.5,) * 3 and inception.std == (127.5,) * 3
    assert normalization_from_cfg(None) == IMAGENET_RGB
    assert normalization_from_cfg({"mean": (0.5,), "std": (0.5,)}) == IMAGENET_RGB


def test_no_weight_decay_is_timms_declaration_in_our_names():
    # timm's ViT declares pos_embed, cls_token (and reg / dist tokens it may not have); the getter holds it as 'model'
    vit = TimmBackbone("vit_small_patch14_dinov2", depth=2)
    assert vit.no_weight_decay() == {"trunk.model.pos_embed", "trunk.model.cls_token"}
    assert vit.no_weight_decay() <= {name for name, _ in vit.named_parameters()}
    assert TimmBackbone("resnet10t").no_weight_decay() == set()  # timm's ResNet declares nothing


def test_styles():
    assert TimmBackbone("resnet10t", style=None).style is None
    assert create_backbone("timm:resnet10t", style="pytorch").style == "pytorch"
    with pytest.raises(ValueError, match="timm:resnet10t.*'caffe'"):
        create_backbone("timm:resnet10t", style="caffe")


def test_unknown_names_suggest_close_matches():
    with pytest.raises(ValueError, match="unknown timm model 'resnet5O'.*resnet50"):
        create_backbone("timm:resnet5O")
    with pytest.raises(ValueError, match="no pretrained tag 'bogus'.*a1_in1k"):
        TimmBackbone("resnet18.bogus")
    for remote in ("hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp/model"):
        with pytest.raises(ValueError, match="hub repositories and folders are not read"):
            create_backbone(f"timm:{remote}")


def test_a_pretrained_tag_is_accepted():
    assert TimmBackbone("vit_small_patch14_dinov2.lvd142m", depth=1).name == "vit_small_patch14_dinov2.lvd142m"


# ---------------------------------------------------------------- the pyramid

def test_simple_feature_pyramid_against_a_per_pixel_reference():
    torch.manual_seed(0)
    pyramid = SimpleFeaturePyramid(8).eval()
    x = torch.randn(2, 8, 3, 5)
    up4, up2, same, down2 = pyramid(x)
    assert same is x
    assert pyramid.out_channels == (2, 4, 8, 8)

    def transposed_2x2(inputs, conv):
        # a 2x2 stride-2 transposed convolution writes one 2x2 block per input pixel
        blocks = torch.einsum("bchw,cdij->bdhiwj", inputs, conv.weight)
        b, d, h, _, w, _ = blocks.shape
        return blocks.reshape(b, d, 2 * h, 2 * w) + conv.bias.view(1, -1, 1, 1)

    torch.testing.assert_close(up2, transposed_2x2(x, pyramid.up2))
    middle = transposed_2x2(x, pyramid.up4[0])
    mean = middle.mean(1, keepdim=True)
    var = middle.var(1, unbiased=False, keepdim=True)
    norm = pyramid.up4[1]
    normed = (middle - mean) / torch.sqrt(var + 1e-6) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(up4, transposed_2x2(F.gelu(normed), pyramid.up4[3]))
    # odd sides round up: the last row and column are pooled on their own
    expected = torch.stack([torch.stack([x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].amax((2, 3))
                                         for j in range(3)], -1) for i in range(2)], -2)
    torch.testing.assert_close(down2, expected)


# ---------------------------------------------------------------- weights

@pytest.mark.parametrize("layout", ["safetensors", "pth", "wrapped"])
def test_hub_style_files_load_strictly_and_give_the_source_models_features(family_setup, layout):
    family, source, files = family_setup
    backbone = TimmBackbone(family.name, **family.kwargs).eval()
    report = backbone.load_pretrained(files[layout])
    file_keys = set(source.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert set(report.ignored) == family.ignored
    assert set(report.loaded) == file_keys - family.ignored
    pyramid_keys = {f"pyramid.{k}" for k in backbone.pyramid.state_dict()} if family.plain else set()
    assert set(report.new) == pyramid_keys and (len(pyramid_keys) == 8) == family.plain
    assert report.resized == []

    x = torch.randn(1, 3, 70, 98)
    with torch.no_grad():
        levels = backbone(x)
        expected = source.forward_intermediates(x, indices=list(family.indices), intermediates_only=True)
    ours = [levels[2]] if family.plain else levels
    assert len(ours) == len(expected)
    for mine, theirs in zip(ours, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_report_names_the_new_pyramid_layers(tmp_path):
    torch.manual_seed(0)
    path = write_files(timm.create_model("vit_small_patch14_dinov2", depth=1), tmp_path)["safetensors"]
    text = str(TimmBackbone("vit_small_patch14_dinov2", depth=1).load_pretrained(path))
    assert "ignored 2: norm.bias, norm.weight" in text
    assert "new (not in the file) 8: pyramid.up4.0.weight" in text


def test_a_file_of_another_model_is_refused_naming_the_keys(tmp_path):
    torch.manual_seed(0)
    resnet18 = write_files(timm.create_model("resnet18"), tmp_path)["safetensors"]
    # resnet10t's deep stem is conv1.0 / conv1.1 / ...; resnet18 has a single conv1
    with pytest.raises(WeightsError, match=r"model\.safetensors.*resnet10t.*missing keys.*conv1\.0\.weight"
                                           r".*unexpected keys.*conv1\.weight"):
        TimmBackbone("resnet10t").load_pretrained(resnet18)
    with pytest.raises(WeightsError, match=r"shape mismatches.*layer1\.0\.conv1\.weight"):
        TimmBackbone("resnet50").load_pretrained(resnet18)


def test_a_vit_file_with_fewer_blocks_is_refused(tmp_path):
    torch.manual_seed(0)
    path = write_files(timm.create_model("vit_small_patch14_dinov2", depth=1), tmp_path)["safetensors"]
    with pytest.raises(WeightsError, match=r"missing keys.*blocks\.1\."):
        TimmBackbone("vit_small_patch14_dinov2", depth=2).load_pretrained(path)


def test_timm_filter_resizes_the_position_embedding(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", depth=1)  # 14 x 14 grid + class token
    path = write_files(source, tmp_path)["safetensors"]
    backbone = TimmBackbone("vit_tiny_patch16_224", depth=1, img_size=112)  # 7 x 7 grid
    report = backbone.load_pretrained(path)
    assert report.resized == ["pos_embed (1, 197, 192) -> (1, 50, 192)"]
    assert "resized by timm's converter 1: pos_embed (1, 197, 192) -> (1, 50, 192)" in str(report)
    expected = timm.layers.resample_abs_pos_embed(source.pos_embed.detach(), new_size=(7, 7), num_prefix_tokens=1)
    torch.testing.assert_close(backbone.trunk.model.pos_embed.detach(), expected)


def test_original_dinov2_layout_is_converted_by_timm(tmp_path):
    # the facebookresearch release holds a mask token that timm's DINOv2 converter drops
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch14_dinov2", depth=1)
    state = dict(source.state_dict(), mask_token=torch.zeros(1, 384))
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    backbone = TimmBackbone("vit_small_patch14_dinov2", depth=1)
    report = backbone.load_pretrained(tmp_path / "dinov2_vits14_pretrain.pth")
    assert "mask_token" not in report.loaded + report.ignored
    torch.testing.assert_close(backbone.trunk.model.cls_token, source.cls_token)


def test_drop_head_is_accepted(tmp_path):
    # the classifier is always dropped; the option of the DeepLab ResNet changes nothing here
    path = write_files(timm.create_model("resnet10t"), tmp_path)["pth"]
    report = TimmBackbone("resnet10t").load_pretrained(path, drop_head=True)
    assert set(report.ignored) == FAMILIES["resnet"].ignored


def test_missing_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="nothing.safetensors"):
        TimmBackbone("resnet10t").load_pretrained(tmp_path / "nothing.safetensors")


# ---------------------------------------------------------------- no network

def test_building_and_loading_never_reach_the_network(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t").eval()
    path = write_files(source, tmp_path)["safetensors"]

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    for target in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, target, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    for module, names in ((timm.models._builder, ("load_pretrained", "load_custom_pretrained",
                                                  "load_state_dict_from_url", "download_cached_file")),
                          (timm.models._hub, ("download_cached_file", "load_state_dict_from_hf",
                                              "load_model_config_from_hf", "hf_hub_download"))):
        for name in names:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)

    backbone = create_backbone("timm:resnet10t").eval()
    backbone.load_pretrained(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[-1], source.forward_features(x), rtol=0, atol=0)


def test_channels_last_models_give_nchw_maps(tmp_path):
    # timm's Swin gives (B, H, W, C) maps; a small one: one block per stage, 32 channels
    torch.manual_seed(0)
    small = {"depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "embed_dim": 32}
    source = timm.create_model("swin_tiny_patch4_window7_224", **small).eval()
    backbone = TimmBackbone("swin_tiny_patch4_window7_224", **small).eval()
    backbone.load_pretrained(write_files(source, tmp_path)["safetensors"])
    assert backbone.out_channels == (32, 64, 128, 256) and backbone.strides == (4, 8, 16, 32)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        levels = backbone(x)
        expected = source.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
    assert [tuple(level.shape) for level in levels] == [(1, 32, 56, 56), (1, 64, 28, 28), (1, 128, 14, 14),
                                                        (1, 256, 7, 7)]
    for mine, theirs in zip(levels, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
