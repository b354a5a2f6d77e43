"""``plca prepare``: check a dataset folder before training, file by file, and say what is wrong in plain words.

The dataset is read by the training code's own readers (:func:`plca.data.datasets.scan_dataset`,
the collecting twin of ``build_dataset``) and its files checked by :func:`plca.data.checks.check_files`
at the ``full`` level, so what passes here loads in training. Checks: the folder is of the format
asked for (else one line saying what it looks like: each registered format's ``recognise``); the
expected folders exist; every image has a label and every label an image; split files are UTF-8
and name existing samples once each; every file decodes completely (no truncated or unreadable
files) and every image converts to RGB; label files are single-channel ids (SYNTHIA: 16-bit PNGs);
label ids are in the format's table (e.g. Cityscapes label ids 0..33, folder: class index or 255);
image and label sizes agree (GTA5 has a few pairs that do not: a warning, they are resized when
loaded). It reports the images' sizes, the images per condition of formats with conditions (ACDC's
weather, Dark Zurich's time of day), and, given the configured rescale and crop, whether the
images suit those sizes.

Without ``split`` every split the format finds is checked (e.g. gta5: every image and each split
file; folder: each split file; Cityscapes: train and val). A split without labels (a target's
training images) is checked as unlabelled images when told so (``unlabelled``), and gets a note
when it has none and the format may serve as an unlabelled target.

Errors make the dataset unusable (exit status 2); warnings and notes do not (status 0).
Optionally writes each label as a PNG of class indices of ``--classes`` (``--write-cache``,
``DIR/<sample name>.png``) and per-class pixel statistics (``--stats``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from plca.config import ConfigError
from plca.data.rare_class import ClassStatistics, class_pixel_counts
from plca.data.checks import FileCheckReport, FileProblem, Finding, check_files
from plca.data.datasets import SegmentationDataset, dataset_splits, scan_dataset, unpaired_labels
from plca.data.formats import format_names, get_format
from plca.data.io import png_header
from plca.data.labels import IGNORE_INDEX
from plca.data.transforms import TrainTransform, resize_warnings
from plca.files import atomic_write_json, atomic_write_text

__all__ = ["Finding", "PrepareReport", "check_dataset", "class_statistics", "default_classes", "format_findings",
           "png_header"]

_LISTED = 10  # files named per finding in the printed report
_SIZES_SHOWN = 5  # most common image sizes in the printed report

# check_files kind -> (level, message); {n}: number of files, {known}: the label table in words.
_FILE_FINDINGS = {
    "image": ("error", "{n} image file(s) cannot be read: they do not open as images"),
    "image_mode": ("error", "{n} image file(s) are in a mode with no faithful 8-bit RGB conversion"),
    "image_data": ("error", "{n} image file(s) cannot be read completely (truncated or corrupt)"),
    "label": ("error", "{n} label file(s) cannot be read completely (truncated, corrupt or not an image)"),
    "colour": ("error", "{n} label file(s) are colour (RGB) images, not single-channel ids; use the id images "
                        "(Cityscapes: *_gtFine_labelIds.png, not *_color.png)"),
    "depth": ("error", "{n} SYNTHIA label file(s) are not 16-bit PNGs: they were read or saved with the wrong bit "
                       "depth (e.g. as 8-bit), which corrupts the class ids; use the original GT/LABELS files of "
                       "SYNTHIA-RAND-CITYSCAPES"),
    "ids": ("error", "{n} label file(s) hold ids outside the {known} (listed: file: ids)"),
    "size": ("error", "{n} image / label pair(s) have different sizes"),
    "resized": ("warning", "{n} GTA5 image / label pair(s) have different sizes; when loaded, the label is resized "
                           "to the image with nearest neighbour"),
    "all_ignore": ("warning", "{n} label(s) contain only ignored pixels (no class of --classes): they teach nothing"),
}


@dataclass
class PrepareReport:
    """What :func:`check_dataset` found; ``image_sizes`` counts the images' ``(height, width)``."""

    format: str
    root: Path
    classes: list[str]
    checked: int = 0  # samples checked
    findings: list[Finding] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    image_sizes: Counter = field(default_factory=Counter)
    conditions: dict[str, Counter] = field(default_factory=dict)  # split -> images per condition (ACDC, Dark Zurich)
    stats: dict | None = None
    stats_path: Path | None = None
    cache_dir: Path | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "note"]

    def add(self, level: str, message: str, items: Sequence[str] = ()) -> None:
        self.findings.append(Finding(level, message, list(items)))


def _prepare_format(fmt: str):
    """The registered format ``fmt`` if ``plca prepare`` checks it, else a ``ConfigError`` naming those it does."""
    if fmt not in format_names(prepare=True):
        raise ConfigError(f"dataset format '{fmt}' is unknown; choose one of {', '.join(format_names(prepare=True))}")
    return get_format(fmt)


def default_classes(fmt: str, root: Path) -> list[str]:
    """The format's own classes (e.g. the 19 Cityscapes classes; the 16 SYNTHIA ones; a folder's
    ``classes.txt``); a ``ConfigError`` when it has none."""
    classes = _prepare_format(fmt).default_classes(root)
    if classes is None:
        raise ConfigError(f"plca prepare {fmt} needs --classes NAME ... (the class names in label-index order), "
                          f"or a {root / 'classes.txt'} listing them")
    return classes


def _check_arguments(fmt: str, classes: Sequence[str], split: str | None, crop_size, shorter_side,
                     scale_range) -> None:
    known = _prepare_format(fmt).class_names
    if known is not None:
        unknown = [name for name in classes if name not in known]
        if unknown:
            raise ConfigError(f"--classes: unknown class name(s) {unknown}; known: {', '.join(known)}")
    problem = get_format(fmt).check_split(split) if split else None
    if problem:
        raise ConfigError(f"--split: {problem}")
    if not classes or len(set(classes)) != len(classes) or len(classes) >= IGNORE_INDEX:
        raise ConfigError(f"--classes must be distinct names, at most {IGNORE_INDEX - 1}")
    try:
        TrainTransform(crop_size or (1, 1), shorter_side=shorter_side, scale_range=scale_range)
    except ValueError as error:
        raise ConfigError(f"plca prepare: {error}") from None


def _union(datasets: Sequence[SegmentationDataset], description: str) -> SegmentationDataset | None:
    """One dataset of the samples of ``datasets`` (same format), each image once."""
    if not datasets:
        return None
    unique: dict[Path, object] = {}
    for dataset in datasets:
        for sample in dataset.samples:
            unique.setdefault(sample.image, sample)
    first = datasets[0]
    return SegmentationDataset(list(unique.values()), first.classes, first.label_reader, description=description,
                               resize_mismatched_labels=first.resize_mismatched_labels)


def _item(problem: FileProblem) -> str:
    """A file's line in the printed report: its name (or the sample's) and what is wrong."""
    if problem.kind == "colour":
        return problem.path.name
    if problem.kind == "ids":
        return f"{problem.path.name}: " + ", ".join(map(str, problem.ids[:8])) + (" ..." if len(problem.ids) > 8
                                                                                 else "")
    if problem.kind in ("size", "resized"):
        return f"{problem.sample} ({problem.reason})"
    if problem.kind == "all_ignore":
        return problem.sample
    return f"{problem.path.name} ({problem.reason})"


def _add_file_findings(report: PrepareReport, files: FileCheckReport) -> None:
    by_kind: dict[str, list[FileProblem]] = {}
    for problem in files.files:
        by_kind.setdefault(problem.kind, []).append(problem)
    for kind, (level, text) in _FILE_FINDINGS.items():
        if kind in by_kind:
            report.add(level, text.format(n=len(by_kind[kind]), known=files.known), [_item(p) for p in by_kind[kind]])


def check_dataset(fmt: str, root: str | Path, classes: Sequence[str] | None = None, split: str | None = None,
                  write_cache: str | Path | None = None, stats_path: str | Path | None = None, workers: int = 4,
                  progress: bool = True, *, unlabelled: bool = False, crop_size: Sequence[int] | None = None,
                  shorter_side: Sequence[int] | None = None,
                  scale_range: Sequence[float] | None = None,
                  rcs_stats_path: str | Path | None = None) -> PrepareReport:
    """Check every file of a dataset (or of one ``split``); optionally write class-index label PNGs
    (``write_cache``) and per-class statistics (``stats_path``, JSON).

    ``unlabelled``: the split(s) are a target's training images, whose labels are not required
    (as the trainer reads the target). ``crop_size`` ``(h, w)`` and one of ``shorter_side`` ``(lo, hi)``
    / ``scale_range`` ``(lo, hi)``: the run's augmentation (as :class:`~plca.data.transforms.TrainTransform`);
    given, the images' sizes are checked against it (warnings). ``rcs_stats_path``: also write the
    per-image class pixel counts and label sizes that rare class sampling reads
    (``data.rare_class_sampling.stats``; for the ``split`` the run trains on). Bad arguments raise ``ConfigError``.
    """
    root = Path(root).expanduser()
    classes = list(classes) if classes else default_classes(fmt, root)
    _check_arguments(fmt, classes, split, crop_size, shorter_side, scale_range)
    report = PrepareReport(format=fmt, root=root, classes=classes)
    report.splits = [split] if split else (dataset_splits(fmt, root) or ["train"])
    datasets = _scan_splits(report, fmt, root, classes, unlabelled)
    if split in (None, "all") and datasets:
        orphans = unpaired_labels(fmt, root, report.splits)
        if orphans:
            report.add("error", f"{len(orphans)} label(s) have no image (incomplete download or extraction?)",
                       [path.name for path in orphans])
    if unlabelled and datasets:
        report.add("note", "checked as unlabelled images (unlabelled / --unlabelled): labels are not required; "
                           "the label files present were checked too")
    dataset = _union(datasets, f"{fmt} dataset in {root}")
    if dataset is None:
        return report

    cache = Path(write_cache) if write_cache else None

    per_image: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
    lock = threading.Lock()

    def on_label(sample, label: np.ndarray) -> None:
        if cache is not None:
            path = cache / f"{sample.name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(path)
        if rcs_stats_path is not None:
            counts = class_pixel_counts([label], len(classes))[0]
            with lock:
                per_image[sample.name] = counts, label.shape[:2]

    wanted = cache is not None or rcs_stats_path is not None
    files = check_files(dataset, "full", workers=workers, on_label=on_label if wanted else None, progress=progress)
    report.checked = files.checked
    report.image_sizes = files.image_sizes
    _add_file_findings(report, files)
    if crop_size is not None or shorter_side is not None or scale_range is not None:
        for text in resize_warnings(files.image_sizes, crop_size, shorter_side, scale_range):
            report.add("warning", text)
    if files.labelled:
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache / "classes.txt", "\n".join(classes) + "\n")
            report.cache_dir = cache
        report.stats = class_statistics(fmt, root, classes, files.class_pixels, files.class_images, files.labelled)
        if stats_path is not None:
            report.stats_path = Path(stats_path)
            report.stats_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(report.stats_path, report.stats)
        if rcs_stats_path is not None:
            names = [sample.name for sample in dataset.samples if sample.name in per_image]
            ClassStatistics(classes, np.stack([per_image[n][0] for n in names]), names,
                            np.array([per_image[n][1] for n in names], dtype=np.int64).reshape(-1, 2)
                            ).save(rcs_stats_path)
            report.add("note", f"per-image class statistics for rare class sampling written to {rcs_stats_path} "
                               f"(data.rare_class_sampling.stats={rcs_stats_path})")
    return report


def _scan_splits(report: PrepareReport, fmt: str, root: Path, classes: Sequence[str],
                 unlabelled: bool) -> list:
    """The datasets of ``report.splits`` (those that could be listed); their findings (each once) and
    images per condition go into ``report``."""
    dataset_format = get_format(fmt)
    datasets = []
    for name in report.splits:
        scan = scan_dataset(fmt, root, name, classes, require_labels=not unlabelled)
        report.findings += [f for f in scan.findings if (f.level, f.message) not in
                            {(seen.level, seen.message) for seen in report.findings}]
        if scan.dataset is not None:
            datasets.append(scan.dataset)
            if dataset_format.conditions:
                report.conditions[name] = Counter(dataset_format.condition_of(sample)
                                                  for sample in scan.dataset.samples)
    return datasets


def class_statistics(fmt: str, root: Path, classes: Sequence[str], counts: np.ndarray, images_with: np.ndarray,
                     images: int) -> dict:
    """Per-class pixel counts, pixel frequency (share of non-ignored pixels) and number of images containing it.

    ``counts`` ``(C + 1,)``: pixels per class, last the ignored ones; ``images_with`` ``(C,)``.
    """
    labelled_pixels = int(counts[:-1].sum())
    return {
        "format": fmt,
        "root": str(root),
        "images": images,
        "labelled_pixels": labelled_pixels,
        "ignored_pixels": int(counts[-1]),
        "classes": {
            name: {
                "pixels": int(counts[index]),
                "frequency": float(counts[index] / labelled_pixels) if labelled_pixels else 0.0,
                "images": int(images_with[index]),
            }
            for index, name in enumerate(classes)
        },
    }


def describe_sizes(image_sizes: Counter) -> str:
    """The most common image sizes (W x H) and the shorter side's min / median / max, in one line."""
    total = sum(image_sizes.values())
    common = ", ".join(f"{w}x{h} ({count})" for (h, w), count in image_sizes.most_common(_SIZES_SHOWN))
    more = len(image_sizes) - _SIZES_SHOWN
    shorter = np.repeat([min(size) for size in image_sizes], list(image_sizes.values()))
    return (f"image sizes (W x H, count): {common}" + (f", and {more} other size(s)" if more > 0 else "")
            + f"; shorter side min / median / max: {shorter.min()} / {int(np.median(shorter))} / {shorter.max()} px "
              f"over {total} images")


def describe_conditions(conditions: dict[str, Counter], order: Sequence[str]) -> str:
    """Images per condition of each split, in one line: ``train: fog 400, night 400 (800); val: ...``."""
    parts = []
    for split, counts in conditions.items():
        listed = ", ".join(f"{name} {counts[name]}" for name in order if counts.get(name))
        parts.append(f"{split}: {listed} ({sum(counts.values())})")
    return "images per condition: " + "; ".join(parts)


def format_findings(report: PrepareReport) -> str:
    """The report in plain words, one paragraph per finding (errors, warnings, notes), ending with the verdict."""
    splits = f" (split(s): {', '.join(report.splits)})" if report.splits else ""
    lines = [f"{report.format} dataset at {report.root}{splits}: checked {report.checked} sample(s); "
             f"{len(report.classes)} classes ({', '.join(report.classes)})"]
    if report.image_sizes:
        lines.append(describe_sizes(report.image_sizes))
    if report.conditions:
        lines.append(describe_conditions(report.conditions, get_format(report.format).conditions))
    order = {"error": 0, "warning": 1, "note": 2}
    for finding in sorted(report.findings, key=lambda f: order.get(f.level, 3)):
        lines.append(f"{finding.level.upper()}: {finding.message}")
        shown = finding.items[:_LISTED]
        lines += [f"    {item}" for item in shown]
        if len(finding.items) > len(shown):
            lines.append(f"    ... and {len(finding.items) - len(shown)} more")
    if report.stats is not None:
        absent = [name for name, entry in report.stats["classes"].items() if entry["pixels"] == 0]
        if absent:
            lines.append(f"NOTE: no labelled pixel of {', '.join(absent)}")
    if report.cache_dir is not None:
        lines.append(f"class-index labels written to {report.cache_dir}")
    if report.stats_path is not None:
        lines.append(f"class statistics written to {report.stats_path}")
    errors, warnings = len(report.errors), len(report.warnings)
    if errors:
        lines.append(f"Result: NOT USABLE - {errors} error(s), {warnings} warning(s). Fix the errors above and "
                     f"run plca prepare again.")
    elif warnings:
        lines.append(f"Result: usable, with {warnings} warning(s).")
    else:
        lines.append("Result: OK, no problems found.")
    return "\n".join(lines)
