"""``plca predict``: segment images with a trained model and write label, colour and overlay PNGs.

For each input image ``NAME`` it writes, at the input's full resolution::

    OUTPUT/labels/NAME.png   class indices of the config's data.classes (uint8; 255 is never predicted)
    OUTPUT/color/NAME.png    the same, in the Cityscapes palette
    OUTPUT/overlay/NAME.jpg  the colours blended 50 / 50 over the input
    OUTPUT/legend.png        which colour is which class

With ``--split test --submission`` it writes instead the files the dataset's benchmark server scores
(:mod:`plca.tools.submission`).

The inference itself (whole image or sliding window, scales, flips, test-time aggregation) is
:mod:`plca.prediction`'s, shared with :func:`plca.segment`; its names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from plca.config import Config, ConfigError
from plca.data.labels import palette
from plca.engine.distributed import available_cpus
from plca.engine.image_grids import colour_legend
from plca.prediction import (  # noqa: F401 - re-exported: the names plca predict users import from here
    InferenceOptions, options_from_config, predict_full, resize_images, window_starts)

if TYPE_CHECKING:
    from plca.tools.submission import SubmissionWriter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


# --------------------------------------------------------------------------- inputs and outputs


@dataclass
class InputImage:
    name: str  # output name without suffix; may contain sub-folders
    path: Path


def list_inputs(source: str | Path, exclude: Path | None = None) -> list[InputImage]:
    """One image file, or every image under a folder (recursively, sorted); names keep sub-folders."""
    from plca.data.io import DatasetError

    source = Path(source)
    if source.is_file():
        return [InputImage(source.stem, source)]
    if not source.is_dir():
        raise DatasetError(f"--input '{source}' is neither an image file nor a folder")
    exclude = exclude.resolve() if exclude is not None else None
    images = []
    for path in sorted(source.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if exclude is not None and exclude in path.resolve().parents:
            continue  # earlier predictions written inside the input folder
        images.append(InputImage(path.relative_to(source).with_suffix("").as_posix(), path))
    if not images:
        raise DatasetError(f"--input folder '{source}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    _check_unique(images)
    return images


def dataset_inputs(config: Config, split: str) -> list[InputImage]:
    """The images of ``split`` of the config's validation dataset (``data.val``: format and root)."""
    from plca.data.datasets import build_dataset

    if config.data.val is None:
        raise ConfigError("--split needs data.val in the config (its format and root are used)")
    dataset = build_dataset(config.data.val.format, config.data.val.root, split, classes=config.data.classes,
                            require_labels=False)
    images = [InputImage(sample.name, Path(sample.image)) for sample in dataset.samples]
    _check_unique(images)
    return images


def _check_unique(images: Sequence[InputImage]) -> None:
    from plca.data.io import DatasetError

    seen: dict[str, Path] = {}
    for item in images:
        if item.name in seen:
            raise DatasetError(f"'{seen[item.name]}' and '{item.path}' would both be written as '{item.name}.png'; "
                               f"rename one of them")
        seen[item.name] = item.path


class _ImageFiles(Dataset):
    """Reads input images; a file that fails to load yields its error message instead."""

    def __init__(self, items: Sequence[InputImage]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[InputImage, np.ndarray | None, str | None]:
        from plca.data.io import DatasetError, read_image

        item = self.items[index]
        try:
            return item, read_image(item.path), None
        except (DatasetError, OSError) as error:
            return item, None, str(error)


def _as_is(record):
    return record


def colorize(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """``(H, W, 3) uint8`` palette colours of class indices ``(H, W)``."""
    return palette(classes)[labels]


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3) uint8``: ``(1 - alpha) * image + alpha * colors``."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_outputs(output: Path, name: str, image: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
    """Write ``labels/NAME.png``, ``color/NAME.png`` and ``overlay/NAME.jpg`` under ``output``."""
    colors = colorize(labels, classes)
    for folder, array, suffix, kwargs in (("labels", labels, ".png", {}), ("color", colors, ".png", {}),
                                          ("overlay", overlay(image, colors), ".jpg", {"quality": 90})):
        path = output / folder / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, **kwargs)


# --------------------------------------------------------------------------- the command


@dataclass
class PredictSummary:
    output: Path
    written: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def load_model_for_inference(checkpoint: str | Path, config_path: str | Path | None = None,
                             overrides: Sequence[str] = (), allow_unfinished: bool = True) -> tuple[nn.Module, Config]:
    """The model (CPU, eval mode) and its config (see :func:`plca.inference.load_for_inference`)."""
    from plca.inference import load_for_inference

    model, config, _ = load_for_inference(checkpoint, config_path, overrides, allow_unfinished=allow_unfinished)
    return model, config


def _batches(loader: Iterator, batch_size: int) -> Iterator[list[tuple[InputImage, np.ndarray | None, str | None]]]:
    """Group consecutive readable images of equal size (failures travel alone)."""
    group: list = []
    for record in loader:
        image = record[1]
        if group and (image is None or len(group) >= batch_size or group[0][1].shape != image.shape):
            yield group
            group = []
        if image is None:
            yield [record]
        else:
            group.append(record)
    if group:
        yield group


def run_predict(model: nn.Module, config: Config, inputs: Sequence[InputImage], output: str | Path,
                options: InferenceOptions, device: torch.device, num_workers: int = 2,
                progress: bool = True, submission: SubmissionWriter | None = None) -> PredictSummary:
    """Segment every input and write its outputs; unreadable inputs are skipped and listed.

    With ``submission`` only the benchmark server's files are written (and zipped), not labels/, color/
    and overlay/."""
    output = Path(output)
    summary = PredictSummary(output=output)
    options = replace(options, progress=progress)
    model = model.to(device).eval()
    loader = DataLoader(_ImageFiles(inputs), batch_size=None, collate_fn=_as_is,
                        num_workers=min(num_workers, max(len(inputs) - 1, 0), available_cpus()))
    bar = tqdm(total=len(inputs), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    whole_image_batch = 1 if options.window else options.batch_size
    for group in _batches(iter(loader), whole_image_batch):
        item, image, error = group[0]
        if image is None:
            summary.failed.append((str(item.path), error))
            bar.update(1)
            continue
        images = torch.stack([torch.from_numpy(np.ascontiguousarray(rec[1])).permute(2, 0, 1) for rec in group])
        probs = predict_full(model, images.to(device), options)
        labels = probs.argmax(dim=1).to(torch.uint8).cpu().numpy()
        for (item, image, _), label in zip(group, labels):
            if submission is None:
                write_outputs(output, item.name, image, label, config.data.classes)
            else:
                submission(item.name, label)
            summary.written.append(item.name)
        bar.update(len(group))
    bar.close()
    output.mkdir(parents=True, exist_ok=True)
    if submission is not None:
        submission.finish()
    else:
        Image.fromarray(colour_legend(config.data.classes, width=480)).save(output / "legend.png")
    return summary
