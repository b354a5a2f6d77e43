"""A gallery of the validation images a model does worst and best on: ``input | prediction | label | error``.

One PNG per image (the panels under their titles, a caption with the image's name and
score, the colour legend below), ``index.json`` and ``index.md`` listing name, score and
file of each, and ``scores.csv`` with the score of every validation image. The scores
and the kept predictions come from :class:`plca.evaluation.evaluator.PerImageScores`
(one evaluation pass); only the images and labels of the chosen images are read again.

Panels are ``panel_width`` pixels wide (the label's aspect ratio kept): the input is
resized bilinearly, the label maps by nearest neighbour. Error map: pixels predicted
correctly are grey, wrong ones red, ignored ones (label 255) black; it is computed at
label resolution, then resized like the label maps.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from plca.data.labels import IGNORE_INDEX, palette
from plca.engine.image_grids import colour_legend, titled_panels
from plca.evaluation.evaluator import ImageScore, KeptImage, PerImageScores
from plca.files import atomic_write_json, atomic_write_text

CORRECT_COLOUR = (128, 128, 128)
WRONG_COLOUR = (255, 0, 0)
IGNORED_COLOUR = (0, 0, 0)
PANEL_TITLES = ("input", "prediction", "label", "error: grey right, red wrong, black ignored")
SCORE_TEXT = ("per-image mIoU: mean IoU (%) over the classes present in the image's label or prediction "
              "(labelled pixels only)")
ERROR_TEXT = "Error map: grey = predicted correctly, red = wrong, black = ignored (no label)."
_GALLERY_FILE = re.compile(r"^(lowest|highest)_\d+_.*\.png$")


def error_map(prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``(H, W, 3) uint8``: :data:`CORRECT_COLOUR` where ``prediction == label``, :data:`WRONG_COLOUR`
    elsewhere, :data:`IGNORED_COLOUR` where ``label`` is 255. Both maps ``(H, W)`` of class indices."""
    prediction, label = np.asarray(prediction), np.asarray(label)
    if prediction.shape != label.shape or prediction.ndim != 2:
        raise ValueError(f"error_map: prediction {prediction.shape} and label {label.shape} must be one (H, W)")
    out = np.empty((*label.shape, 3), dtype=np.uint8)
    out[:] = WRONG_COLOUR
    out[prediction == label] = CORRECT_COLOUR
    out[label == IGNORE_INDEX] = IGNORED_COLOUR
    return out


def resize_nearest(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W, ...)`` resized to ``(height, width, ...)`` by nearest neighbour (pixel centres)."""
    rows = ((np.arange(height) + 0.5) * values.shape[0] / height).astype(int)
    cols = ((np.arange(width) + 0.5) * values.shape[1] / width).astype(int)
    return values[rows][:, cols]


def panel_size(label_shape: tuple[int, int], panel_width: int) -> tuple[int, int]:
    """``(height, width)`` of a panel ``panel_width`` wide with the aspect ratio of a ``(H, W)`` label."""
    height, width = label_shape
    return max(1, round(height * panel_width / width)), panel_width


def gallery_panels(image: np.ndarray, prediction: np.ndarray, label: np.ndarray, classes: Sequence[str],
                   panel_width: int = 512) -> list[np.ndarray]:
    """The four panels ``(h, panel_width, 3) uint8``: input, prediction, label (palette colours), error map.

    ``image``: ``(H', W', 3)`` or ``(3, H', W')`` uint8 RGB (any size, e.g. the resized evaluation
    input); ``prediction``, ``label``: ``(H, W)`` class indices at label resolution.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"gallery_panels: image must be (H, W, 3) or (3, H, W), got {image.shape}")
    prediction, label = np.asarray(prediction), np.asarray(label)
    height, width = panel_size(label.shape, panel_width)
    colours = palette(classes)
    picture = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8))).resize((width, height), Image.BILINEAR)
    maps = [colours[np.clip(prediction.astype(np.int64), 0, 255)], colours[np.clip(label.astype(np.int64), 0, 255)],
            error_map(prediction, label)]
    return [np.asarray(picture)] + [resize_nearest(panel, height, width) for panel in maps]


def gallery_image(image: np.ndarray, prediction: np.ndarray, label: np.ndarray, classes: Sequence[str],
                  caption: str, panel_width: int = 512) -> np.ndarray:
    """``(h', 4 * panel_width, 3) uint8``: the caption, the titled panels of :func:`gallery_panels`, the legend."""
    row = titled_panels(gallery_panels(image, prediction, label, classes, panel_width), PANEL_TITLES)
    titled = titled_panels([row], [caption])
    return np.ascontiguousarray(np.concatenate([titled, colour_legend(classes, titled.shape[1])], axis=0))


def _file_name(kind: str, rank: int, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "image"
    return f"{kind}_{rank:02d}_{safe}.png"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _caption(kind: str, rank: int, score: ImageScore) -> str:
    return (f"{kind} #{rank}: {score.name}  |  mIoU {_percent(score.mIoU)} % over {score.classes} classes  |  "
            f"pixel accuracy {_percent(score.pixel_accuracy)} %")


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def gallery_title(count: int) -> str:
    """``Gallery: the 4 images with the lowest and the 4 with the highest per-image mIoU``."""
    images = "image" if count == 1 else "images"
    return f"Gallery: the {count} {images} with the lowest and the {count} with the highest per-image mIoU"


def gallery_markdown(index: dict, prefix: str = "", heading: str = "#", title: str | None = None) -> list[str]:
    """Markdown lines of a gallery ``index`` (as :func:`write_gallery` returns): a table and the images of
    the lowest, then of the highest. Image paths are ``prefix + file``; ``heading``: the title's level."""
    title = title or gallery_title(index["count"])
    lines = [f"{heading} {_markdown_cell(title)}", ""]
    if index.get("description"):
        lines += [_markdown_cell(index["description"]), ""]
    lines += [f"{index['images']} images scored; {SCORE_TEXT}. {ERROR_TEXT}", ""]
    for kind in ("lowest", "highest"):
        entries = index[kind]
        lines += [f"{heading}# {kind.capitalize()} per-image mIoU", ""]
        if not entries:
            lines += ["No image with a labelled pixel.", ""]
            continue
        lines += ["| rank | image | mIoU | pixel accuracy | classes | file |",
                  "| ---: | --- | ---: | ---: | ---: | --- |"]
        lines += [f"| {e['rank']} | `{_markdown_cell(e['name'])}` | {_percent(e['mIoU'])} | "
                  f"{_percent(e['pixel_accuracy'])} | {e['classes']} | {_markdown_cell(e['file'])} |" for e in entries]
        lines.append("")
        for entry in entries:
            lines += [f"![{_markdown_cell(entry['name'])}]({prefix}{entry['file']})", ""]
    return lines


def _write_scores_csv(scores: Sequence[ImageScore], path: Path) -> None:
    ordered = sorted(scores, key=lambda s: (s.mIoU is None, s.mIoU if s.mIoU is not None else 0.0, s.index))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "name", "mIoU", "pixel_accuracy", "classes"])
        for score in ordered:
            writer.writerow([score.index, score.name, "" if score.mIoU is None else f"{score.mIoU:.4f}",
                             "" if score.pixel_accuracy is None else f"{score.pixel_accuracy:.4f}", score.classes])


def write_gallery(output_dir: str | Path, image_scores: PerImageScores, dataset, classes: Sequence[str],
                  panel_width: int = 512, description: str | None = None) -> dict:
    """Write the gallery of ``image_scores`` (its ``keep`` lowest and highest) into ``output_dir``.

    ``dataset[index]`` must give ``{"image": (3, H', W') uint8, "label": (H, W)}`` as evaluation
    saw them. Earlier gallery PNGs in ``output_dir`` are removed. Returns the content of
    ``index.json``: ``{"count", "images", "description", "score", "lowest": [...], "highest": [...]}``,
    each entry ``{"rank", "index", "name", "mIoU", "pixel_accuracy", "classes", "file"}``.
    """
    if panel_width < 8:
        raise ValueError(f"panel_width must be at least 8 pixels, got {panel_width}")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.iterdir():
        if _GALLERY_FILE.match(stale.name):
            stale.unlink()
    index: dict = {"count": image_scores.keep, "images": len(image_scores.scores), "description": description,
                   "score": SCORE_TEXT, "error_map": ERROR_TEXT, "lowest": [], "highest": []}
    picks: dict[str, list[KeptImage]] = {"lowest": image_scores.lowest(), "highest": image_scores.highest()}
    for kind, kept_images in picks.items():
        for rank, kept in enumerate(kept_images, start=1):
            score = kept.score
            item = dataset[score.index]
            label = np.asarray(item["label"])
            if label.shape != kept.prediction.shape:
                raise ValueError(f"gallery: the label of '{score.name}' is {label.shape}, its prediction "
                                 f"{kept.prediction.shape}: is this the dataset that was evaluated?")
            file = _file_name(kind, rank, score.name)
            grid = gallery_image(np.asarray(item["image"]), kept.prediction, label, classes,
                                 _caption(kind, rank, score), panel_width)
            Image.fromarray(grid).save(output / file)
            index[kind].append({"rank": rank, **score.as_dict(), "file": file})
    atomic_write_json(output / "index.json", index)
    atomic_write_text(output / "index.md", "\n".join(gallery_markdown(index)))
    _write_scores_csv(image_scores.scores, output / "scores.csv")
    return index


def default_gallery_dir(metrics_path: str | Path) -> Path:
    """``X.gallery/`` next to the metrics JSON ``X.metrics.json`` (or ``X.json``)."""
    path = Path(metrics_path)
    name = path.name
    for suffix in (".metrics.json", ".json"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}.gallery")
