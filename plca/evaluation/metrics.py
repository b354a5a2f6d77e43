"""Confusion matrix, per-class IoU and the evaluation protocols (mIoU19 / mIoU16 / mIoU13).

Conventions
-----------
- Rows of the confusion matrix are ground truth, columns predictions; pixels whose
  label is the ignore index (255) are not counted, whatever their prediction.
- IoU of class ``c`` = TP / (TP + FP + FN) over the counted pixels, as the official
  Cityscapes evaluator computes it (``cityscapesscripts``; checked in the tests).
- A class with neither ground-truth nor predicted pixels has an undefined IoU (NaN).
  It is left out of the protocol means (as ``cityscapesscripts`` does), listed under
  ``"undefined"`` in the protocol's results, written as ``null`` in JSON and marked in
  the printed tables. On Cityscapes val every class occurs, so this only matters for
  small or custom evaluation sets.
- Protocols: a 19-class model reports ``mIoU19``; a model with the 16 SYNTHIA classes
  reports ``mIoU16`` (main) and ``mIoU13`` (without wall, fence, pole); any other class
  list reports ``mIoU{K}`` over all its ``K`` classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from plca.data.labels import CITYSCAPES_CLASSES, IGNORE_INDEX, SYNTHIA13_CLASSES, SYNTHIA16_CLASSES


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(K, K)`` int64 counts of (ground truth, prediction) pairs, on the inputs' device.

    pred and label: integer class indices of the same shape ``(...)``, e.g. ``(B, H, W)``.
    Pixels labelled ``ignore_index`` are skipped; any other label outside ``[0, K)``, or a
    prediction outside ``[0, K)`` on a counted pixel, raises ``ValueError``.
    """
    if num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
    if pred.shape != label.shape:
        raise ValueError(f"confusion_matrix: prediction shape {tuple(pred.shape)} differs from "
                         f"label shape {tuple(label.shape)}")
    if pred.is_floating_point() or label.is_floating_point():
        raise ValueError("confusion_matrix: pred and label must hold integer class indices "
                         f"(got {pred.dtype} and {label.dtype}); take the argmax of the scores first")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long().to(label.device)
    valid = label != ignore_index
    label, pred = label[valid], pred[valid]
    bad_label = (label < 0) | (label >= num_classes)
    if bool(bad_label.any()):
        bad = torch.unique(label[bad_label])[:10].tolist()
        raise ValueError(f"confusion_matrix: label values {bad} are outside [0, {num_classes}) "
                         f"and are not the ignore index {ignore_index}")
    bad_pred = (pred < 0) | (pred >= num_classes)
    if bool(bad_pred.any()):
        bad = torch.unique(pred[bad_pred])[:10].tolist()
        raise ValueError(f"confusion_matrix: predicted values {bad} are outside [0, {num_classes})")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` int64 confusion matrix (rows: ground truth) over batches.

    Under DDP each process updates its own matrix on its shard of the data, then
    :meth:`reduce_` sums the matrices of all processes.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu",
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add the pixels of ``pred`` and ``label`` (integer indices, same shape ``(...)``)."""
        device = self.matrix.device
        self.matrix += confusion_matrix(pred.to(device), label.to(device), self.num_classes, self.ignore_index)

    def reduce_(self) -> ConfusionMatrix:
        """Sum the matrices of all processes in place (a no-op unless torch.distributed is initialised).

        Every process must call it (it is a collective); with the NCCL backend the
        matrix must be on the process's GPU.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def reset(self) -> None:
        self.matrix.zero_()


def iou_per_class(matrix: Tensor) -> Tensor:
    """``(K,)`` float64 IoU = TP / (TP + FP + FN) of a ``(K, K)`` matrix; NaN where the union is empty."""
    matrix = matrix.double()
    true_positive = matrix.diag()
    union = matrix.sum(dim=0) + matrix.sum(dim=1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(true_positive, math.nan))


def pixel_accuracy(matrix: Tensor) -> float:
    """Fraction of counted pixels predicted correctly (0-1); NaN for an empty matrix."""
    total = int(matrix.sum().item())
    return int(matrix.diag().sum().item()) / total if total else math.nan


@dataclass(frozen=True)
class Protocol:
    """A named mean IoU over a subset of the model's classes."""

    name: str
    classes: tuple[str, ...]


def protocols_for(classes: Sequence[str]) -> list[Protocol]:
    """The protocols reported for a model with these classes (in this order); the first is the main one."""
    classes = tuple(classes)
    if classes == CITYSCAPES_CLASSES:
        return [Protocol("mIoU19", CITYSCAPES_CLASSES)]
    if classes == SYNTHIA16_CLASSES:
        return [Protocol("mIoU16", SYNTHIA16_CLASSES), Protocol("mIoU13", SYNTHIA13_CLASSES)]
    return [Protocol(f"mIoU{len(classes)}", classes)]


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * value


def summarize(matrix: Tensor, classes: Sequence[str]) -> dict:
    """JSON-ready metrics of a ``(K, K)`` confusion matrix for a model with ``classes`` (K names).

    Returns ``{"mIoU", "protocol", "per_class_IoU", "pixel_accuracy", "protocols"}``: the main
    protocol's mean and name, IoU per class name (0-100, ``None`` when undefined), pixel
    accuracy (0-100) and, per protocol name, ``{"mIoU", "classes", "undefined"}``. A mean over
    no defined class, and the pixel accuracy of an empty matrix, are reported as 0.0.
    """
    classes = list(classes)
    if tuple(matrix.shape) != (len(classes), len(classes)):
        raise ValueError(f"summarize: confusion matrix of shape {tuple(matrix.shape)} does not match "
                         f"the {len(classes)} classes {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"summarize: class names must be unique, got {classes}")
    matrix = matrix.cpu()
    per_class = {name: _percent(float(iou)) for name, iou in zip(classes, iou_per_class(matrix).tolist())}
    protocols = {}
    for protocol in protocols_for(classes):
        defined = [per_class[name] for name in protocol.classes if per_class[name] is not None]
        protocols[protocol.name] = {
            "mIoU": sum(defined) / len(defined) if defined else 0.0,
            "classes": list(protocol.classes),
            "undefined": [name for name in protocol.classes if per_class[name] is None],
        }
    main = protocols_for(classes)[0].name
    accuracy = _percent(pixel_accuracy(matrix))
    return {
        "mIoU": protocols[main]["mIoU"],
        "protocol": main,
        "per_class_IoU": per_class,
        "pixel_accuracy": 0.0 if accuracy is None else accuracy,
        "protocols": protocols,
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _protocol_names(results: dict[str, dict]) -> list[str]:
    return list(dict.fromkeys(name for result in results.values() for name in result.get("protocols", {})))


def _protocol_cell(result: dict, protocol: str) -> tuple[str, bool]:
    """The protocol's mean as text, and whether it left out undefined classes (marked ``*``)."""
    entry = result.get("protocols", {}).get(protocol)
    if entry is None:
        return "-", False
    partial = bool(entry.get("undefined"))
    return _cell(entry.get("mIoU")) + ("*" if partial else ""), partial


def format_table(results: dict[str, dict], classes: Sequence[str]) -> str:
    """Plain-text table for a terminal: one column per run (``{label: summarize() dict}``).

    Rows: the IoU (%) of each class (``-`` when undefined), then each protocol's mean
    (``*``: undefined classes were left out of that mean, named in a footnote).
    """
    labels = list(results)
    protocols = _protocol_names(results)
    protocol_cells = {protocol: [_protocol_cell(results[label], protocol) for label in labels]
                      for protocol in protocols}
    # With any starred mean, every cell gets a one-character marker slot so the decimals stay aligned.
    starred = any(partial for cells in protocol_cells.values() for _, partial in cells)
    name_width = max([len(name) for name in [*classes, *protocols]] + [5])
    widths = [max(len(label), 6 + starred) for label in labels]

    def row(name: str, cells: list[str], marker_slot: bool = True) -> str:
        padded = [cell if cell.endswith("*") or not (starred and marker_slot) else cell + " " for cell in cells]
        return "  ".join([f"{name:<{name_width}}"] + [f"{cell:>{width}}" for cell, width in zip(padded, widths)])

    header = row("class", labels, marker_slot=False)
    lines = [header, "-" * len(header)]
    for name in classes:
        lines.append(row(name, [_cell(results[label].get("per_class_IoU", {}).get(name)) for label in labels]))
    lines.append("-" * len(header))
    for protocol, cells in protocol_cells.items():
        lines.append(row(protocol, [text for text, _ in cells]))
    for label in labels:
        left_out: dict[tuple[str, ...], list[str]] = {}
        for protocol in protocols:
            undefined = results[label].get("protocols", {}).get(protocol, {}).get("undefined")
            if undefined:
                left_out.setdefault(tuple(undefined), []).append(protocol)
        for undefined, names in left_out.items():
            lines.append(f"* {label}: {', '.join(undefined)} left out of {', '.join(names)} "
                         "(no ground-truth and no predicted pixel)")
    return "\n".join(lines)


def format_markdown_table(results: dict[str, dict], classes: Sequence[str]) -> str:
    """Paper-style Markdown table: one row per run, one column per class (IoU %), then the protocol means.

    ``-`` marks an undefined IoU; ``*`` a protocol mean that left out undefined classes.
    """
    protocols = _protocol_names(results)
    header = ["run", *classes, *protocols]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, result in results.items():
        cells = [_cell(result.get("per_class_IoU", {}).get(name)) for name in classes]
        cells += [_protocol_cell(result, protocol)[0] for protocol in protocols]
        lines.append("| " + " | ".join([label.replace("|", "\\|"), *cells]) + " |")
    return "\n".join(lines)
