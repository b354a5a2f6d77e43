"""Networks: backbones and heads registered by name, assembled into a segmentor.

Importing this package registers every built-in backbone and head (see
:mod:`plca.models.registry`), in this order: the order of the lists the config's messages give;
:func:`build_segmentor` builds one by name.
"""

from plca.models import resnet, mit, efficientnet_lite, timm_backbone  # noqa: F401 - backbones, ResNets first
from plca.models import daformer_head, deeplab, segformer_head, attention_head  # noqa: F401 - registers the heads
from plca.models.segmentor import Segmentor, SegmentorSpec, build_segmentor

__all__ = ["Segmentor", "SegmentorSpec", "build_segmentor"]
