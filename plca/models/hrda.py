"""HRDA's multi-resolution segmentation (Hoyer et al., ECCV 2022, lhoyer/HRDA), for any backbone and head.

Switched on by ``model.hrda.enabled``; the segmentor then holds a :class:`MultiResolution` (its
``multi_resolution`` submodule, with the scale attention head) and routes its forward through it.

**Training** (the segmentor in train mode; HRDA's ``forward_train``), for a crop ``(B, 3, H, W)``:

1. the *context view*: the crop resized by ``context_scale`` (0.5), through backbone and head;
2. the *detail view*: a random ``detail_crop_size`` box (512 x 512) of the crop at full resolution,
   its corner a multiple of ``crop_divisible`` (8), through the same backbone and head;
3. the scale attention (a head of its own on the context view's backbone maps, sigmoid, one map
   per class with ``attention_classwise``) fuses the two (:func:`~plca.models.multi_resolution.fuse_scales`).

The output: ``logits`` (the fused prediction of the whole crop, at the detail scale's output
stride), ``detail_logits`` and ``detail_box`` (pixels of the crop), ``detail_loss_weight``,
``features`` (the detail view's map of the feature-level association), ``context_features``,
``context_logits`` and, with ``return_bottleneck``, ``bottleneck`` (the context view's last backbone
map: HRDA's ``feature_scale=0.5``, the ImageNet feature distance on the context view). The methods
turn it into HRDA's loss: ``(1 - w) * L(fused) + w * L(detail, labels in the box)``, ``w`` = 0.1.

**Inference** (eval mode; the teacher's pseudo-labels too): HRDA's ``encode_decode``: the context view
of the whole input, the detail scale by overlapping sliding windows of ``detail_crop_size`` (stride
half of it; ``slide_detail``), fused everywhere; an input larger than ``test_crop_size`` (1024 x 1024)
is itself covered by sliding windows (stride ``test_stride``, 512) whose fused predictions are
resized to the window and averaged at full resolution (HRDA's test ``mode='slide'``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plca.models.multi_resolution import crop, fuse_scales, sample_detail_box, scale_box, slide_predict

__all__ = ["HRDAOptions", "MultiResolution", "hrda_options"]


@dataclass
class HRDAOptions:
    """The ``model.hrda`` section; defaults are HRDA's (``configs/hrda/gtaHR2csHR_hrda.py``)."""

    enabled: bool = False  # HRDA's multi-resolution training and inference
    context_scale: float = 0.5  # the context view is the crop at this scale (HRDA: scales=[1, 0.5])
    detail_crop_size: list[int] = field(default_factory=lambda: [512, 512])  # [h, w] of the detail crop (hr_crop_size)
    detail_loss_weight: float = 0.1  # lambda_d (hr_loss_weight); the fused loss weighs 1 - lambda_d
    crop_divisible: int = 8  # the detail box's corner is a multiple of it (crop_coord_divisible)
    attention_head: str | None = None  # scale attention head: null = a copy of model.head; daformer_attention = HRDA's lighter DAFormer head (1x1 fusion)
    attention_classwise: bool = True  # one attention map per class (attention_classwise); false = one map
    slide_detail: bool = True  # inference: the detail scale by overlapping sliding windows (hr_slide_inference)
    test_crop_size: list[int] | None = field(default_factory=lambda: [1024, 1024])  # test sliding window; null = whole input
    test_stride: list[int] = field(default_factory=lambda: [512, 512])  # its stride

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value cannot work."""
        if not 0.0 < self.context_scale <= 1.0:
            raise ValueError(f"model.hrda.context_scale must be in (0, 1], got {self.context_scale}")
        for key in ("detail_crop_size", "test_stride") + (("test_crop_size",) if self.test_crop_size else ()):
            value = getattr(self, key)
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"model.hrda.{key} must be [h, w] of positive integers, got {value}")
        if not 0.0 <= self.detail_loss_weight < 1.0:
            raise ValueError(f"model.hrda.detail_loss_weight must be in [0, 1), got {self.detail_loss_weight}")
        if self.crop_divisible < 1:
            raise ValueError(f"model.hrda.crop_divisible must be >= 1, got {self.crop_divisible}")


def hrda_options(value: HRDAOptions | dict | None) -> HRDAOptions | None:
    """The enabled options of ``value`` (a section or a segmentor description's dict), else None."""
    if value is None:
        return None
    options = value if isinstance(value, HRDAOptions) else HRDAOptions(**value)
    return options if options.enabled else None


class SingleScale(Protocol):
    """What the multi-resolution forward uses of its segmentor."""

    features: str
    head: nn.Module

    def levels(self, images: Tensor) -> list[Tensor]: ...


class MultiResolution(nn.Module):
    """The scale attention head and HRDA's two forwards of a segmentor (see the module's docstring)."""

    def __init__(self, attention: nn.Module, options: HRDAOptions) -> None:
        super().__init__()
        options.validate()
        self.scale_attention = attention
        self.options = options

    def describe(self) -> dict:
        return asdict(self.options)

    def context_view(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` resized bilinearly by ``context_scale``."""
        scale = self.options.context_scale
        if scale == 1.0:
            return images
        size = (round(images.shape[-2] * scale), round(images.shape[-1] * scale))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def _context(self, net: SingleScale, images: Tensor) -> tuple[list[Tensor], Tensor, Tensor, int]:
        """The context view's levels, embedding and logits, and the head's output stride."""
        view = self.context_view(images)
        levels = net.levels(view)
        embedding = net.head.embed(levels)
        logits = net.head.classify(embedding)
        stride = view.shape[-2] // logits.shape[-2]
        if stride * logits.shape[-2] != view.shape[-2]:
            raise ValueError(f"the head's output {tuple(logits.shape[-2:])} is no whole fraction of its input "
                             f"{tuple(view.shape[-2:])}: give HRDA input sizes divisible by the output stride / "
                             f"context_scale")
        return levels, embedding, logits, stride

    def attention(self, levels: list[Tensor]) -> Tensor:
        """The scale attention ``(B, K or 1, h, w)`` in [0, 1] of the context view's backbone maps."""
        return torch.sigmoid(self.scale_attention(levels))

    def train_forward(self, net: SingleScale, images: Tensor, return_bottleneck: bool = False,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """HRDA's training forward of a crop ``(B, 3, H, W)``: the output keys of the module's docstring; the
        detail box is drawn from ``generator`` (torch's global generator when None)."""
        options = self.options
        levels, embedding, context_logits, stride = self._context(net, images)
        box = sample_detail_box(images.shape[-2], images.shape[-1], options.detail_crop_size,
                                options.crop_divisible, generator)
        detail_levels = net.levels(crop(images, box))
        detail_embedding = net.head.embed(detail_levels)
        detail_logits = net.head.classify(detail_embedding)
        fused = fuse_scales(context_logits, detail_logits, self.attention(levels), options.context_scale,
                            scale_box(box, stride))
        pick = (lambda lv, emb: lv[-1]) if net.features == "backbone_last" else (lambda lv, emb: emb)
        output = {"logits": fused, "detail_logits": detail_logits, "context_logits": context_logits,
                  "features": pick(detail_levels, detail_embedding), "context_features": pick(levels, embedding),
                  "detail_box": torch.tensor(box, device=images.device),
                  "detail_loss_weight": torch.tensor(options.detail_loss_weight, device=images.device)}
        if return_bottleneck:
            output["bottleneck"] = levels[-1]
        return output

    def encode_decode(self, net: SingleScale, images: Tensor) -> Tensor:
        """Fused logits ``(B, K, H / s, W / s)`` (``s`` the head's output stride) of the whole input:
        the context view fused with the detail scale (by overlapping sliding windows with ``slide_detail``)."""
        options = self.options
        levels, _, context_logits, stride = self._context(net, images)
        if options.slide_detail:
            window = options.detail_crop_size
            detail = slide_predict(lambda x: net.head(net.levels(x)), images, window,
                                   [window[0] // 2, window[1] // 2], output_stride=stride)
        else:
            detail = net.head(net.levels(images))
        return fuse_scales(context_logits, detail, self.attention(levels), options.context_scale)

    def inference(self, net: SingleScale, images: Tensor) -> Tensor:
        """HRDA's test prediction of images ``(B, 3, H, W)``: :meth:`encode_decode`, over sliding windows of
        ``test_crop_size`` when the input is larger (then at full resolution, ``(B, K, H, W)``).

        An input whose sides are not multiples of ``crop_divisible`` (the grid on which context and detail
        align) is padded with zeros at the bottom and right, and the prediction, resized to the padded
        input, cropped back to ``(B, K, H, W)``.
        """
        height, width = images.shape[-2:]
        align = self.options.crop_divisible
        pad_h, pad_w = -height % align, -width % align
        if not pad_h and not pad_w:
            return self._windows(net, images)
        padded = F.pad(images, (0, pad_w, 0, pad_h))
        logits = F.interpolate(self._windows(net, padded), size=padded.shape[-2:], mode="bilinear",
                               align_corners=False)
        return logits[..., :height, :width]

    def _windows(self, net: SingleScale, images: Tensor) -> Tensor:
        window = self.options.test_crop_size
        if window is None or (images.shape[-2] <= window[0] and images.shape[-1] <= window[1]):
            return self.encode_decode(net, images)

        def resized(windows: Tensor) -> Tensor:
            logits = self.encode_decode(net, windows)
            return F.interpolate(logits, size=windows.shape[-2:], mode="bilinear", align_corners=False)

        return slide_predict(resized, images, window, self.options.test_stride)
