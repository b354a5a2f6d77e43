"""The optimiser's parameter groups against DAFormer's rules, written out here from mmcv's.

DAFormer's optimiser (``configs/daformer/*.py``, ``experiments.py``): AdamW, mmcv ``paramwise_cfg``
``custom_keys = {head: lr_mult 10, pos_block: decay_mult 0, norm: decay_mult 0}`` (the norm and
pos_block keys only for MiT backbones). mmcv's ``DefaultOptimizerConstructor`` tests each key as
a substring of the parameter's full name, longest key first (ties alphabetically), and the first
match decides both multipliers; a parameter matching none keeps lr x 1 and full decay.

Our parameter names differ from mmseg's, so the reference below first writes each of our
parameters under the name mmseg gives the same tensor, from what the parameter is (which layer
of MiT, which BatchNorm of a ConvModule, ...), then applies mmcv's rule to that name.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from plca.config import ConfigError, build_config
from plca.engine.optim import NO_DECAY_RULES, build_optimizer, no_decay_names, optimizer_from_config
from plca.models.registry import IMAGENET_RGB, create_head
from plca.models.segmentor import Segmentor, SegmentorSpec, build_segmentor
from plca.models.timm_backbone import declared_in_trunk

DAFORMER_KEYS = {"head": {"lr_mult": 10.0}, "pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}}
LR, WEIGHT_DECAY = 6e-5, 0.01
MIT_B0_LAYER_NORM_TENSORS = 2 * (4 + 4 + 2 * 8 + 6)

# our MiT block parts -> mmseg's (mix_transformer.py: Block, Attention, Mlp / DWConv)
MIT_BLOCK = {"attn_norm": "norm1", "attn.query": "attn.q", "attn.key": "attn.kv", "attn.value": "attn.kv",
             "attn.reduce": "attn.sr", "attn.reduce_norm": "attn.norm", "attn.proj": "attn.proj",
             "ffn_norm": "norm2", "ffn.fc1": "mlp.fc1", "ffn.dwconv": "mlp.dwconv.dwconv", "ffn.fc2": "mlp.fc2"}


def mmcv_multipliers(mmseg_name: str, keys: dict = DAFORMER_KEYS) -> tuple[float, float]:
    """``(lr_mult, decay_mult)`` of mmcv's ``DefaultOptimizerConstructor`` for one parameter name."""
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in mmseg_name:
            return keys[key].get("lr_mult", 1.0), keys[key].get("decay_mult", 1.0)
    return 1.0, 1.0


def mit_mmseg_name(name: str) -> str:
    """Our ``MixTransformer`` parameter name -> mmseg's ``mit_b*`` name (``backbone.`` prefix kept)."""
    match = re.fullmatch(r"backbone\.stages\.(\d)\.embed\.(conv|norm)\.(\w+)", name)
    if match:
        return f"backbone.patch_embed{int(match[1]) + 1}.{'proj' if match[2] == 'conv' else 'norm'}.{match[3]}"
    match = re.fullmatch(r"backbone\.stages\.(\d)\.norm\.(\w+)", name)
    if match:
        return f"backbone.norm{int(match[1]) + 1}.{match[2]}"
    match = re.fullmatch(r"backbone\.stages\.(\d)\.blocks\.(\d+)\.(.+)\.(\w+)", name)
    assert match, name
    return f"backbone.block{int(match[1]) + 1}.{match[2]}.{MIT_BLOCK[match[3]]}.{match[4]}"


def head_mmseg_name(model: Segmentor, name: str) -> str:
    """A head parameter under mmseg's naming: ``decode_head.``, and a BatchNorm of a ConvModule is its ``bn``.

    Only these two facts matter to mmcv's rule (every head name contains ``head``; mmcv's
    ``build_norm_layer`` names a BatchNorm ``bn``, which contains no ``norm``).
    """
    module_name, _, tensor = name.removeprefix("head.").rpartition(".")
    module = model.head.get_submodule(module_name)
    if isinstance(module, nn.BatchNorm2d):
        return f"decode_head.{module_name}.bn.{tensor}"
    return f"decode_head.{module_name}.{tensor}"


def groups_of(optimizer: torch.optim.Optimizer) -> dict[int, tuple[float, bool]]:
    """``{id(parameter): (lr_mult, decayed)}`` as the optimiser holds them."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = (group["lr_mult"], group["weight_decay"] > 0)
            assert group["lr"] == pytest.approx(LR * group["lr_mult"])
    return out


def adamw(model: nn.Module, rule: str = "declared") -> torch.optim.Optimizer:
    return build_optimizer(model, LR, weight_decay=WEIGHT_DECAY, head_lr_mult=10.0, kind="adamw", no_decay=rule)


def test_mit_b0_with_the_daformer_head_has_daformers_groups():
    torch.manual_seed(0)
    model = build_segmentor(SegmentorSpec(backbone="mit_b0", head="daformer"), 19)
    held = groups_of(adamw(model))
    assert len(held) == len(list(model.parameters()))
    undecayed = []
    for name, p in model.named_parameters():
        mmseg = mit_mmseg_name(name) if name.startswith("backbone.") else head_mmseg_name(model, name)
        lr_mult, decay_mult = mmcv_multipliers(mmseg)
        assert held[id(p)] == (lr_mult, decay_mult > 0), (name, mmseg)
        if decay_mult == 0:
            undecayed.append(name)
    # what that means, plainly: MiT's LayerNorms are not decayed, everything else is, the head at lr x 10
    layer_norms = {f"{prefix}.{tensor}" for prefix, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                   for tensor in ("weight", "bias")}
    assert set(undecayed) == layer_norms and all(n.startswith("backbone.") for n in layer_norms)
    # patch-embedding and stage norms (4 + 4), two per block (8 blocks), spatial-reduction norms (sr > 1: 6 blocks)
    assert len(layer_norms) == MIT_B0_LAYER_NORM_TENSORS
    named = dict(model.named_parameters())
    for decayed in ("backbone.stages.0.blocks.0.ffn.dwconv.weight",  # the Mix-FFN position conv: no pos_block
                    "backbone.stages.0.blocks.0.ffn.dwconv.bias", "backbone.stages.0.blocks.0.attn.query.bias",
                    "head.fuse.bottleneck.1.weight", "head.fuse.bottleneck.1.bias", "head.classifier.bias"):
        assert held[id(named[decayed])][1], decayed
    assert {held[id(p)][0] for n, p in named.items() if n.startswith("head.")} == {10.0}
    assert {held[id(p)][0] for n, p in named.items() if n.startswith("backbone.")} == {1.0}


@pytest.mark.parametrize("head", ["deeplabv2_reduced", "deeplabv2"])
def test_deeplab_v2_resnet101_decays_everything(head):
    with torch.device("meta"):
        model = build_segmentor(SegmentorSpec(backbone="resnet101", head=head, style="caffe"), 19)
    held = groups_of(adamw(model))
    for name, p in model.named_parameters():
        # mmseg's ResNet names follow torchvision's (bn1, downsample.1); DLV2Head's convs are aspp_modules.i.conv
        mmseg = "decode_head." + name.removeprefix("head.") if name.startswith("head.") else name
        lr_mult, decay_mult = mmcv_multipliers(mmseg, {"head": {"lr_mult": 10.0}})  # no MiT: no norm / pos_block keys
        assert held[id(p)] == (lr_mult, decay_mult > 0), name
    # plainly: every parameter decayed, BatchNorms and biases included; the head at lr x 10
    assert all(decayed for _, decayed in held.values())
    bn = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert len(bn) == 2 * (1 + 3 * (3 + 4 + 23 + 3) + 4) and all(held[id(p)][1] for p in bn)
    assert {held[id(p)][0] for p in model.head.parameters()} == {10.0}
    assert {held[id(p)][0] for p in model.backbone.parameters()} == {1.0}


def test_norm_bias_position_is_the_older_wider_rule():
    torch.manual_seed(0)
    model = build_segmentor(SegmentorSpec(backbone="mit_b0", head="daformer"), 5)
    held = groups_of(adamw(model, "norm_bias_position"))
    norm_types = (nn.LayerNorm, nn.BatchNorm2d)
    for module_name, module in model.named_modules():
        for tensor, p in module.named_parameters(recurse=False):
            exempt = isinstance(module, norm_types) or tensor == "bias"
            assert held[id(p)][1] == (not exempt), f"{module_name}.{tensor}"
    assert "norm_bias_position" in NO_DECAY_RULES


class PositionBackbone(nn.Module):
    """A new backbone: all it does for the optimiser is declare ``no_weight_decay()``."""

    out_channels = (4,)
    strides = (8,)
    normalization = IMAGENET_RGB

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, stride=8, padding=1)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        return [self.norm(self.conv(x) + self.pos_embed)]

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def test_a_new_backbone_only_declares_no_weight_decay():
    model = Segmentor(PositionBackbone(), create_head("deeplabv2_reduced", (4,), 3), 3, backbone_name="toy",
                      head_name="deeplabv2_reduced")
    assert model.no_weight_decay() == {"backbone.pos_embed"}
    held = groups_of(adamw(model))
    named = dict(model.named_parameters())
    assert [n for n, p in named.items() if not held[id(p)][1]] == ["backbone.pos_embed"]
    assert {n for n, p in named.items() if held[id(p)][0] == 10.0} == {n for n in named if n.startswith("head.")}
    assert no_decay_names(model, "norm_bias_position") == {"backbone.pos_embed", "backbone.conv.bias",
                                                           "backbone.norm.weight", "backbone.norm.bias",
                                                           "head.convs.0.bias", "head.convs.1.bias"}


def test_sgd_decays_every_parameter_with_the_configured_head_lr():
    torch.manual_seed(0)
    model = build_segmentor(SegmentorSpec(backbone="mit_b0", head="daformer"), 5)
    optimizer = build_optimizer(model, 0.01, weight_decay=5e-4, head_lr_mult=3.0, kind="sgd")
    backbone, head = optimizer.param_groups
    assert (backbone["lr"], head["lr"]) == (0.01, pytest.approx(0.03))
    assert backbone["weight_decay"] == head["weight_decay"] == 5e-4
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))


def test_parts_must_cover_every_trainable_parameter():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def parameter_parts(self):
            return {"backbone": list(self.a.named_parameters(prefix="a")), "head": []}

    with pytest.raises(ValueError, match="exactly one of 'backbone' and 'head'"):
        build_optimizer(Partial(), 0.1)


def test_config_chooses_the_rule_and_refuses_unknown_ones():
    data = {"data": {"classes": ["a", "b"], "source": {"format": "folder", "root": "/s"}},
            "model": {"backbone": "mit_b0", "head": "daformer"},
            "train": {"optimizer": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY, "head_lr_mult": 10.0}}
    config = build_config(data)
    assert config.train.no_decay == "declared"  # DAFormer's rule by default
    torch.manual_seed(0)
    model = build_segmentor(config.model, 2)
    declared = optimizer_from_config(model, config.train)
    backbone_count, head_count = len(list(model.backbone.parameters())), len(list(model.head.parameters()))
    assert [len(g["params"]) for g in declared.param_groups] == [backbone_count - MIT_B0_LAYER_NORM_TENSORS,
                                                                 MIT_B0_LAYER_NORM_TENSORS, head_count, 0]
    older = optimizer_from_config(model, build_config(data, ["train.no_decay=norm_bias_position"]).train)
    assert len(older.param_groups[3]["params"]) > 0  # the head's biases and BatchNorms
    with pytest.raises(ConfigError, match=r"train\.no_decay"):
        build_config(data, ["train.no_decay=norms"])


def test_timm_declarations_map_to_the_trunks_names():
    # a ViT's features_only getter holds the model as 'model'; hierarchical extractors flatten 'stages.0'
    model_keys = {"pos_embed", "cls_token", "blocks.0.norm1.weight", "stages.0.downsample.weight",
                  "stages.1.blocks.0.attn.relative_position_bias_table"}
    trunk = ["model.pos_embed", "model.cls_token", "model.blocks.0.norm1.weight", "stages_0.downsample.weight",
             "stages_1.blocks.0.attn.relative_position_bias_table"]
    declared = {"pos_embed", "cls_token", "*relative_position_bias_table"}
    assert declared_in_trunk(declared, trunk, model_keys) == [
        "model.pos_embed", "model.cls_token", "stages_1.blocks.0.attn.relative_position_bias_table"]
    assert declared_in_trunk(set(), trunk, model_keys) == []
