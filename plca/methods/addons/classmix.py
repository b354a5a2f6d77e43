"""ClassMix (DACS): paste half of a source image's classes onto a target image.

For each source image ``i`` the classes present in its label (ignore excluded) are shuffled
and the first ``ceil(n / 2)`` (DACS' ``int((n + n % 2) / 2)``) are kept; the mask is 1 on the
pixels of the kept classes. Source image ``i`` is mixed onto target image ``i``:
``mixed = mask * source + (1 - mask) * target`` for the image, the label (source label /
pseudo-label) and the pixel weight (1 on source pixels / the pseudo-label weight).

Where this differs from DAFormer's ``get_class_masks``: DAFormer draws from
``torch.unique(labels)`` of the *whole batch* (so an image can be given classes it does not
hold, and fewer than half of its own) and keeps the ignore id among the candidates; here the
candidates are the classes of each image itself, ignore excluded, as the ClassMix paper states.
"""

from __future__ import annotations

import torch
from torch import Tensor

from plca.data.labels import IGNORE_INDEX

__all__ = ["class_mix", "class_mix_masks", "mix"]


def class_mix_masks(source_labels: Tensor, generator: torch.Generator,
                    ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Masks ``(B, 1, H, W)`` float (1 = take the source pixel) from labels ``(B, H, W)``.

    One ``torch.randperm`` per image, drawn from ``generator`` on its own device, in batch
    order. An image without any labelled pixel gives an all-zero mask.
    """
    if source_labels.dim() != 3:
        raise ValueError(f"source_labels must be (B, H, W), got shape {tuple(source_labels.shape)}")
    masks = torch.zeros(source_labels.shape[0], 1, *source_labels.shape[1:], device=source_labels.device)
    for i, label in enumerate(source_labels):
        classes = torch.unique(label)
        classes = classes[classes != ignore_index]
        count = int(classes.numel())
        order = torch.randperm(count, generator=generator, device=generator.device).to(classes.device)
        chosen = classes[order[:(count + 1) // 2]]
        masks[i, 0] = torch.isin(label, chosen).float()
    return masks


def mix(mask: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """``mask * source + (1 - mask) * target``, the mask ``(B, 1, H, W)`` broadcast over channels.

    ``source`` / ``target``: images ``(B, C, H, W)`` or maps ``(B, H, W)`` (labels, weights). Integer
    tensors (labels) are selected with ``mask > 0.5``, so they keep their dtype and exact values.
    """
    if source.shape != target.shape:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W), got shape {tuple(mask.shape)}")
    if source.dim() == 3:
        mask = mask[:, 0]
    elif source.dim() != 4:
        raise ValueError(f"source must be (B, C, H, W) or (B, H, W), got shape {tuple(source.shape)}")
    if mask.shape[0] != source.shape[0] or mask.shape[-2:] != source.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match source {tuple(source.shape)}")
    if source.is_floating_point():
        mask = mask.to(source.dtype)
        return mask * source + (1 - mask) * target
    return torch.where(mask > 0.5, source, target)


def class_mix(source_images: Tensor, source_labels: Tensor, target_images: Tensor, target_labels: Tensor,
              target_weights: Tensor, generator: torch.Generator,
              ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ClassMix of a source batch onto a target batch (image ``i`` onto image ``i``).

    Images ``(B, 3, H, W)``, labels ``(B, H, W)`` (the target's are pseudo-labels), target
    weights ``(B, H, W)``. Returns ``(images, labels, weights, masks (B, 1, H, W))``; the weight
    is 1 on every pasted source pixel.
    """
    masks = class_mix_masks(source_labels, generator, ignore_index)
    images = mix(masks, source_images, target_images)
    labels = mix(masks, source_labels, target_labels)
    weights = mix(masks, torch.ones_like(target_weights), target_weights)
    return images, labels, weights, masks
