"""MiT-B0..B5: sizes, output shapes, attention and Mix-FFN against plain references, init, weight layouts."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plca.models.mit import DropPath, EfficientSelfAttention, MixFFN, MixTransformer, load_mit_weights
from plca.models.registry import IMAGENET_RGB, backbone_names, create_backbone
from plca.models.segformer_head import SegFormerHead
from plca.models.weights import WeightsError

DIMS = {"b0": (32, 64, 160, 256), **{s: (64, 128, 320, 512) for s in ("b1", "b2", "b3", "b4", "b5")}}
DEPTHS = {"b0": (2, 2, 2, 2), "b1": (2, 2, 2, 2), "b2": (3, 4, 6, 3), "b3": (3, 4, 18, 3),
          "b4": (3, 8, 27, 3), "b5": (3, 6, 40, 3)}
HEADS = (1, 2, 5, 8)
SR = (8, 4, 2, 1)


def meta_mit(size: str) -> MixTransformer:
    """Shapes only, no memory or init cost (B5 has 81M parameters)."""
    with torch.device("meta"):
        return MixTransformer(size)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- sizes and layout

def expected_params(size: str) -> int:
    """Parameter count written out from the architecture's description."""
    total, c_in = 0, 3
    for k, (d, depth) in enumerate(zip(DIMS[size], DEPTHS[size])):
        kernel = 7 if k == 0 else 3
        total += kernel * kernel * c_in * d + d + 2 * d  # patch conv + LayerNorm
        block = 2 * 2 * d  # two LayerNorms
        block += 4 * (d * d + d)  # query, key, value, output projection
        if SR[k] > 1:
            block += SR[k] ** 2 * d * d + d + 2 * d  # reduction conv + LayerNorm
        block += (d * 4 * d + 4 * d) + (9 * 4 * d + 4 * d) + (4 * d * d + d)  # fc1, depthwise 3x3, fc2
        total += depth * block + 2 * d  # blocks + stage LayerNorm
        c_in = d
    return total


@pytest.mark.parametrize("size", list(DIMS))
def test_parameter_count_matches_the_architecture(size):
    assert n_params(meta_mit(size)) == expected_params(size)


@pytest.mark.parametrize("size, embed_dim, published_millions", [
    # SegFormer paper (Xie et al., NeurIPS 2021), Table 2, ADE20K (150 classes): total parameters of
    # MiT-Bx + all-MLP decoder (256 channels for B0/B1, 768 for B2-B5)
    ("b0", 256, 3.8), ("b1", 256, 13.7), ("b2", 768, 27.5), ("b3", 768, 47.3), ("b4", 768, 64.1), ("b5", 768, 84.7),
])
def test_segformer_parameter_count_matches_the_paper(size, embed_dim, published_millions):
    backbone = meta_mit(size)
    with torch.device("meta"):
        head = SegFormerHead(backbone.out_channels, 150, embed_dim=embed_dim)
    assert round((n_params(backbone) + n_params(head)) / 1e6, 1) == published_millions


def test_b0_and_b5_encoder_sizes():
    # the exact totals of the formula above, pinned so that a change of architecture is noticed
    assert n_params(meta_mit("b0")) == 3_319_392
    assert n_params(meta_mit("b5")) == 81_443_008


@pytest.mark.parametrize("size", list(DIMS))
def test_stages_have_the_published_dims_depths_heads_and_reductions(size):
    model = meta_mit(size)
    assert model.out_channels == DIMS[size]
    assert model.strides == (4, 8, 16, 32)
    assert model.normalization == IMAGENET_RGB
    assert len(model.stages) == 4
    for k, stage in enumerate(model.stages):
        assert len(stage.blocks) == DEPTHS[size][k]
        conv = stage.embed.conv
        assert (conv.kernel_size, conv.stride, conv.padding) == (((7, 7), (4, 4), (3, 3)) if k == 0
                                                                 else ((3, 3), (2, 2), (1, 1)))
        assert conv.out_channels == DIMS[size][k]
        for block in stage.blocks:
            assert block.attn.heads == HEADS[k]
            if SR[k] > 1:
                assert block.attn.reduce.kernel_size == block.attn.reduce.stride == (SR[k], SR[k])
            else:
                assert not hasattr(block.attn, "reduce") and not hasattr(block.attn, "reduce_norm")
            assert block.ffn.fc1.out_features == 4 * DIMS[size][k]
            dw = block.ffn.dwconv
            assert dw.groups == dw.in_channels == dw.out_channels == 4 * DIMS[size][k]
            assert dw.kernel_size == (3, 3) and dw.padding == (1, 1)
            assert block.attn_norm.eps == block.ffn_norm.eps == stage.norm.eps == 1e-6
        assert stage.embed.norm.eps == 1e-5  # SegFormer's patch embeddings use PyTorch's default


def test_stochastic_depth_rises_linearly_to_0_1_over_all_blocks():
    model = meta_mit("b2")
    rates = [block.drop_path.p for stage in model.stages for block in stage.blocks]
    assert len(rates) == 16
    assert rates == pytest.approx(torch.linspace(0, 0.1, 16).tolist(), abs=1e-7)


def test_registered_sizes_and_styles():
    names = backbone_names()
    for size in DIMS:
        assert f"mit_{size}" in names
    assert isinstance(create_backbone("mit_b0"), MixTransformer)
    assert create_backbone("mit_b0", style="pytorch").out_channels == DIMS["b0"]
    with pytest.raises(ValueError, match="mit_b0.*caffe"):
        create_backbone("mit_b0", style="caffe")
    with pytest.raises(ValueError, match="b0, b1"):
        MixTransformer("b6")


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("height, width", [(64, 96), (65, 97)])
def test_b0_output_strides_and_channels(height, width):
    torch.manual_seed(0)
    model = MixTransformer("b0").eval()
    with torch.no_grad():
        levels = model(torch.randn(2, 3, height, width))
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    expected = []
    for c in DIMS["b0"]:
        expected.append((2, c, h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    assert [tuple(level.shape) for level in levels] == expected
    assert all(level.is_contiguous() and torch.isfinite(level).all() for level in levels)


def reference_attention(x: Tensor, h: int, w: int, heads: int, sr: int, q_w, q_b, kv_w, kv_b,
                        proj_w, proj_b, sr_w=None, sr_b=None, norm_w=None, norm_b=None) -> Tensor:
    """SegFormer's attention written from the paper, with keys and values stacked as in its code (keys first)."""
    b, n, c = x.shape
    d = c // heads
    q = (x @ q_w.T + q_b).reshape(b, n, heads, d).permute(0, 2, 1, 3)
    ctx = x
    if sr > 1:
        grid = x.permute(0, 2, 1).reshape(b, c, h, w)
        ctx = F.conv2d(grid, sr_w, sr_b, stride=sr).reshape(b, c, -1).permute(0, 2, 1)
        ctx = F.layer_norm(ctx, (c,), norm_w, norm_b, eps=1e-5)
    kv = (ctx @ kv_w.T + kv_b).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return out @ proj_w.T + proj_b


@pytest.mark.parametrize("sr", [1, 2])
def test_efficient_attention_matches_a_plain_reference(sr):
    torch.manual_seed(1)
    c, heads, h, w = 12, 3, 4, 6
    attn = EfficientSelfAttention(c, heads, sr).double()
    for p in attn.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, h * w, c, dtype=torch.float64)
    kv_w = torch.cat([attn.key.weight, attn.value.weight])
    kv_b = torch.cat([attn.key.bias, attn.value.bias])
    extra = (attn.reduce.weight, attn.reduce.bias, attn.reduce_norm.weight, attn.reduce_norm.bias) if sr > 1 else ()
    expected = reference_attention(x, h, w, heads, sr, attn.query.weight, attn.query.bias, kv_w, kv_b,
                                   attn.proj.weight, attn.proj.bias, *extra)
    torch.testing.assert_close(attn(x, h, w), expected)


def test_mix_ffn_matches_a_plain_reference():
    torch.manual_seed(2)
    c, h, w = 5, 3, 4
    ffn = MixFFN(c, 4 * c).double()
    x = torch.randn(2, h * w, c, dtype=torch.float64)
    hidden = x @ ffn.fc1.weight.T + ffn.fc1.bias
    grid = hidden.transpose(1, 2).reshape(2, 4 * c, h, w)
    # depthwise 3x3 written as a loop over channels
    mixed = torch.stack([F.conv2d(grid[:, i:i + 1], ffn.dwconv.weight[i:i + 1], ffn.dwconv.bias[i:i + 1],
                                  padding=1)[:, 0] for i in range(4 * c)], dim=1)
    gelu = 0.5 * mixed * (1 + torch.erf(mixed / math.sqrt(2)))
    expected = gelu.flatten(2).transpose(1, 2) @ ffn.fc2.weight.T + ffn.fc2.bias
    torch.testing.assert_close(ffn(x, h, w), expected)


def test_drop_path_keeps_or_drops_whole_samples_and_is_off_in_eval():
    torch.manual_seed(3)
    layer = DropPath(0.5)
    x = torch.randn(400, 3, 2)
    out = layer(x)
    kept = (out == x * 2).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert bool((kept | dropped).all()) and 120 < int(kept.sum()) < 280
    layer.eval()
    assert torch.equal(layer(x), x)
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_initialisation_follows_segformer():
    torch.manual_seed(4)
    model = MixTransformer("b0")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert weights.abs().max().item() <= 2.0
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # conv: normal with std sqrt(2 / fan_out), fan_out = k * k * out / groups
    embed = model.stages[1].embed.conv  # 3x3, 64 outputs: fan_out 576
    assert embed.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    dw = model.stages[2].blocks[0].ffn.dwconv  # depthwise 3x3, 640 groups: fan_out 9
    assert dw.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
    assert torch.count_nonzero(dw.bias) == 0


# ---------------------------------------------------------------- weight layouts, written from their naming rules

OFFICIAL_BLOCK = {"attn_norm": "norm1", "attn.query": "attn.q", "attn.reduce": "attn.sr",
                  "attn.reduce_norm": "attn.norm", "attn.proj": "attn.proj", "ffn_norm": "norm2",
                  "ffn.fc1": "mlp.fc1", "ffn.dwconv": "mlp.dwconv.dwconv", "ffn.fc2": "mlp.fc2"}
HF_BLOCK = {"attn_norm": "layer_norm_1", "attn.query": "attention.self.query", "attn.key": "attention.self.key",
            "attn.value": "attention.self.value", "attn.reduce": "attention.self.sr",
            "attn.reduce_norm": "attention.self.layer_norm", "attn.proj": "attention.output.dense",
            "ffn_norm": "layer_norm_2", "ffn.fc1": "mlp.dense1", "ffn.dwconv": "mlp.dwconv.dwconv",
            "ffn.fc2": "mlp.dense2"}


def official_layout(state: dict[str, Tensor], classes: int = 1000) -> dict[str, Tensor]:
    """A state dict as the official SegFormer ImageNet checkpoint names it (with its 1000-way head)."""
    out = {}
    for key, value in state.items():
        stage, rest = re.fullmatch(r"stages\.(\d)\.(.+)", key).groups()
        s = int(stage) + 1
        if rest.startswith("embed."):
            out[f"patch_embed{s}." + rest[6:].replace("conv.", "proj.")] = value
        elif rest.startswith("norm."):
            out[f"norm{s}.{rest[5:]}"] = value
        else:
            block, module, tensor = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(\w+)", rest).groups()
            if module == "attn.key":
                out[f"block{s}.{block}.attn.kv.{tensor}"] = torch.cat(
                    [value, state[key.replace(".key.", ".value.")]])
            elif module != "attn.value":
                out[f"block{s}.{block}.{OFFICIAL_BLOCK[module]}.{tensor}"] = value
    last = state["stages.3.norm.weight"].shape[0]
    out["head.weight"], out["head.bias"] = torch.randn(classes, last), torch.randn(classes)
    return out


def hf_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict as Hugging Face's ``SegformerForImageClassification`` (nvidia/mit-b*) names it."""
    out = {}
    for key, value in state.items():
        stage, rest = re.fullmatch(r"stages\.(\d)\.(.+)", key).groups()
        if rest.startswith("embed."):
            name = f"patch_embeddings.{stage}." + rest[6:].replace("conv.", "proj.").replace("norm.", "layer_norm.")
        elif rest.startswith("norm."):
            name = f"layer_norm.{stage}.{rest[5:]}"
        else:
            block, module, tensor = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(\w+)", rest).groups()
            name = f"block.{stage}.{block}.{HF_BLOCK[module]}.{tensor}"
        out["segformer.encoder." + name] = value
    last = state["stages.3.norm.weight"].shape[0]
    out["classifier.weight"], out["classifier.bias"] = torch.randn(1000, last), torch.randn(1000)
    return out


@pytest.fixture(scope="module")
def source() -> MixTransformer:
    """A B0 with every tensor random (biases and LayerNorms too), so a misplaced tensor changes the output."""
    torch.manual_seed(5)
    model = MixTransformer("b0")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_layouts_carry_the_published_names_and_shapes(source):
    state = source.state_dict()
    official = official_layout(state)
    assert official["patch_embed1.proj.weight"].shape == (32, 3, 7, 7)
    assert official["patch_embed4.proj.weight"].shape == (256, 160, 3, 3)
    assert official["block1.0.attn.kv.weight"].shape == (64, 32)
    assert official["block1.0.attn.sr.weight"].shape == (32, 32, 8, 8)
    assert official["block1.1.mlp.dwconv.dwconv.weight"].shape == (128, 1, 3, 3)
    assert "block4.0.attn.sr.weight" not in official and "block3.1.attn.norm.bias" in official
    assert official["norm4.weight"].shape == (256,)
    assert len(official) == len(state) - 8 * 2 + 2  # kv stacked in 8 blocks, plus the ImageNet head
    hf = hf_layout(state)
    assert hf["segformer.encoder.block.0.0.attention.self.key.weight"].shape == (32, 32)
    assert hf["segformer.encoder.block.3.1.attention.output.dense.weight"].shape == (256, 256)
    assert hf["segformer.encoder.patch_embeddings.3.layer_norm.weight"].shape == (256,)
    assert hf["segformer.encoder.layer_norm.3.bias"].shape == (256,)


def save(state: dict[str, Tensor], path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("layout, filename", [
    ("official", "mit_b0.pth"), ("hf", "model.safetensors"), ("hf", "pytorch_model.bin"),
    ("own", "mit_b0_own.safetensors"), ("own", "mit_b0_own.pth"),
])
def test_each_layout_loads_every_tensor_and_gives_identical_outputs(source, tmp_path, layout, filename):
    state = source.state_dict()
    written = {"official": official_layout, "hf": hf_layout, "own": dict}[layout](state)
    path = tmp_path / filename
    save(written, path)

    target = MixTransformer("b0").eval()
    report = target.load_pretrained(path)
    assert report.missing == [] and report.unexpected == []
    if layout == "own":
        assert report.ignored == []
    else:
        assert len(report.ignored) == 2 and all("classifier" in key for key in report.ignored)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for ours, theirs in zip(target(x), source(x)):
            assert torch.equal(ours, theirs)


def test_official_kv_is_split_keys_first(source, tmp_path):
    """Our attention on the loaded weights equals the official formula on the file's stacked kv tensor."""
    official = official_layout(source.state_dict())
    path = tmp_path / "mit_b0.pth"
    torch.save(official, path)
    target = MixTransformer("b0").eval()
    load_mit_weights(target, path)
    torch.manual_seed(7)
    h, w = 8, 8
    x = torch.randn(2, h * w, 64)
    p = {k[len("block2.1.attn."):]: v for k, v in official.items() if k.startswith("block2.1.attn.")}
    expected = reference_attention(x, h, w, 2, 4, p["q.weight"], p["q.bias"], p["kv.weight"], p["kv.bias"],
                                   p["proj.weight"], p["proj.bias"], p["sr.weight"], p["sr.bias"],
                                   p["norm.weight"], p["norm.bias"])
    with torch.no_grad():
        torch.testing.assert_close(target.stages[1].blocks[1].attn(x, h, w), expected)


def test_a_wrapped_checkpoint_loads(source, tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": official_layout(source.state_dict()), "meta": {"epoch": 300}}, path)
    report = MixTransformer("b0").load_pretrained(path, drop_head=True)  # the segmentor may pass drop_head
    assert report.missing == [] and len(report.ignored) == 2


def lazy_state(size: str) -> dict[str, Tensor]:
    """Every tensor of a MiT of ``size`` as an expanded scalar: right shapes, tiny on disk."""
    return {k: torch.zeros(()).expand(v.shape) for k, v in meta_mit(size).state_dict().items()}


@pytest.mark.parametrize("layout", ["official", "own"])
def test_weights_of_another_size_name_the_size(tmp_path, layout):
    state = lazy_state("b2")
    path = tmp_path / "mit_b2.pth"
    torch.save(official_layout(state) if layout == "official" else state, path)
    with pytest.raises(WeightsError, match=r"mit_b2\.pth.*MiT-B2 .*depths 3/4/6/3.*this backbone is MiT-B0"):
        MixTransformer("b0").load_pretrained(path)


def test_b1_weights_into_b2_name_b1(tmp_path):
    path = tmp_path / "b1.pth"
    torch.save(lazy_state("b1"), path)
    with pytest.raises(WeightsError, match="holds weights of MiT-B1.*this backbone is MiT-B2"):
        meta_mit("b2").load_pretrained(path)


def test_an_unknown_size_is_described(source, tmp_path):
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("stages.3.blocks.1.")}
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="no MiT size known here.*depths 2/2/2/1"):
        MixTransformer("b0").load_pretrained(path)


def test_missing_unexpected_and_misshaped_tensors_are_listed(source, tmp_path):
    official = official_layout(source.state_dict())
    del official["block2.0.mlp.fc1.bias"]
    official["block1.0.attn.extra.weight"] = torch.zeros(3)
    official["norm3.weight"] = torch.ones(7)
    path = tmp_path / "bad.pth"
    torch.save(official, path)
    with pytest.raises(WeightsError) as error:
        MixTransformer("b0").load_pretrained(path)
    message = str(error.value)
    assert "bad.pth" in message and "official SegFormer" in message
    assert "missing keys (1): stages.1.blocks.0.ffn.fc1.bias" in message
    assert "unexpected keys (1): block1.0.attn.extra.weight" in message
    assert "stages.2.norm.weight (file (7,), model (160,))" in message


def test_files_in_no_known_layout_list_the_known_layouts(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, path)
    with pytest.raises(WeightsError, match="resnet.pth.*no MiT weights layout.*official SegFormer.*Hugging Face"
                                           ".*this project's.*conv1.weight"):
        MixTransformer("b0").load_pretrained(path)


def test_a_whole_segmentor_checkpoint_is_recognised(source, tmp_path):
    state = {"backbone." + k: v for k, v in official_layout(source.state_dict()).items()}
    state["decode_head.conv_seg.weight"] = torch.zeros(19, 256, 1, 1)
    path = tmp_path / "daformer_run.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsError, match="whole mmseg segmentor checkpoint"):
        MixTransformer("b0").load_pretrained(path)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_garbage_files_raise_weights_error_naming_the_file(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="garbage.pth"):
        MixTransformer("b0").load_pretrained(path)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(content)
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        MixTransformer("b0").load_pretrained(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        MixTransformer("b0").load_pretrained(tmp_path / "absent.pth")
