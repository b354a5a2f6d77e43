"""HRDA's multi-resolution pieces as pure functions: the detail box, the scale fusion, sliding windows.

As lhoyer/HRDA computes them (``mmseg/models/segmentors/hrda_encoder_decoder.py``: ``get_crop_bbox``,
``extract_slide_feat``; ``mmseg/models/decode_heads/hrda_head.py``: ``HRDAHead.forward``,
``decode_hr``). A box is ``(y1, y2, x1, x2)`` in pixels of the full-resolution image, end exclusive.

The fusion, with ``a = sigmoid(attention)`` at the context logits' resolution, ``m`` the detail box
drawn on that grid (1 inside, 0 outside; everywhere at inference, where the detail covers the image)
and ``up`` a bilinear upsampling by ``1 / context_scale``::

    fused = up(m * a) * detail_inserted + up((1 - m * a) * context)

``detail_inserted`` is the detail logits placed in the box, 0 elsewhere: inside the box the
attention weighs the detail against the context, outside it the prediction is the context's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Box = tuple[int, int, int, int]

__all__ = ["Box", "crop", "fuse_scales", "sample_detail_box", "scale_box", "slide_boxes", "slide_predict"]


def sample_detail_box(height: int, width: int, crop_size: Sequence[int], divisible: int = 1,
                      generator: torch.Generator | None = None) -> Box:
    """A random ``crop_size = (h, w)`` box inside an image of ``height x width`` whose top-left corner is a
    multiple of ``divisible`` (HRDA's ``get_crop_bbox``; the whole image when it is the crop's size)."""
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    if crop_h > height or crop_w > width:
        raise ValueError(f"the detail crop {crop_h}x{crop_w} does not fit the {height}x{width} training crop "
                         f"(model.hrda.detail_crop_size must be at most train.crop_size)")
    if divisible < 1:
        raise ValueError(f"the crop divisibility must be >= 1, got {divisible}")
    offsets = []
    for margin in (height - crop_h, width - crop_w):
        choices = max((margin + 1) // divisible, 1)
        offsets.append(int(torch.randint(choices, (1,), generator=generator)) * divisible)
    return offsets[0], offsets[0] + crop_h, offsets[1], offsets[1] + crop_w


def scale_box(box: Box, factor: float) -> Box:
    """``box`` divided by ``factor`` (HRDA's ``scale_box``); raises when a coordinate is not a multiple of it."""
    scaled = tuple(coordinate / factor for coordinate in box)
    if any(abs(value - round(value)) > 1e-6 for value in scaled):
        raise ValueError(f"the detail box {box} is not aligned with a grid of {factor:g} pixels: make "
                         f"model.hrda.crop_divisible a multiple of it (HRDA: 8 for output stride 4 and scale 0.5)")
    return tuple(int(round(value)) for value in scaled)  # type: ignore[return-value]


def crop(tensor: Tensor, box: Box) -> Tensor:
    """The ``box`` of the last two dimensions of ``tensor`` (labels ``(B, H, W)`` or maps ``(B, C, H, W)``)."""
    y1, y2, x1, x2 = box
    return tensor[..., y1:y2, x1:x2]


def fuse_scales(context: Tensor, detail: Tensor, attention: Tensor, context_scale: float,
                box: Box | None = None) -> Tensor:
    """HRDA's fused logits ``(B, K, H', W')`` at the detail scale.

    ``context``: logits ``(B, K, h, w)`` of the context view; ``attention``: the scale attention's
    sigmoid, ``(B, K or 1, h, w)``; ``detail``: logits of the detail view, ``(B, K, hd, wd)`` for the box
    or ``(B, K, H', W')`` covering the image when ``box`` is None; ``box``: the detail box in the detail
    logits' grid (pixels / output stride). ``H' = h / context_scale``.
    """
    factor = 1.0 / context_scale
    size = (round(context.shape[-2] * factor), round(context.shape[-1] * factor))
    if box is not None:
        mask = torch.zeros_like(context[:, :1])
        # HRDA truncates the box onto the context grid (scale_box's int()): with output stride 8 and
        # crop_divisible 8 (its DeepLab-v2 runs) the attention's box may start half a context cell early
        y1, y2, x1, x2 = (int(coordinate / factor) for coordinate in box)
        mask[..., y1:y2, x1:x2] = 1
        attention = attention * mask
        inserted = detail.new_zeros(*detail.shape[:2], *size)
        inserted[..., box[0]:box[1], box[2]:box[3]] = detail
    else:
        inserted = detail
    if tuple(inserted.shape[-2:]) != size:
        raise ValueError(f"the detail logits {tuple(inserted.shape[-2:])} do not match the context's upsampled to "
                         f"{size} (context scale {context_scale:g})")
    up_context = _resize((1 - attention) * context, size)
    return _resize(attention, size) * inserted + up_context


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def slide_boxes(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]) -> list[Box]:
    """mmseg's / HRDA's sliding-window grid: windows of ``crop_size`` every ``stride``, the last ones moved
    back inside the image; a window is the image itself where the image is smaller."""
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    stride_h, stride_w = int(stride[0]), int(stride[1])
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return boxes


def slide_predict(predict: Callable[[Tensor], Tensor], images: Tensor, crop_size: Sequence[int],
                  stride: Sequence[int], output_stride: int = 1, batched: bool = True) -> Tensor:
    """The mean of ``predict``'s outputs over the sliding windows of ``images`` ``(B, 3, H, W)``.

    ``predict`` maps windows ``(N, 3, h, w)`` to ``(N, K, h / output_stride, w / output_stride)``; the
    windows' outputs are averaged where they overlap, on the grid of ``output_stride`` pixels
    (``decode_hr``'s stitching; every window corner must lie on that grid). ``batched``: all windows
    in one call (HRDA's ``extract_slide_feat``), else one call per window. Returns
    ``(B, K, H / output_stride, W / output_stride)``.
    """
    batch, _, height, width = images.shape
    boxes = slide_boxes(height, width, crop_size, stride)
    windows = [crop(images, box) for box in boxes]
    outputs = (predict(torch.cat(windows)).split(batch) if batched else [predict(window) for window in windows])
    grid = [scale_box(box, output_stride) for box in boxes]
    size = (max(b[1] for b in grid), max(b[3] for b in grid))
    total = outputs[0].new_zeros(batch, outputs[0].shape[1], *size)
    count = outputs[0].new_zeros(1, 1, *size)
    for (y1, y2, x1, x2), output in zip(grid, outputs):
        total[..., y1:y2, x1:x2] += output
        count[..., y1:y2, x1:x2] += 1
    return total / count
