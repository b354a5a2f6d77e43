"""``plca prepare``: check a dataset folder before training, file by file, and say what is wrong in plain words.

Checks: the expected folders exist; every image has a label and every label an
image; split files name existing samples; every file decodes completely (no
truncated or unreadable files); label files are single-channel ids (SYNTHIA:
16-bit PNGs); label ids are in the format's table (Cityscapes label ids 0..33,
SYNTHIA ids 0..22, folder: class index or 255); image and label sizes agree
(GTA5 has a few pairs that do not: a warning, they are resized when loaded).

Errors make the dataset unusable (exit status 2); warnings do not (status 0).
Optionally writes each label as a PNG of class indices of ``--classes``
(``--write-cache``) and per-class pixel statistics (``--stats``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from plca.config import ConfigError
from plca.data.labels import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    SYNTHIA16_CLASSES,
    class_remap,
    cityscapes_id_to_train_id,
    synthia_id_to_train_id,
)

FORMATS = ("gta5", "synthia", "cityscapes", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Largest valid raw label id per format (folder: the number of classes - 1, computed).
MAX_RAW_ID = {"gta5": 33, "cityscapes": 33, "synthia": 22}
_LISTED = 10  # files named per finding in the printed report
_BAD = 65535  # marks raw ids outside the format's table in a lookup table


@dataclass
class Finding:
    """One kind of problem and the files (or names) that have it."""

    level: str  # "error" | "warning"
    message: str
    items: list[str] = field(default_factory=list)


@dataclass
class PrepareReport:
    format: str
    root: Path
    classes: list[str]
    checked: int = 0  # samples checked
    findings: list[Finding] = field(default_factory=list)
    stats: dict | None = None
    stats_path: Path | None = None
    cache_dir: Path | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def add(self, level: str, message: str, items: Sequence[str] = ()) -> None:
        self.findings.append(Finding(level, message, list(items)))


@dataclass
class Sample:
    name: str
    image: Path | None
    label: Path | None


# --------------------------------------------------------------------------- layouts


def _stems(folder: Path, suffixes: Sequence[str], report: PrepareReport) -> dict[str, Path]:
    files: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in files:
                duplicates.append(f"{files[path.stem].name} / {path.name}")
            files[path.stem] = path
    if duplicates:
        report.add("error", f"{folder}: several files share one name (which one is meant is ambiguous)", duplicates)
    return files


def _read_split_file(path: Path) -> list[str]:
    """Names in a split file: one per line, ``#`` comments and blank lines ignored, image suffixes dropped."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(Path(line).stem if Path(line).suffix.lower() in IMAGE_SUFFIXES else line)
    return names


def _split_files(report: PrepareReport, split: str | None, all_names: Sequence[str]) -> list[str] | None:
    """The names to check (None: every image), recording split-file problems.

    With no ``split`` every split file ``ROOT/*.txt`` (but ``classes.txt``) is checked; gta5 and
    synthia read split ``all`` / ``train`` without a file as every image, as the loader does.
    """
    root = report.root
    if split is None:
        files = [p for p in sorted(root.glob("*.txt")) if p.name != "classes.txt"]
        if not files and report.format == "folder":
            report.add("error", f"{root} has no split file: the folder format needs ROOT/SPLIT.txt (e.g. train.txt) "
                                f"listing one image name per line")
    elif (root / f"{split}.txt").is_file():
        files = [root / f"{split}.txt"]
    elif report.format in ("gta5", "synthia") and split in ("all", "train"):
        return None
    else:
        report.add("error", f"split '{split}' needs the file {root / f'{split}.txt'}, which is missing")
        return []
    known = set(all_names)
    for path in files:
        listed = _read_split_file(path)
        if not listed:
            report.add("error", f"the split file {path.name} lists no names")
        duplicates = sorted({name for name in listed if listed.count(name) > 1})
        if duplicates:
            report.add("error", f"the split file {path.name} lists names more than once", duplicates)
        absent = [name for name in listed if name not in known]
        if absent:
            report.add("error", f"the split file {path.name} names {len(absent)} sample(s) that have no image",
                       absent)
    return None if split is None else _read_split_file(files[0])


def _pair_flat(report: PrepareReport, image_dir: Path, label_dir: Path, split: str | None,
               labels_required: bool, image_suffixes: Sequence[str]) -> list[Sample]:
    """Pair ``image_dir/NAME.<suffix>`` with ``label_dir/NAME.png``; check the split files."""
    if not image_dir.is_dir():
        report.add("error", f"the image folder {image_dir} is missing")
        return []
    images = _stems(image_dir, image_suffixes, report)
    if not images:
        report.add("error", f"the image folder {image_dir} holds no images ({', '.join(image_suffixes)})")
    labels: dict[str, Path] | None = None
    if label_dir.is_dir():
        labels = _stems(label_dir, (".png",), report)
    elif labels_required:
        report.add("error", f"the label folder {label_dir} is missing")
    else:
        report.add("warning", f"there is no label folder {label_dir}: the images can serve only as the unlabelled "
                              f"target, not as a source or for validation")
    chosen = _split_files(report, split, list(images))
    names = sorted(images) if chosen is None else [name for name in chosen if name in images]
    if labels is not None:
        selected = set(names)
        no_label = [images[name].name for name in names if name not in labels]
        no_image = [labels[name].name for name in sorted(labels)
                    if name not in images and (chosen is None or name in selected)]
        if no_label:
            report.add("error", f"{len(no_label)} image(s) have no label (expected {label_dir}/NAME.png)", no_label)
        if no_image:
            report.add("error", f"{len(no_image)} label(s) have no image in {image_dir}", no_image)
    return [Sample(name, images[name], labels.get(name) if labels is not None else None) for name in names]


def _pair_cityscapes(report: PrepareReport, split: str | None) -> list[Sample]:
    image_root, label_root = report.root / "leftImg8bit", report.root / "gtFine"
    if not image_root.is_dir():
        report.add("error", f"the image folder {image_root} is missing (expected leftImg8bit/SPLIT/CITY/*.png)")
        return []
    has_labels = label_root.is_dir()
    if not has_labels:
        report.add("warning", f"there is no label folder {label_root}: the images can serve only as the unlabelled "
                              f"target, not for validation")
    splits = [split] if split else [s for s in ("train", "val") if (image_root / s).is_dir()]
    if not splits:
        report.add("error", f"{image_root} has neither a train nor a val folder")
    samples: list[Sample] = []
    for name in splits:
        if not (image_root / name).is_dir():
            report.add("error", f"split folder {image_root / name} is missing")
            continue
        images = {p.relative_to(image_root / name).as_posix()[: -len("_leftImg8bit.png")]: p
                  for p in sorted((image_root / name).glob("*/*_leftImg8bit.png"))}
        if not images:
            report.add("error", f"{image_root / name} holds no CITY/*_leftImg8bit.png files")
        if not has_labels:
            samples += [Sample(f"{name}/{key}", path, None) for key, path in images.items()]
            continue
        if not (label_root / name).is_dir():
            report.add("error", f"split folder {label_root / name} is missing")
            continue
        labels = {p.relative_to(label_root / name).as_posix()[: -len("_gtFine_labelIds.png")]: p
                  for p in sorted((label_root / name).glob("*/*_gtFine_labelIds.png"))}
        no_label = [f"{name}/{key}" for key in images if key not in labels]
        no_image = [f"{name}/{key}" for key in labels if key not in images]
        if no_label:
            report.add("error", f"{len(no_label)} image(s) of {name} have no gtFine/.../*_gtFine_labelIds.png",
                       no_label)
        if no_image:
            report.add("error", f"{len(no_image)} label(s) of {name} have no leftImg8bit/.../*_leftImg8bit.png",
                       no_image)
        samples += [Sample(f"{name}/{key}", path, labels.get(key)) for key, path in images.items()]
    return samples


def find_samples(report: PrepareReport, split: str | None) -> list[Sample]:
    """The samples of the dataset at ``report.root``, recording layout problems in ``report``."""
    root = report.root
    if not root.is_dir():
        report.add("error", f"the dataset folder {root} does not exist")
        return []
    if report.format == "gta5":
        return _pair_flat(report, root / "images", root / "labels", split, True, (".png",))
    if report.format == "synthia":
        return _pair_flat(report, root / "RGB", root / "GT" / "LABELS", split, True, (".png",))
    if report.format == "folder":
        return _pair_flat(report, root / "images", root / "labels", split, False, IMAGE_SUFFIXES)
    return _pair_cityscapes(report, split)


# --------------------------------------------------------------------------- one sample


def png_header(path: Path) -> tuple[int, int, int, int] | None:
    """``(width, height, bit depth, colour type)`` from a PNG's IHDR chunk; None if not a PNG."""
    with open(path, "rb") as handle:
        head = handle.read(33)
    if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), head[24], head[25])


@dataclass
class SampleResult:
    name: str
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)
    label: np.ndarray | None = None  # (H, W) uint8 class indices of the report's classes


def _read(function: Callable, path: Path):
    """``function(path)``, or the reason it failed as text (starting with the path)."""
    from plca.data.io import DatasetError

    try:
        return function(path), None
    except (DatasetError, OSError, ValueError, SyntaxError) as error:
        why = str(error) or type(error).__name__
        return None, why if why.startswith(str(path)) else f"{path}: {why}"


def check_sample(sample: Sample, fmt: str, lut: np.ndarray) -> SampleResult:
    """Decode one image / label pair completely and record what is wrong with it."""
    from plca.data.io import read_image, read_label, read_synthia_label

    result = SampleResult(sample.name)
    image, why = _read(read_image, sample.image) if sample.image is not None else (None, None)
    if why is not None:
        result.problems.append(("unreadable_image", why))
    if sample.label is None:
        return result
    label_path = sample.label
    header = png_header(label_path)
    if fmt == "synthia":
        if header is not None and header[2] != 16:
            result.problems.append(("synthia_depth", f"{label_path.name} ({header[2]}-bit)"))
            return result
        label, why = _read(read_synthia_label, label_path)
    else:
        if header is not None and header[3] in (2, 6):  # colour type RGB / RGBA
            result.problems.append(("colour_label", label_path.name))
            return result
        label, why = _read(read_label, label_path)
    if why is not None:
        result.problems.append(("unreadable_label", why))
        return result
    ids = np.unique(label)
    bad = ids[lut[ids] == _BAD]
    if bad.size:
        shown = ", ".join(map(str, bad[:8].tolist())) + (" ..." if bad.size > 8 else "")
        result.problems.append(("bad_ids", f"{label_path.name}: {shown}"))
    mapped = lut[label]
    mapped[mapped == _BAD] = IGNORE_INDEX
    result.label = mapped.astype(np.uint8)
    if image is not None and image.shape[:2] != label.shape[:2]:
        result.problems.append(("size_mismatch", f"{sample.name} (image {image.shape[1]}x{image.shape[0]}, "
                                                 f"label {label.shape[1]}x{label.shape[0]})"))
    if not (result.label != IGNORE_INDEX).any():
        result.problems.append(("all_ignore", sample.name))
    return result


def label_lookup(fmt: str, classes: Sequence[str]) -> np.ndarray:
    """Raw label id -> class index of ``classes`` (255 ignore, ``_BAD`` for ids outside the table).

    ``(256,)`` for gta5 / cityscapes / folder, ``(65536,)`` for synthia; dtype int32.
    """
    if fmt == "folder":
        lut = np.full(256, _BAD, dtype=np.int32)
        lut[: len(classes)] = np.arange(len(classes))
        lut[IGNORE_INDEX] = IGNORE_INDEX
        return lut
    to_classes = class_remap(classes).astype(np.int32)
    if fmt == "synthia":
        lut = to_classes[synthia_id_to_train_id()]
        lut[MAX_RAW_ID["synthia"] + 1:] = _BAD
        return lut
    lut = to_classes[cityscapes_id_to_train_id()]
    lut[MAX_RAW_ID[fmt] + 1:] = _BAD
    return lut


# --------------------------------------------------------------------------- the whole dataset

_PROBLEM_TEXT = {
    "unreadable_image": ("error", "{n} image file(s) cannot be read completely (truncated, corrupt or not an image)"),
    "unreadable_label": ("error", "{n} label file(s) cannot be read completely (truncated, corrupt or not an image)"),
    "synthia_depth": ("error", "{n} SYNTHIA label file(s) are not 16-bit PNGs: they were read or saved with the "
                               "wrong bit depth (e.g. as 8-bit), which corrupts the class ids; use the original "
                               "GT/LABELS files of SYNTHIA-RAND-CITYSCAPES"),
    "colour_label": ("error", "{n} label file(s) are colour (RGB) images, not single-channel ids; use the id "
                              "images (Cityscapes: *_gtFine_labelIds.png, not *_color.png)"),
    "bad_ids": ("error", "{n} label file(s) hold ids outside the {table} (listed: file: ids)"),
    "size_mismatch": ("error", "{n} image / label pair(s) have different sizes"),
    "all_ignore": ("warning", "{n} label(s) contain only ignored pixels (no class of --classes): they teach nothing"),
}


def _table_text(fmt: str, classes: Sequence[str]) -> str:
    if fmt == "folder":
        return f"class table (0..{len(classes) - 1} for the {len(classes)} classes, or 255 = ignore)"
    if fmt == "synthia":
        return "SYNTHIA class table (ids 0..22); those pixels would be ignored. Are these the GT/LABELS files?"
    return ("Cityscapes label ids (0..33); those pixels would be ignored. Are these label-id files "
            "(not train ids, colour or instance images)?")


def default_classes(fmt: str, root: Path) -> list[str]:
    """19 Cityscapes classes (gta5, cityscapes), the 16 SYNTHIA ones, or a folder's ``classes.txt``."""
    if fmt == "folder" and (root / "classes.txt").is_file():
        return [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
    if fmt == "synthia":
        return list(SYNTHIA16_CLASSES)
    if fmt in ("gta5", "cityscapes"):
        return list(CITYSCAPES_CLASSES)
    raise ConfigError(f"plca prepare folder needs --classes NAME ... (the class names in label-index order), "
                      f"or a {root / 'classes.txt'} listing them")


def check_dataset(fmt: str, root: str | Path, classes: Sequence[str] | None = None, split: str | None = None,
                  write_cache: str | Path | None = None, stats_path: str | Path | None = None, workers: int = 4,
                  progress: bool = True) -> PrepareReport:
    """Check every file of a dataset; optionally write class-index label PNGs and per-class statistics."""
    if fmt not in FORMATS:
        raise ConfigError(f"dataset format '{fmt}' is unknown; choose one of {', '.join(FORMATS)}")
    classes = list(classes) if classes else default_classes(fmt, Path(root))
    if fmt != "folder":
        unknown = [name for name in classes if name not in CITYSCAPES_CLASSES]
        if unknown:
            raise ConfigError(f"--classes: unknown class name(s) {unknown}; known: {', '.join(CITYSCAPES_CLASSES)}")
    if len(set(classes)) != len(classes) or len(classes) >= IGNORE_INDEX:
        raise ConfigError("--classes must be distinct names, at most 254")
    report = PrepareReport(format=fmt, root=Path(root), classes=classes)
    listed = default_classes(fmt, report.root) if fmt == "folder" and (report.root / "classes.txt").is_file() else None
    if listed is not None and listed != classes:
        report.add("error", f"{report.root / 'classes.txt'} lists the classes [{', '.join(listed)}] in label-index "
                            f"order, but --classes gives [{', '.join(classes)}]; they must agree (same order)")
    samples = find_samples(report, split)
    lut = label_lookup(fmt, classes)
    cache = Path(write_cache) if write_cache else None
    counts = np.zeros(len(classes) + 1, dtype=np.int64)  # last: ignored pixels
    images_with = np.zeros(len(classes), dtype=np.int64)
    by_kind: dict[str, list[str]] = {}
    labelled = 0

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda s: check_sample(s, fmt, lut), samples)
        for result in tqdm(results, total=len(samples), desc=f"checking {fmt}", unit="sample", disable=not progress,
                           dynamic_ncols=True):
            for kind, text in result.problems:
                by_kind.setdefault(kind, []).append(text)
            if result.label is None:
                continue
            labelled += 1
            present = np.bincount(result.label.ravel(), minlength=256)
            counts[:-1] += present[: len(classes)]
            counts[-1] += int(present[len(classes):].sum())
            images_with += present[: len(classes)] > 0
            if cache is not None:
                path = cache / f"{result.name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(result.label).save(path)
    report.checked = len(samples)

    for kind, (level, text) in _PROBLEM_TEXT.items():
        if kind in by_kind:
            if kind == "size_mismatch" and fmt == "gta5":
                level, text = "warning", ("{n} GTA5 image / label pair(s) have different sizes; when loaded, the label "
                                          "is resized to the image with nearest neighbour")
            report.add(level, text.format(n=len(by_kind[kind]), table=_table_text(fmt, classes)), by_kind[kind])
    if not report.errors and samples:
        _check_loader_accepts(report, split, has_labels=labelled > 0)
    if cache is not None and labelled:
        (cache / "classes.txt").write_text("\n".join(classes) + "\n")
        report.cache_dir = cache
    if labelled:
        report.stats = class_statistics(fmt, report.root, classes, counts, images_with, labelled)
        if stats_path is not None:
            report.stats_path = Path(stats_path)
            report.stats_path.parent.mkdir(parents=True, exist_ok=True)
            report.stats_path.write_text(json.dumps(report.stats, indent=2))
    return report


def _check_loader_accepts(report: PrepareReport, split: str | None, has_labels: bool) -> None:
    """Cross-check with the training code's own dataset reader: it must list the same files without error."""
    from plca.data.datasets import build_dataset
    from plca.data.io import DatasetError

    if split is not None:
        splits = [split]
    elif report.format == "cityscapes":
        splits = [s for s in ("train", "val") if (report.root / "leftImg8bit" / s).is_dir()]
    elif report.format == "folder":
        splits = [p.stem for p in sorted(report.root.glob("*.txt")) if p.name != "classes.txt"]
    else:
        splits = ["all"]
    for name in splits:
        try:
            build_dataset(report.format, str(report.root), name, classes=report.classes, require_labels=has_labels)
        except (DatasetError, ValueError) as error:
            report.add("error", f"the training code's reader refuses split '{name}': {error}")


def class_statistics(fmt: str, root: Path, classes: Sequence[str], counts: np.ndarray, images_with: np.ndarray,
                     images: int) -> dict:
    """Per-class pixel counts, pixel frequency (share of non-ignored pixels) and number of images containing it."""
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


def format_findings(report: PrepareReport) -> str:
    """The report in plain words, one paragraph per finding, ending with the verdict."""
    what = "sample(s)" if report.format == "folder" else "image / label pair(s)"
    lines = [f"{report.format} dataset at {report.root}: checked {report.checked} {what}; "
             f"{len(report.classes)} classes ({', '.join(report.classes)})"]
    for finding in sorted(report.findings, key=lambda f: f.level != "error"):
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
