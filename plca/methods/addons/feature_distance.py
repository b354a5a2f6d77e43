"""DAFormer's thing-class ImageNet feature distance.

The L2 distance ``|f - f_imnet|`` per feature pixel between the student's and a frozen
ImageNet model's bottleneck features of the *source* image, averaged over the feature pixels
whose down-scaled source label is a thing class.

Labels are down-scaled as DAFormer's ``downscale_label_ratio``: every feature pixel takes the
most frequent label of the label pixels under it, ignore counted as a label of its own; the
result is ignore when that label is ignore or covers less than ``min_ratio`` (0.75) of the
cell. DAFormer pools ``scale x scale`` cells with ``scale = W // w``; here the cells are those
of adaptive average pooling to ``(h, w)``, which are exactly those when ``H = scale * h`` and
``W = scale * w`` and still defined when the sizes are not multiples (a 512 x 512 crop gives a
65 x 65 map in the Caffe-style DeepLab-v2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from plca.data.labels import IGNORE_INDEX

__all__ = ["THING_CLASSES", "downscale_labels", "feature_distance_loss", "thing_class_indices", "thing_mask"]

#: DAFormer's ``imnet_feature_dist_classes = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]``, by name.
THING_CLASSES: tuple[str, ...] = ("traffic light", "traffic sign", "person", "rider", "car", "truck", "bus",
                                  "train", "motorcycle", "bicycle")


def thing_class_indices(classes: Sequence[str]) -> list[int]:
    """Indices in the run's ``classes`` of the thing classes it holds (ascending)."""
    return [index for index, name in enumerate(classes) if name in THING_CLASSES]


def downscale_labels(labels: Tensor, size: Sequence[int] | torch.Size, min_ratio: float = 0.75,
                     num_classes: int | None = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Labels ``(B, H, W)`` -> ``(B, h, w)``, ``size = (h, w)``: each cell's majority label, or ignore.

    ``num_classes``: labels are ``0 .. num_classes - 1`` or ``ignore_index`` (from the labels when
    None). A tie between labels goes to the smaller class index, ignore counting as the largest.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    height, width = (int(v) for v in size)
    labelled = labels != ignore_index
    if num_classes is None:
        num_classes = int(labels[labelled].max()) + 1 if bool(labelled.any()) else 0
    if bool(labelled.any()) and (int(labels[labelled].min()) < 0 or int(labels[labelled].max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}")
    codes = torch.where(labelled, labels, torch.full_like(labels, num_classes))
    one_hot = F.one_hot(codes, num_classes + 1).permute(0, 3, 1, 2).float()
    shares = F.adaptive_avg_pool2d(one_hot, (height, width))
    ratio, label = shares.max(dim=1)
    label[(label == num_classes) | (ratio < min_ratio)] = ignore_index
    return label


def thing_mask(labels: Tensor, size: Sequence[int] | torch.Size, thing_classes: Sequence[int],
               min_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B, h, w)`` bool: feature pixels whose down-scaled label (:func:`downscale_labels`) is a thing class."""
    scaled = downscale_labels(labels, size, min_ratio, ignore_index=ignore_index)
    things = torch.as_tensor(list(thing_classes), dtype=scaled.dtype, device=scaled.device)
    return torch.isin(scaled, things)


def feature_distance_loss(student_features: Tensor, imagenet_features: Tensor, labels: Tensor,
                          thing_classes: Sequence[int], ignore_index: int = IGNORE_INDEX,
                          min_ratio: float = 0.75) -> Tensor:
    """Mean over thing-class feature pixels of ``|student - imagenet|_2`` over channels.

    Features ``(B, C, h, w)`` (the ImageNet ones are detached here), source labels ``(B, H, W)``.
    A scalar; 0 with a zero gradient when no feature pixel is a thing class. The gradient is 0
    (not NaN) where the two features coincide, as at the start of training.
    """
    if student_features.shape != imagenet_features.shape or student_features.dim() != 4:
        raise ValueError(f"features must be two (B, C, h, w) tensors of one shape, got "
                         f"{tuple(student_features.shape)} and {tuple(imagenet_features.shape)}")
    if labels.dim() != 3 or labels.shape[0] != student_features.shape[0]:
        raise ValueError(f"labels must be (B, H, W) with B = {student_features.shape[0]}, got {tuple(labels.shape)}")
    mask = thing_mask(labels, student_features.shape[-2:], thing_classes, min_ratio, ignore_index)
    distance = torch.linalg.vector_norm(student_features.float() - imagenet_features.detach().float(), dim=1)
    return distance[mask].sum() / mask.sum().clamp(min=1)
