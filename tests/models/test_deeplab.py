"""DeepLab-v2: the summed ASPP heads (the reference's four branches, DAFormer's reduced two), the model's outputs
and the factory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plca.models.deeplab import ASPPHead, build_deeplab_v2
from plca.models.registry import create_head, head_names
from plca.models.segmentor import Segmentor, SegmentorSpec, build_segmentor
from plca.models.resnet import ResNet


def test_aspp_sums_all_four_dilated_branches():
    torch.manual_seed(0)
    head = ASPPHead(8, 5)
    x = torch.randn(2, 8, 13, 30)  # smaller than the largest dilation: padding must keep the size
    branches = [F.conv2d(x, conv.weight, padding=d, dilation=d)
                for conv, d in zip(head.convs, (6, 12, 18, 24))]
    expected = branches[0] + branches[1] + branches[2] + branches[3]
    out = head(x)
    assert out.shape == (2, 5, 13, 30)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the older copied head returned after two branches: make sure that is not what we compute
    assert not torch.allclose(out, branches[0] + branches[1], atol=1e-3)


def test_aspp_layout_no_bias_and_default_init():
    torch.manual_seed(0)
    head = ASPPHead(64, 19)
    assert [k for k in head.state_dict()] == [f"convs.{i}.weight" for i in range(4)]
    for conv, d in zip(head.convs, (6, 12, 18, 24)):
        assert conv.bias is None
        assert conv.kernel_size == (3, 3) and conv.dilation == (d, d) and conv.padding == (d, d)
        # PyTorch's default init: uniform(-b, b) with b = 1 / sqrt(fan_in), std b / sqrt(3)
        bound = 1 / math.sqrt(64 * 9)
        assert conv.weight.abs().max() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_aspp_custom_dilations():
    head = ASPPHead(4, 3, dilations=(1, 2))
    assert len(head.convs) == 2 and head.convs[1].dilation == (2, 2)


def test_reduced_head_is_two_branches_with_bias_and_normal_init():
    # DAFormer's dlv2red: DLV2Head(dilations=(6, 12)), mmcv ConvModule without norm (bias=True), Normal(0, 0.01)
    assert "deeplabv2_reduced" in head_names()
    torch.manual_seed(0)
    head = create_head("deeplabv2_reduced", (64, 2048), 19)
    assert isinstance(head, ASPPHead) and head.embed_channels == 2048
    assert list(head.state_dict()) == ["convs.0.weight", "convs.0.bias", "convs.1.weight", "convs.1.bias"]
    assert head.dilations == (6, 12)
    for conv, d in zip(head.convs, (6, 12)):
        assert conv.kernel_size == (3, 3) and conv.dilation == (d, d) and conv.padding == (d, d)
        assert conv.weight.shape == (19, 2048, 3, 3)
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.02)  # 350k draws
        assert abs(conv.weight.mean().item()) < 1e-4
        assert torch.equal(conv.bias, torch.zeros(19))


def test_reduced_head_output_is_the_sum_of_its_two_convolutions():
    torch.manual_seed(0)
    head = create_head("deeplabv2_reduced", (8,), 5)
    with torch.no_grad():
        for conv in head.convs:
            conv.bias.normal_()  # non-zero biases: both must be added
    x = torch.randn(2, 8, 13, 30)
    expected = sum(F.conv2d(x, conv.weight, conv.bias, padding=d, dilation=d) for conv, d in zip(head.convs, (6, 12)))
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head([torch.randn(2, 4, 26, 60), x]), expected, rtol=1e-5, atol=1e-6)  # the last level
    assert head(x).shape == (2, 5, 13, 30)


def test_reduced_head_in_a_segmentor_is_described_and_rebuilt(tmp_path):
    from plca.models.trained import inspect_model_file, load_model_file

    torch.manual_seed(0)
    model = build_segmentor(SegmentorSpec(backbone="resnet18", head="deeplabv2_reduced", style="pytorch"), 3).eval()
    assert model.describe()["head"] == "deeplabv2_reduced"
    path = tmp_path / "final.pt"
    torch.save({"model": model.state_dict(), "segmentor": model.describe(), "classes": ["a", "b", "c"]}, path)
    rebuilt = load_model_file(inspect_model_file(path))
    assert isinstance(rebuilt.head, ASPPHead) and rebuilt.head.dilations == (6, 12)
    images = torch.rand(1, 3, 40, 48) * 255
    with torch.no_grad():
        assert torch.equal(rebuilt(images)["logits"], model(images)["logits"])


@pytest.fixture(scope="module")
def model() -> Segmentor:
    torch.manual_seed(0)
    return build_deeplab_v2(7, backbone="resnet18", style="caffe").eval()


def test_forward_returns_features_and_logits_at_stride_8(model):
    images = torch.rand(2, 3, 65, 97) * 255
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"features", "logits"}
    assert out["features"].shape == (2, 512, 9, 13)
    assert out["logits"].shape == (2, 7, 9, 13)


def test_forward_is_normalise_backbone_classify(model):
    images = torch.rand(1, 3, 40, 48) * 255
    with torch.no_grad():
        features = model.backbone(model.normalizer(images))[-1]
        out = model(images)
        torch.testing.assert_close(out["features"], features)
        torch.testing.assert_close(out["logits"], model.head.classify(features))
        torch.testing.assert_close(model.extract_features(images), features)
        torch.testing.assert_close(model.classify(features), out["logits"])


def test_uint8_images_give_the_same_result_as_float(model):
    images = torch.randint(0, 256, (1, 3, 33, 41), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(images)["logits"], model(images.float())["logits"])


def test_attributes_and_state_dict_layout(model):
    assert model.num_classes == 7 and model.style == "caffe"
    assert model.normalizer.style == "caffe"
    keys = list(model.state_dict())
    assert "backbone.conv1.weight" in keys and "head.convs.3.weight" in keys
    assert not any(k.startswith("normalizer.") for k in keys)


def test_style_flows_to_normalizer_and_backbone():
    m = build_deeplab_v2(3, backbone="resnet18", style="pytorch")
    assert m.style == m.backbone.style == m.normalizer.style == "pytorch"
    assert not m.backbone.maxpool.ceil_mode


def test_resnet101_head_width_on_meta_device():
    with torch.device("meta"):
        m = build_deeplab_v2(19, backbone="resnet101")
    assert m.head.convs[0].weight.shape == (19, 2048, 3, 3)


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101"):
        build_deeplab_v2(19, backbone="resnet152")


def test_pretrained_weights_are_loaded_into_the_backbone(tmp_path):
    torch.manual_seed(1)
    source = ResNet(18, "caffe")
    state = dict(source.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "r18.pth")
    m = build_deeplab_v2(4, backbone="resnet18", pretrained=tmp_path / "r18.pth")
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(m.backbone.state_dict()[key], value), key
