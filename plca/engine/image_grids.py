"""Image grids for TensorBoard and reports: input | prediction | label, titled, with a colour legend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from plca.data.labels import IGNORE_INDEX, palette

_TITLE_HEIGHT = 18
_SWATCH = 12
_PAD = 4


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _as_array(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _resize_nearest(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(B, h, w)`` integer maps resized to ``(B, height, width)`` by nearest neighbour."""
    if maps.shape[-2:] == (height, width):
        return maps
    rows = (np.arange(height) * maps.shape[1] / height).astype(int)
    cols = (np.arange(width) * maps.shape[2] / width).astype(int)
    return maps[:, rows][:, :, cols]


def colour_legend(classes: Sequence[str], width: int) -> np.ndarray:
    """A ``(h, width, 3) uint8`` strip: a colour swatch and the class name for each class, wrapped to
    ``width`` (the text grows with wide images, so that it stays readable when the image is scaled down)."""
    text_size = max(12, min(28, width // 90))
    font = _font(text_size)
    swatch, pad = max(_SWATCH, text_size), max(_PAD, text_size // 3)
    colors = palette(classes)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(name, colors[k], int(probe.textlength(name, font=font))) for k, name in enumerate(classes)]
    entries.append(("ignore", np.zeros(3, dtype=np.uint8), int(probe.textlength("ignore", font=font))))
    lines, line, used = [], [], pad
    for entry in entries:
        size = swatch + pad + entry[2] + 3 * pad
        if line and used + size > width:
            lines.append(line)
            line, used = [], pad
        line.append(entry)
        used += size
    lines.append(line)
    strip = Image.new("RGB", (width, len(lines) * (swatch + 2 * pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for row, entries_in_line in enumerate(lines):
        x, y = pad, pad + row * (swatch + 2 * pad)
        for name, color, text_width in entries_in_line:
            draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(c) for c in color), outline=(90, 90, 90))
            draw.text((x + swatch + pad, y - 1), name, fill=(0, 0, 0), font=font)
            x += swatch + pad + text_width + 3 * pad
    return np.asarray(strip)


def titled_panels(panels: Sequence[np.ndarray], titles: Sequence[str]) -> np.ndarray:
    """Panels ``(H, W, 3)`` side by side, each under its title (the text grows with wide panels)."""
    size = max(12, min(28, panels[0].shape[1] // 24))
    font = _font(size)
    row = np.concatenate(panels, axis=1)
    header = Image.new("RGB", (row.shape[1], _TITLE_HEIGHT if size == 12 else size + 8), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    x = 0
    for panel, title in zip(panels, titles):
        draw.text((x + _PAD, 2), title, fill=(0, 0, 0), font=font)
        x += panel.shape[1]
    return np.concatenate([np.asarray(header), row], axis=0)


def make_image_grid(images, predictions, labels, classes: Sequence[str], max_images: int = 4,
                    legend: bool = True) -> np.ndarray:
    """An ``(H', W', 3) uint8`` grid: column titles, one row per image (input | prediction | label), a legend.

    ``images``: ``(B, 3, H, W)`` RGB, 0-255 (uint8 or float); ``predictions`` / ``labels``:
    ``(B, h, w)`` class indices (255 = ignore, drawn black), resized to ``(H, W)`` by nearest
    neighbour when their size differs. The label column is left out when ``labels`` is None
    or has no labelled pixel (an unlabelled target).
    """
    images = _as_array(images)[:max_images].astype(np.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    count, _, height, width = images.shape
    colors = palette(classes)

    def colorize(maps) -> np.ndarray:
        maps = _as_array(maps)[:count]
        if maps.ndim != 3:
            raise ValueError(f"predictions / labels must be (B, H, W), got {tuple(maps.shape)}")
        return colors[np.clip(_resize_nearest(maps.astype(np.int64), height, width), 0, 255)]

    columns = [np.clip(images, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1), colorize(predictions)]
    titles = ["input", "prediction"]
    if labels is not None and bool((_as_array(labels)[:count] != IGNORE_INDEX).any()):
        columns.append(colorize(labels))
        titles.append("label")
    rows = np.concatenate(columns, axis=2).reshape(-1, len(columns) * width, 3)
    panels = [rows[:, k * width:(k + 1) * width] for k in range(len(columns))]
    grid = titled_panels(panels, titles)
    if legend:
        grid = np.concatenate([grid, colour_legend(classes, grid.shape[1])], axis=0)
    return np.ascontiguousarray(grid)


def log_image_grid(writer, tag: str, images, predictions, labels, classes: Sequence[str], step: int,
                   max_images: int = 4) -> None:
    """Add :func:`make_image_grid` to TensorBoard as one image.

    ``writer``: a SummaryWriter, a :class:`plca.engine.logger.TensorBoard` (its ``writer``;
    None off the main process), or None (nothing happens).
    """
    writer = getattr(writer, "writer", writer)
    if writer is None:
        return
    writer.add_image(tag, make_image_grid(images, predictions, labels, classes, max_images), step, dataformats="HWC")
