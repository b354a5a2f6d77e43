"""Weight files: strict ImageNet loading, unsafe pickles, the authors' checkpoint layout, safetensors."""

from __future__ import annotations

import os

import pytest
import torch

from plca.data.labels import CITYSCAPES_CLASSES, SYNTHIA16_CLASSES, SYNTHIA13_CLASSES
from plca.models.deeplab import PLCA_AUTHORS_CLASS_ORDER, build_deeplab_v2, load_authors_checkpoint
from plca.models.resnet import ResNet
from plca.models.resnet import load_resnet_weights as load_imagenet_weights
from plca.models.segmentor import Segmentor
from plca.models.weights import (
    LoadReport,
    WeightsError,
    load_safetensors_into,
    read_state_dict,
    save_safetensors,
)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter and BN statistic distinctive values (fresh BN stats are all 0 / 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if key.endswith("num_batches_tracked"):
                tensor.fill_(seed)
            elif key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return module


def assert_same_tensors(a: dict, b: dict, skip_counters: bool = True) -> None:
    keys = [k for k in a if not (skip_counters and k.endswith("num_batches_tracked"))]
    assert keys
    for key in keys:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def imagenet_state() -> dict:
    """A resnet18 ImageNet-style file content: torchvision layout with the fc classifier."""
    state = dict(randomized(ResNet(18), seed=3).state_dict())
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    return state


# ---------------------------------------------------------------- ImageNet weights

def test_torchvision_layout_round_trip(tmp_path, imagenet_state):
    torch.save(imagenet_state, tmp_path / "w.pth")
    net = ResNet(18)
    report = load_imagenet_weights(net, tmp_path / "w.pth")
    assert_same_tensors({k: v for k, v in imagenet_state.items() if not k.startswith("fc.")}, net.state_dict())
    assert {"fc.weight", "fc.bias"} <= set(report.ignored)
    assert report.missing == [] and report.unexpected == []
    assert "conv1.weight" in report.loaded and not any(k.startswith("fc.") for k in report.loaded)
    text = str(report)
    assert "ignored" in text and "fc.weight" in text


def test_caffe_conversion_with_scale_prefix_and_no_counters(tmp_path, imagenet_state):
    converted = {}
    for key, value in imagenet_state.items():
        if key.endswith("num_batches_tracked"):
            continue  # the Caffe conversion has none
        if ".bn" in key or key.startswith("bn1"):
            key = "Scale." + key
        converted[key] = value
    converted["layer1.0.Scale.bn2.weight"] = converted.pop("Scale.layer1.0.bn2.weight")  # mid-key too
    torch.save({"state_dict": converted}, tmp_path / "caffe.pth")
    net = ResNet(18)
    counters_before = {k: v.clone() for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")}
    report = load_imagenet_weights(net, tmp_path / "caffe.pth")
    assert_same_tensors({k: v for k, v in imagenet_state.items() if not k.startswith("fc.")}, net.state_dict())
    assert "bn1.weight" in report.loaded and not any("Scale" in k for k in report.loaded)
    for key, value in counters_before.items():
        assert torch.equal(net.state_dict()[key], value)


def test_missing_key_is_an_error_listing_it(tmp_path, imagenet_state):
    broken = {k: v for k, v in imagenet_state.items() if k != "layer3.1.bn2.running_var"}
    torch.save(broken, tmp_path / "w.pth")
    net = ResNet(18)
    before = net.conv1.weight.detach().clone()
    with pytest.raises(WeightsError, match=r"missing keys \(1\): layer3\.1\.bn2\.running_var"):
        load_imagenet_weights(net, tmp_path / "w.pth")
    assert torch.equal(net.conv1.weight, before)  # nothing was loaded


def test_unexpected_key_is_an_error(tmp_path, imagenet_state):
    torch.save(dict(imagenet_state, **{"layer5.0.conv1.weight": torch.zeros(1)}), tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): layer5\.0\.conv1\.weight"):
        load_imagenet_weights(ResNet(18), tmp_path / "w.pth")


def test_deeplab_coco_resnet_is_recognised_and_its_classifier_dropped_on_request(tmp_path, imagenet_state):
    # DeepLab's COCO-initialised Caffe ResNet: 'Scale.'-prefixed keys plus its old ASPP as layer5.conv2d_list.*
    coco = {f"Scale.{k}" if k.startswith("bn1") else k: v for k, v in imagenet_state.items() if not k.startswith("fc.")}
    for branch in range(4):
        coco[f"Scale.layer5.conv2d_list.{branch}.weight"] = torch.randn(21, 512, 3, 3)
        coco[f"Scale.layer5.conv2d_list.{branch}.bias"] = torch.randn(21)
    torch.save(coco, tmp_path / "coco.pth")
    with pytest.raises(WeightsError, match=r"COCO-initialised Caffe ResNet-101.*8 tensors layer5\.conv2d_list.*"
                                           r"model\.drop_pretrained_head=true"):
        load_imagenet_weights(ResNet(18), tmp_path / "coco.pth")
    net = ResNet(18)
    report = load_imagenet_weights(net, tmp_path / "coco.pth", drop_head=True)
    assert sum("DeepLab COCO classifier" in key for key in report.ignored) == 8
    assert_same_tensors({k: v for k, v in imagenet_state.items() if not k.startswith("fc.")}, net.state_dict())
    # the flag drops nothing else: a foreign key still fails
    coco["layer6.weight"] = torch.zeros(1)
    torch.save(coco, tmp_path / "coco2.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): layer6\.weight"):
        load_imagenet_weights(ResNet(18), tmp_path / "coco2.pth", drop_head=True)


def test_shape_mismatch_is_an_error(tmp_path, imagenet_state):
    bad = dict(imagenet_state, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"conv1\.weight \(file \(64, 3, 3, 3\), model \(64, 3, 7, 7\)\)"):
        load_imagenet_weights(ResNet(18), tmp_path / "bad.pth")


def test_weights_of_another_depth_are_an_error(tmp_path, imagenet_state):
    torch.save(imagenet_state, tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"r18\.pth' does not fit the ResNet-34 backbone: missing keys \(80\)"):
        load_imagenet_weights(ResNet(34), tmp_path / "r18.pth")  # same shapes, more blocks


def test_bottleneck_layout_round_trip(tmp_path):
    source = randomized(ResNet(50, "pytorch"), seed=5)
    torch.save(source.state_dict(), tmp_path / "r50.pth")
    net = ResNet(50, "caffe")  # same keys in both styles
    report = load_imagenet_weights(net, tmp_path / "r50.pth")
    assert_same_tensors(source.state_dict(), net.state_dict())
    assert len(report.loaded) == 265  # 318 keys minus 53 counters


# ---------------------------------------------------------------- reading files

class RunsCode:
    """Pickles into a call of os.system: loading it unsafely would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"conv1.weight": torch.zeros(1), "payload": RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"evil\.pth.*contains code or non-tensor objects.*not loaded for safety"):
        read_state_dict(tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="not loaded for safety"):
        load_imagenet_weights(ResNet(18), tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.pth' does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        read_state_dict(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match=r"junk\.safetensors.*not a readable \.safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match=r"list\.pth' holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match=r"holds no state dict.*'epoch', 'optimizer'"):
        read_state_dict(tmp_path / "meta.pth")


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "weights"])
def test_wrapped_state_dicts_are_unwrapped(tmp_path, wrapper):
    state = {"a": torch.arange(3.0)}
    torch.save({wrapper: state, "epoch": 7}, tmp_path / "w.pth")
    assert_same_tensors(read_state_dict(tmp_path / "w.pth"), state)


def test_safetensors_files_are_read(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.arange(4.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["a"], torch.arange(4.0))


def test_load_report_str():
    report = LoadReport(loaded=["a", "b"], missing=[], unexpected=[], ignored=["fc.bias"])
    assert str(report) == "loaded 2 tensors; ignored 1: fc.bias"
    report.ignored += ["layer1.0.bn1.num_batches_tracked", "bn1.num_batches_tracked"]
    assert str(report) == "loaded 2 tensors; ignored 3: fc.bias and 2 num_batches_tracked"


# ---------------------------------------------------------------- the authors' checkpoints

def authors_file(model: Segmentor, path) -> None:
    """Save ``model`` in the authors' layout, treating its output channels as in their class order."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("head.convs."):
            branch = key.split(".")[2]
            key = f"classifier.0.convs.{branch}.0.weight"
        state[key] = value
    torch.save({"weights": state}, path)


def theirs_and_ours(num_their_classes: int, our_classes, seed: int = 0):
    torch.manual_seed(seed)
    theirs = randomized(build_deeplab_v2(num_their_classes, backbone="resnet18"), seed=seed + 1).eval()
    ours = build_deeplab_v2(len(our_classes), backbone="resnet18").eval()
    return theirs, ours


def check_permuted_logits(theirs, ours, their_order, our_classes):
    images = torch.rand(1, 3, 41, 49) * 255
    with torch.no_grad():
        their_logits, our_logits = theirs(images)["logits"], ours(images)["logits"]
    for i, name in enumerate(our_classes):
        torch.testing.assert_close(our_logits[:, i], their_logits[:, their_order.index(name)])


def test_authors_class_order_is_a_permutation_of_cityscapes():
    assert sorted(PLCA_AUTHORS_CLASS_ORDER) == sorted(CITYSCAPES_CLASSES)
    assert PLCA_AUTHORS_CLASS_ORDER[:3] == ("sky", "building", "road")
    assert PLCA_AUTHORS_CLASS_ORDER[8] == "traffic sign" and PLCA_AUTHORS_CLASS_ORDER[12] == "traffic light"


def test_authors_gta5_checkpoint_loads_and_permutes_classes(tmp_path):
    theirs, ours = theirs_and_ours(19, CITYSCAPES_CLASSES)
    authors_file(theirs, tmp_path / "g2c.pth")
    report = load_authors_checkpoint(ours, tmp_path / "g2c.pth", CITYSCAPES_CLASSES)
    assert report.missing == [] and report.unexpected == []
    assert all(k.endswith("num_batches_tracked") for k in report.ignored)
    assert_same_tensors(
        {k: v for k, v in theirs.state_dict().items() if k.startswith("backbone.")}, ours.state_dict())
    check_permuted_logits(theirs, ours, PLCA_AUTHORS_CLASS_ORDER, CITYSCAPES_CLASSES)


def test_authors_synthia_checkpoint_loads_16_classes(tmp_path):
    synthia_order = [c for c in PLCA_AUTHORS_CLASS_ORDER if c not in ("terrain", "truck", "train")]
    theirs, ours = theirs_and_ours(16, SYNTHIA16_CLASSES, seed=2)
    authors_file(theirs, tmp_path / "s2c.pth")
    load_authors_checkpoint(ours, tmp_path / "s2c.pth", SYNTHIA16_CLASSES)
    check_permuted_logits(theirs, ours, synthia_order, SYNTHIA16_CLASSES)
    # a 13-class model picks its channels out of the same file
    _, ours13 = theirs_and_ours(16, SYNTHIA13_CLASSES)
    load_authors_checkpoint(ours13, tmp_path / "s2c.pth", SYNTHIA13_CLASSES)
    check_permuted_logits(theirs, ours13, synthia_order, SYNTHIA13_CLASSES)


def test_authors_checkpoint_lacking_a_needed_class_is_an_error(tmp_path):
    theirs, ours = theirs_and_ours(16, CITYSCAPES_CLASSES)
    authors_file(theirs, tmp_path / "s2c.pth")
    with pytest.raises(WeightsError, match="terrain, truck, train"):
        load_authors_checkpoint(ours, tmp_path / "s2c.pth", CITYSCAPES_CLASSES)


def test_authors_checkpoint_with_foreign_keys_or_wrong_style_is_an_error(tmp_path):
    theirs, ours = theirs_and_ours(19, CITYSCAPES_CLASSES)
    state = {("extra.conv.weight" if k == "backbone.conv1.weight" else k): v
             for k, v in theirs.state_dict().items()}
    state = {(f"classifier.0.convs.{k.split('.')[2]}.0.weight" if k.startswith("head.") else k): v
             for k, v in state.items()}
    torch.save({"weights": state}, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match=r"missing keys \(1\): backbone\.conv1\.weight.*"
                                           r"unexpected keys \(1\): extra\.conv\.weight"):
        load_authors_checkpoint(ours, tmp_path / "odd.pth", CITYSCAPES_CLASSES)
    authors_file(theirs, tmp_path / "g2c.pth")
    with pytest.raises(WeightsError, match="Caffe-style"):
        load_authors_checkpoint(build_deeplab_v2(19, "resnet18", style="pytorch"), tmp_path / "g2c.pth",
                                CITYSCAPES_CLASSES)


# ---------------------------------------------------------------- safetensors

def test_safetensors_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = randomized(build_deeplab_v2(5, backbone="resnet18"), seed=9)
    save_safetensors(model, tmp_path / "m.safetensors", {"classes": "a,b,c,d,e", "style": "caffe"})
    other = build_deeplab_v2(5, backbone="resnet18")
    metadata = load_safetensors_into(other, tmp_path / "m.safetensors")
    assert metadata == {"classes": "a,b,c,d,e", "style": "caffe"}
    assert_same_tensors(model.state_dict(), other.state_dict(), skip_counters=False)
    assert not (tmp_path / "m.safetensors.partial").exists()


def test_safetensors_load_is_strict(tmp_path):
    model = build_deeplab_v2(5, backbone="resnet18")
    save_safetensors(model, tmp_path / "m.safetensors", {})
    with pytest.raises(WeightsError, match=r"m\.safetensors.*shape mismatches \(4\)"):
        load_safetensors_into(build_deeplab_v2(6, backbone="resnet18"), tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match="missing keys"):
        load_safetensors_into(build_deeplab_v2(5, backbone="resnet34"), tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        load_safetensors_into(model, tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="strings"):
        save_safetensors(model, tmp_path / "x.safetensors", {"epoch": 3})
