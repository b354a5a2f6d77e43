"""Networks: backbones and heads registered by name, assembled into a segmentor.

Importing this package registers every built-in backbone and head (see
:mod:`plca.models.registry`); :func:`build_segmentor` builds one by name.
"""

from plca.models import deeplab, resnet  # noqa: F401 - registers resnet18..101 and the deeplabv2 head
from plca.models.segmentor import Segmentor, SegmentorSpec, build_segmentor

__all__ = ["Segmentor", "SegmentorSpec", "build_segmentor"]
