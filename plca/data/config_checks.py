"""Checks of the config's ``data`` section that types alone cannot express (:func:`plca.config.validate`
calls :func:`validate_data_config`), and the choice lists of its keys."""

from __future__ import annotations

from typing import Any

from plca.data.formats import check_split, format_names

#: ``data.on_error``: what a sample that fails to load does
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")


def known_formats() -> tuple[str, ...]:
    """The ``data.<dataset>.format`` values datasets can be read in."""
    return tuple(format_names())


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_data_config(data: Any) -> None:
    """Raise ``ValueError`` naming the key when ``data`` (a :class:`plca.config.DataConfig`; not imported:
    the config sits layers above) cannot describe datasets to train on."""
    _check(len(data.classes) > 0, "data.classes must list the class names, in class-index order")
    _check(all(isinstance(c, str) and c.strip() for c in data.classes), "data.classes has an empty name")
    _check(len(set(data.classes)) == len(data.classes), "data.classes has duplicate names")
    _check(len(data.classes) < 255, "data.classes: at most 254 classes (255 is the ignore label)")
    formats = known_formats()
    for name in ("source", "target", "val"):
        spec = getattr(data, name)
        if spec is None:
            continue
        _check(spec.format in formats,
               f"data.{name}.format '{spec.format}' is unknown; choose one of {', '.join(formats)}")
        _check(bool(spec.root), f"data.{name}.root is empty: give the dataset's folder")
        problem = check_split(spec.format, spec.split)
        _check(problem is None, f"data.{name}.split '{spec.split}': {problem}")
    _check(data.on_error in ON_ERROR_CHOICES,
           f"data.on_error must be {' or '.join(repr(choice) for choice in ON_ERROR_CHOICES)}")
    _check(data.num_workers >= 0, "data.num_workers must be >= 0")
    rcs = data.rare_class_sampling
    _check(rcs.temperature > 0 and rcs.retries >= 0, "data.rare_class_sampling: temperature must be > 0, retries >= 0")
    _check_rare_class_thresholds(rcs)


def _check_rare_class_thresholds(rcs: Any) -> None:
    """Each of RCS's two thresholds is given once: absolute (DAFormer's pixels) or relative (a share)."""
    key = "data.rare_class_sampling."
    for absolute, relative, what in (("min_pixels", "min_pixels_ratio", "the image threshold"),
                                     ("min_crop_ratio", "min_crop_pixels_ratio", "the crop threshold")):
        given = [name for name in (absolute, relative) if getattr(rcs, name) is not None]
        _check(len(given) < 2, f"{key}{absolute} and {key}{relative} are both set: two ways to give {what}; "
                               f"set one of them null")
        _check(len(given) > 0, f"{key}{absolute} and {key}{relative} are both null: give {what} with one of them")
    _check(rcs.min_pixels is None or rcs.min_pixels >= 0, f"{key}min_pixels must be >= 0")
    _check(rcs.min_pixels_ratio is None or 0 <= rcs.min_pixels_ratio < 1,
           f"{key}min_pixels_ratio must be in [0, 1) (a share of each image's pixels)")
    _check(rcs.min_crop_pixels_ratio is None or 0 <= rcs.min_crop_pixels_ratio < 1,
           f"{key}min_crop_pixels_ratio must be in [0, 1) (a share of the crop's pixels; 0 = no re-draws)")
    _check(rcs.min_crop_ratio is None or rcs.min_pixels is not None,
           f"{key}min_crop_ratio multiplies {key}min_pixels, which is null (min_pixels_ratio is set): give the crop "
           f"threshold as {key}min_crop_pixels_ratio (DAFormer on GTA5: 0.005723) and set min_crop_ratio null")
