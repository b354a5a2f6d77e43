"""Confusion matrix, per-class IoU and the evaluation protocols (mIoU19 / mIoU16 / mIoU13).

Conventions: rows of the confusion matrix are ground truth, columns predictions.
A class with neither ground-truth nor predicted pixels has an undefined IoU (NaN):
it is left out of the protocol means and written as ``null`` in JSON.
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
    """``(K, K)`` int64 counts of (ground truth, prediction) pairs over pixels whose label is not ignored."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long()
    valid = label != ignore_index
    label, pred = label[valid], pred[valid]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        bad = torch.unique(label[(label < 0) | (label >= num_classes)])[:10].tolist()
        raise ValueError(f"label values {bad} are outside [0, {num_classes}) and are not the ignore index")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes})")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` confusion matrix over batches (on ``device``)."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, label: Tensor) -> None:
        self.matrix += confusion_matrix(pred.to(self.matrix.device), label.to(self.matrix.device), self.num_classes)

    def reduce_(self) -> "ConfusionMatrix":
        """Sum the matrices of all processes (no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix)
        return self

    def reset(self) -> None:
        self.matrix.zero_()


def iou_per_class(matrix: Tensor) -> Tensor:
    """``(K,)`` float64 IoU = TP / (TP + FP + FN); NaN where the union is empty."""
    matrix = matrix.double()
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def pixel_accuracy(matrix: Tensor) -> float:
    total = matrix.sum().item()
    return float(matrix.diag().sum().item() / total) if total else math.nan


@dataclass(frozen=True)
class Protocol:
    """A named mean over a subset of the model's classes."""

    name: str
    classes: tuple[str, ...]


def protocols_for(classes: Sequence[str]) -> list[Protocol]:
    """The protocols reported for a model with these classes; the first is the main one."""
    classes = tuple(classes)
    if classes == CITYSCAPES_CLASSES:
        return [Protocol("mIoU19", CITYSCAPES_CLASSES)]
    if classes == SYNTHIA16_CLASSES:
        return [Protocol("mIoU16", SYNTHIA16_CLASSES), Protocol("mIoU13", SYNTHIA13_CLASSES)]
    return [Protocol(f"mIoU{len(classes)}", classes)]


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * value


def summarize(matrix: Tensor, classes: Sequence[str]) -> dict:
    """JSON-ready metrics: main protocol's ``mIoU`` (0-100), ``per_class_IoU``, ``pixel_accuracy``, every protocol."""
    classes = list(classes)
    if matrix.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {tuple(matrix.shape)} does not match {len(classes)} classes")
    ious = iou_per_class(matrix.cpu())
    per_class = {name: _percent(float(iou)) for name, iou in zip(classes, ious)}
    protocols = {}
    for protocol in protocols_for(classes):
        values = [per_class[name] for name in protocol.classes if per_class[name] is not None]
        protocols[protocol.name] = {
            "mIoU": sum(values) / len(values) if values else 0.0,
            "classes": list(protocol.classes),
            "undefined": [name for name in protocol.classes if per_class[name] is None],
        }
    main = protocols_for(classes)[0].name
    return {
        "mIoU": protocols[main]["mIoU"],
        "protocol": main,
        "per_class_IoU": per_class,
        "pixel_accuracy": _percent(pixel_accuracy(matrix.cpu())) or 0.0,
        "protocols": protocols,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(results: dict[str, dict], classes: Sequence[str]) -> str:
    """Plain-text table: one row per class, then one per protocol; one column per run."""
    labels = list(results)
    name_width = max([len(c) for c in classes] + [len(p) for r in results.values() for p in r["protocols"]] + [5])
    widths = [max(len(label), 6) for label in labels]
    lines = ["  ".join([f"{'class':<{name_width}}"] + [f"{label:>{w}}" for label, w in zip(labels, widths)])]
    lines.append("-" * len(lines[0]))
    for name in classes:
        cells = [f"{_fmt(results[label]['per_class_IoU'].get(name)):>{w}}" for label, w in zip(labels, widths)]
        lines.append("  ".join([f"{name:<{name_width}}"] + cells))
    lines.append("-" * len(lines[0]))
    protocol_names = list(dict.fromkeys(p for r in results.values() for p in r["protocols"]))
    for protocol in protocol_names:
        cells = [f"{_fmt(results[label]['protocols'].get(protocol, {}).get('mIoU')):>{w}}"
                 for label, w in zip(labels, widths)]
        lines.append("  ".join([f"{protocol:<{name_width}}"] + cells))
    return "\n".join(lines)


def format_markdown_table(results: dict[str, dict], classes: Sequence[str]) -> str:
    """Paper-style Markdown table: one row per run, one column per class, then the protocol means."""
    protocol_names = list(dict.fromkeys(p for r in results.values() for p in r["protocols"]))
    header = ["run", *classes, *protocol_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, result in results.items():
        cells = [_fmt(result["per_class_IoU"].get(name)) for name in classes]
        cells += [_fmt(result["protocols"].get(p, {}).get("mIoU")) for p in protocol_names]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)
