"""Networks: backbones and heads registered by name, assembled into a segmentor.

Importing this package registers every built-in backbone and head (see
:mod:`plca.models.registry`); :func:`build_segmentor` builds one by name.
"""

from plca.models import daformer_head, deeplab, efficientnet_lite, mit, resnet, segformer_head, timm_backbone  # noqa: F401 - registers all
from plca.models.segmentor import Segmentor, SegmentorSpec, build_segmentor

__all__ = ["Segmentor", "SegmentorSpec", "build_segmentor"]
