"""Pins the DAFormer head and HRDA's attention head (``daformer_attention``) as released: the exact
state-dict keys and shapes (checkpoints and exports load by them) and, from ``torch.manual_seed(0)``,
the initial parameters and the outputs on a fixed input (computed in float64 so the sums do not depend
on the thread count). The numbers were captured from the heads before they shared one class; a
refactoring that changes a key, a shape, the order of the initial random draws or the computation fails here.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from plca.models.registry import create_head

MIT_CHANNELS = (64, 128, 320, 512)

# name -> (registered head, in_channels, classes, options)
CASES = {
    "daformer-default": ("daformer", MIT_CHANNELS, 19, {}),
    "daformer-small": ("daformer", (8, 16), 3, {"width": 16}),
    "attention-default": ("daformer_attention", MIT_CHANNELS, 19, {}),
    "attention-small": ("daformer_attention", (8, 16), 3, {"width": 16}),
}
LOGIT_INDICES = [0, 7, 100, -1]


class Pinned(NamedTuple):
    state_dict: list[str]  # "key:shape" in state-dict order, the shape as "AxBxC" ("scalar" for 0-d)
    parameter_sum: float  # the sum of every floating-point entry of the state dict after initialisation
    embedding_sum: float  # head.embed(levels).sum()
    logit_sum: float  # head(levels).sum()
    logits_at: tuple[float, ...]  # head(levels).flatten()[LOGIT_INDICES]


PINNED = {
    'daformer-default': Pinned(
        state_dict=[
            'embeddings.0.weight:256x64', 'embeddings.0.bias:256', 'embeddings.1.weight:256x128',
            'embeddings.1.bias:256', 'embeddings.2.weight:256x320', 'embeddings.2.bias:256',
            'embeddings.3.weight:256x512', 'embeddings.3.bias:256', 'fuse.branches.0.0.weight:256x1024x1x1',
            'fuse.branches.0.1.weight:256', 'fuse.branches.0.1.bias:256', 'fuse.branches.0.1.running_mean:256',
            'fuse.branches.0.1.running_var:256', 'fuse.branches.0.1.num_batches_tracked:scalar',
            'fuse.branches.1.0.0.weight:1024x1x3x3', 'fuse.branches.1.0.1.weight:1024',
            'fuse.branches.1.0.1.bias:1024', 'fuse.branches.1.0.1.running_mean:1024',
            'fuse.branches.1.0.1.running_var:1024', 'fuse.branches.1.0.1.num_batches_tracked:scalar',
            'fuse.branches.1.1.0.weight:256x1024x1x1', 'fuse.branches.1.1.1.weight:256',
            'fuse.branches.1.1.1.bias:256', 'fuse.branches.1.1.1.running_mean:256',
            'fuse.branches.1.1.1.running_var:256', 'fuse.branches.1.1.1.num_batches_tracked:scalar',
            'fuse.branches.2.0.0.weight:1024x1x3x3', 'fuse.branches.2.0.1.weight:1024',
            'fuse.branches.2.0.1.bias:1024', 'fuse.branches.2.0.1.running_mean:1024',
            'fuse.branches.2.0.1.running_var:1024', 'fuse.branches.2.0.1.num_batches_tracked:scalar',
            'fuse.branches.2.1.0.weight:256x1024x1x1', 'fuse.branches.2.1.1.weight:256',
            'fuse.branches.2.1.1.bias:256', 'fuse.branches.2.1.1.running_mean:256',
            'fuse.branches.2.1.1.running_var:256', 'fuse.branches.2.1.1.num_batches_tracked:scalar',
            'fuse.branches.3.0.0.weight:1024x1x3x3', 'fuse.branches.3.0.1.weight:1024',
            'fuse.branches.3.0.1.bias:1024', 'fuse.branches.3.0.1.running_mean:1024',
            'fuse.branches.3.0.1.running_var:1024', 'fuse.branches.3.0.1.num_batches_tracked:scalar',
            'fuse.branches.3.1.0.weight:256x1024x1x1', 'fuse.branches.3.1.1.weight:256',
            'fuse.branches.3.1.1.bias:256', 'fuse.branches.3.1.1.running_mean:256',
            'fuse.branches.3.1.1.running_var:256', 'fuse.branches.3.1.1.num_batches_tracked:scalar',
            'fuse.bottleneck.0.weight:256x1024x3x3', 'fuse.bottleneck.1.weight:256', 'fuse.bottleneck.1.bias:256',
            'fuse.bottleneck.1.running_mean:256', 'fuse.bottleneck.1.running_var:256',
            'fuse.bottleneck.1.num_batches_tracked:scalar', 'classifier.weight:19x256x1x1', 'classifier.bias:19'
        ],
        parameter_sum=8723.64294149325, embedding_sum=66982.8723864516, logit_sum=528.8873042158909,
        logits_at=(0.07600902963692693, 0.33124272213866424, 0.010562263567052024, -0.16702882249768997)),
    'daformer-small': Pinned(
        state_dict=[
            'embeddings.0.weight:16x8', 'embeddings.0.bias:16', 'embeddings.1.weight:16x16',
            'embeddings.1.bias:16', 'fuse.branches.0.0.weight:16x32x1x1', 'fuse.branches.0.1.weight:16',
            'fuse.branches.0.1.bias:16', 'fuse.branches.0.1.running_mean:16', 'fuse.branches.0.1.running_var:16',
            'fuse.branches.0.1.num_batches_tracked:scalar', 'fuse.branches.1.0.0.weight:32x1x3x3',
            'fuse.branches.1.0.1.weight:32', 'fuse.branches.1.0.1.bias:32', 'fuse.branches.1.0.1.running_mean:32',
            'fuse.branches.1.0.1.running_var:32', 'fuse.branches.1.0.1.num_batches_tracked:scalar',
            'fuse.branches.1.1.0.weight:16x32x1x1', 'fuse.branches.1.1.1.weight:16',
            'fuse.branches.1.1.1.bias:16', 'fuse.branches.1.1.1.running_mean:16',
            'fuse.branches.1.1.1.running_var:16', 'fuse.branches.1.1.1.num_batches_tracked:scalar',
            'fuse.branches.2.0.0.weight:32x1x3x3', 'fuse.branches.2.0.1.weight:32', 'fuse.branches.2.0.1.bias:32',
            'fuse.branches.2.0.1.running_mean:32', 'fuse.branches.2.0.1.running_var:32',
            'fuse.branches.2.0.1.num_batches_tracked:scalar', 'fuse.branches.2.1.0.weight:16x32x1x1',
            'fuse.branches.2.1.1.weight:16', 'fuse.branches.2.1.1.bias:16', 'fuse.branches.2.1.1.running_mean:16',
            'fuse.branches.2.1.1.running_var:16', 'fuse.branches.2.1.1.num_batches_tracked:scalar',
            'fuse.branches.3.0.0.weight:32x1x3x3', 'fuse.branches.3.0.1.weight:32', 'fuse.branches.3.0.1.bias:32',
            'fuse.branches.3.0.1.running_mean:32', 'fuse.branches.3.0.1.running_var:32',
            'fuse.branches.3.0.1.num_batches_tracked:scalar', 'fuse.branches.3.1.0.weight:16x32x1x1',
            'fuse.branches.3.1.1.weight:16', 'fuse.branches.3.1.1.bias:16', 'fuse.branches.3.1.1.running_mean:16',
            'fuse.branches.3.1.1.running_var:16', 'fuse.branches.3.1.1.num_batches_tracked:scalar',
            'fuse.bottleneck.0.weight:16x64x3x3', 'fuse.bottleneck.1.weight:16', 'fuse.bottleneck.1.bias:16',
            'fuse.bottleneck.1.running_mean:16', 'fuse.bottleneck.1.running_var:16',
            'fuse.bottleneck.1.num_batches_tracked:scalar', 'classifier.weight:3x16x1x1', 'classifier.bias:3'
        ],
        parameter_sum=329.7430632758651, embedding_sum=3463.1644537476136, logit_sum=-6.782527335704796,
        logits_at=(-0.00902860873324623, -0.02726499851449713, -0.01322551622141575, -0.011158676055555376)),
    'attention-default': Pinned(
        state_dict=[
            'embeddings.0.weight:256x64', 'embeddings.0.bias:256', 'embeddings.1.weight:256x128',
            'embeddings.1.bias:256', 'embeddings.2.weight:256x320', 'embeddings.2.bias:256',
            'embeddings.3.weight:256x512', 'embeddings.3.bias:256', 'fuse.0.weight:256x1024x1x1',
            'fuse.1.weight:256', 'fuse.1.bias:256', 'fuse.1.running_mean:256', 'fuse.1.running_var:256',
            'fuse.1.num_batches_tracked:scalar', 'classifier.weight:19x256x1x1', 'classifier.bias:19'
        ],
        parameter_sum=544.5541453681388, embedding_sum=70377.9899487374, logit_sum=-279.4841377583614,
        logits_at=(0.17121306098933364, 0.327623255724985, 0.2817199189115319, -0.40697650015333786)),
    'attention-small': Pinned(
        state_dict=[
            'embeddings.0.weight:16x8', 'embeddings.0.bias:16', 'embeddings.1.weight:16x16',
            'embeddings.1.bias:16', 'fuse.0.weight:16x32x1x1', 'fuse.1.weight:16', 'fuse.1.bias:16',
            'fuse.1.running_mean:16', 'fuse.1.running_var:16', 'fuse.1.num_batches_tracked:scalar',
            'classifier.weight:3x16x1x1', 'classifier.bias:3'
        ],
        parameter_sum=39.778417708774214, embedding_sum=3650.4999229848254, logit_sum=-7.762664937880219,
        logits_at=(0.027711685691158817, 0.0005456969271377213, 0.001459076488818913, 0.007578923350154532)),
}


def fixed_levels(in_channels: tuple[int, ...]) -> list[Tensor]:
    """float64 levels ``(2, C_k, 16 / 2^k, 16 / 2^k)`` from a fixed generator."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, c, 16 >> k, 16 >> k, generator=g, dtype=torch.float64) for k, c in enumerate(in_channels)]


def shape_text(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def build(case: str) -> torch.nn.Module:
    name, in_channels, classes, options = CASES[case]
    torch.manual_seed(0)
    return create_head(name, in_channels, classes, **options)


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_keys_and_shapes_are_pinned(case):
    head = build(case)
    assert [f"{key}:{shape_text(t)}" for key, t in head.state_dict().items()] == PINNED[case].state_dict


@pytest.mark.parametrize("case", list(CASES))
def test_initialisation_and_outputs_are_pinned(case):
    head = build(case)
    pinned = PINNED[case]
    parameter_sum = sum(float(t.double().sum()) for t in head.state_dict().values() if t.is_floating_point())
    assert parameter_sum == pytest.approx(pinned.parameter_sum, abs=1e-6)
    head = head.double().eval()
    levels = fixed_levels(CASES[case][1])
    with torch.no_grad():
        logits, embedding = head(levels), head.embed(levels)
    assert embedding.sum().item() == pytest.approx(pinned.embedding_sum, abs=1e-6)
    assert logits.sum().item() == pytest.approx(pinned.logit_sum, abs=1e-6)
    assert logits.flatten()[LOGIT_INDICES].tolist() == pytest.approx(pinned.logits_at, abs=1e-6)



def test_the_attention_head_is_the_daformer_head_with_the_1x1_fusion():
    from plca.models.daformer_head import DAFormerHead

    attention = build("attention-small")
    torch.manual_seed(0)
    plain = DAFormerHead((8, 16), 3, embed_dim=16, channels=16, fusion="conv1x1")
    assert isinstance(attention, DAFormerHead)
    assert all(torch.equal(a, b) for a, b in zip(attention.state_dict().values(), plain.state_dict().values()))
    with pytest.raises(ValueError, match="fusion must be one of aspp, conv1x1, got 'sep'"):
        DAFormerHead((8, 16), 3, fusion="sep")
