"""``plca report``: compare runs in plots and a Markdown table; image grids for TensorBoard.

From each run directory (see :mod:`plca.engine.trainer`) it reads
``scalars.jsonl``, ``eval_history.jsonl``, ``metrics.json`` and ``config.yaml``
and writes, into the output folder::

    training_curves.png   losses, learning rate, association diagnostics, validation mIoU
    per_class_iou.png     grouped bars of each run's final per-class IoU
    report.md             the runs, their per-class table, the plots, and how their configs differ
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from plca.data.labels import palette


class ReportError(ValueError):
    """A run directory is missing or holds nothing to report; the message names it."""


@dataclass
class RunRecord:
    """What a run directory holds (any part may be missing while a run is in progress)."""

    name: str
    path: Path
    scalars: list[dict] = field(default_factory=list)  # scalars.jsonl, one dict per log step
    evals: list[dict] = field(default_factory=list)  # eval_history.jsonl
    metrics: dict | None = None  # metrics.json
    config: dict | None = None  # config.yaml as plain data
    notes: list[str] = field(default_factory=list)  # lines that could not be read

    @property
    def final_metrics(self) -> dict | None:
        """metrics.json, or the last validation when the run has not finished."""
        return self.metrics if self.metrics is not None else (self.evals[-1] if self.evals else None)

    @property
    def classes(self) -> list[str]:
        final = self.final_metrics
        if final and isinstance(final.get("per_class_IoU"), dict):
            return list(final["per_class_IoU"])
        return list((self.config or {}).get("data", {}).get("classes", []))


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    records = []
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"{path.name} line {number} is not valid JSON (a run still writing?); skipped")
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def load_run(run_dir: str | Path, name: str | None = None) -> RunRecord:
    """Read a run directory; raise :class:`ReportError` when it is missing or holds no logs."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory '{path}' does not exist")
    record = RunRecord(name=name or path.name, path=path)
    record.scalars = _read_jsonl(path / "scalars.jsonl", record.notes)
    record.evals = _read_jsonl(path / "eval_history.jsonl", record.notes)
    metrics_path = path / "metrics.json"
    if metrics_path.is_file():
        try:
            record.metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as error:
            record.notes.append(f"metrics.json is not valid JSON ({error}); ignored")
    config_path = path / "config.yaml"
    if config_path.is_file():
        try:
            record.config = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError:
            record.notes.append("config.yaml is not valid YAML; ignored")
    if not (record.scalars or record.evals or record.metrics):
        raise ReportError(f"'{path}' holds no scalars.jsonl, eval_history.jsonl or metrics.json: "
                          f"is it a plca run directory?")
    return record


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [path.name for path in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{path.parent.name}/{path.name}" if names.count(path.name) > 1 else path.name for path in paths]


# --------------------------------------------------------------------------- training curves

# (title, y label, [(scalars key, legend label)]); a panel is drawn when some run logged one of its keys
_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Total loss", "loss", [("loss/total", "total")]),
    ("Source segmentation loss", "loss", [("loss/source_ce", "cross-entropy"), ("loss/source_lovasz", "Lovasz")]),
    ("LSR regulariser", "loss", [("loss/lsr", "LSR")]),
    ("Association loss", "loss", [("loss/assoc_feature", "feature"), ("loss/assoc_classifier", "classifier")]),
    ("Learning rate", "learning rate", [("lr", "lr")]),
    ("Positive cycles (share of source pixels)", "ratio",
     [("assoc/feature_positive_ratio", "feature"), ("assoc/classifier_positive_ratio", "classifier")]),
    ("Target pixels reached (cover ratio)", "ratio",
     [("assoc/feature_cover_ratio", "feature"), ("assoc/classifier_cover_ratio", "classifier")]),
    ("Associated target pixel label accuracy", "accuracy",
     [("assoc/feature_target_acc", "feature"), ("assoc/classifier_target_acc", "classifier")]),
]
_LINESTYLES = ("-", "--", ":", "-.")


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider)."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** count))
    return smoothed


def _panels_for(runs: Sequence[RunRecord]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    known = {key for _, _, keys in _PANELS for key, _ in keys} | {"step", "skipped_steps"}
    extra = sorted({key for run in runs for record in run.scalars for key in record
                    if key.startswith("loss/") and key not in known})
    panels = list(_PANELS)
    if extra:
        panels.append(("Other losses", "loss", [(key, key.split("/", 1)[1]) for key in extra]))
    if any(value > 0 for run in runs for value in _series(run.scalars, "skipped_steps")[1]):
        panels.append(("Skipped updates (non-finite loss, cumulative)", "updates", [("skipped_steps", "skipped")]))
    return [panel for panel in panels
            if any(_series(run.scalars, key)[0] for run in runs for key, _ in panel[2])]


def plot_training_curves(runs: Sequence[RunRecord], path: str | Path) -> Path:
    """One figure of subplots (losses, LR, association diagnostics, validation mIoU), runs by colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels_for(runs)
    has_val = any(run.evals or run.metrics for run in runs)
    count = len(panels) + int(has_val)
    if count == 0:
        raise ReportError("the runs logged no scalars and no validation: nothing to plot")
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    axes = axes.ravel()
    colors = plt.get_cmap("tab10")
    for ax, (title, ylabel, keys) in zip(axes, panels):
        for index, run in enumerate(runs):
            for style, (key, label) in zip(_LINESTYLES * 4, keys):
                steps, values = _series(run.scalars, key)
                if not steps:
                    continue
                color = colors(index % 10)
                if ylabel == "loss" and len(values) > 50:  # noisy: faint raw curve under a smoothed one
                    ax.plot(steps, values, style, color=color, linewidth=0.8, alpha=0.25)
                    values = smooth(values)
                ax.plot(steps, values, style, color=color, linewidth=1.4,
                        label=run.name if len(keys) == 1 else f"{run.name}: {label}")
        ax.set(title=title, xlabel="update step", ylabel=ylabel)
        if ylabel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if has_val:
        ax = axes[len(panels)]
        protocols = set()
        for index, run in enumerate(runs):
            history = run.evals or ([run.metrics] if run.metrics else [])
            points = [(e["step"], e["mIoU"]) for e in history if "step" in e and "mIoU" in e]
            protocols |= {e.get("protocol") for e in history if e.get("protocol")}
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, "o-", color=colors(index % 10), linewidth=1.4, markersize=4, label=run.name)
        label = "/".join(sorted(protocols)) if protocols else "mIoU"
        ax.set(title=f"Validation {label}", xlabel="update step", ylabel=f"{label} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.suptitle("Training curves (losses smoothed, raw values faint)"
                 if any(len(run.scalars) > 50 for run in runs) else "Training curves", fontsize=13)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- per-class IoU


def union_classes(runs: Sequence[RunRecord]) -> list[str]:
    """Class names of all runs, in the order of first appearance."""
    classes: list[str] = []
    for run in runs:
        classes += [name for name in run.classes if name not in classes]
    return classes


def plot_per_class_iou(runs: Sequence[RunRecord], path: str | Path) -> Path:
    """Grouped bars: per-class IoU (%) of each run's final metrics, class names on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [run for run in runs if run.final_metrics and run.final_metrics.get("per_class_IoU")]
    if not scored:
        raise ReportError("no run has metrics with per-class IoU (metrics.json or eval_history.jsonl)")
    classes = union_classes(scored)
    width = 0.8 / len(scored)
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.45 * len(classes) * max(1.0, 0.6 * len(scored))) + 1.5, 4.8))
    colors = plt.get_cmap("tab10")
    for index, run in enumerate(scored):
        metrics = run.final_metrics
        values = [metrics["per_class_IoU"].get(name) for name in classes]
        heights = [math.nan if value is None else float(value) for value in values]
        label = f"{run.name} ({metrics.get('protocol', 'mIoU')} {metrics['mIoU']:.1f})" if "mIoU" in metrics else run.name
        ax.bar(x - 0.4 + width * (index + 0.5), heights, width, color=colors(index % 10), label=label)
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set(ylabel="IoU (%)", title="Per-class IoU on the validation set", xlim=(-0.6, len(classes) - 0.4))
    ax.set_ylim(0, max(100.0, ax.get_ylim()[1]))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars may reach 100
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report.md


def _flatten(data, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        flat: dict[str, object] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: data}


def config_differences(runs: Sequence[RunRecord], skip: Sequence[str] = ("run_name", "output_dir")) -> dict:
    """``{dotted key: [value per run]}`` for config keys whose values differ between runs."""
    flats = [_flatten(run.config or {}) for run in runs]
    keys = sorted({key for flat in flats for key in flat})
    return {key: [flat.get(key, "-") for flat in flats] for key in keys
            if key not in skip and len({json.dumps(flat.get(key, "-"), default=str) for flat in flats}) > 1}


def _cell(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
    return text.replace("|", "\\|")


def build_markdown(runs: Sequence[RunRecord], curves: str | None, bars: str | None) -> str:
    """The text of report.md (image paths relative to it)."""
    from plca.evaluation.metrics import format_markdown_table

    lines = ["# plca report", "", "| run | method | steps | protocol | mIoU | directory |",
             "| --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        final = run.final_metrics or {}
        steps = final.get("step", run.scalars[-1]["step"] if run.scalars and "step" in run.scalars[-1] else "-")
        miou = f"{final['mIoU']:.2f}" if isinstance(final.get("mIoU"), (int, float)) else "-"
        method = final.get("method") or (run.config or {}).get("method", "-")
        status = "" if run.metrics is not None else " (not finished: last validation)" if run.evals else ""
        lines.append(f"| {_cell(run.name)}{status} | {method} | {steps} | {final.get('protocol', '-')} | {miou} "
                     f"| `{run.path}` |")
    scored = {run.name: run.final_metrics for run in runs if run.final_metrics and run.final_metrics.get("per_class_IoU")}
    lines += ["", "## Per-class IoU (%)", ""]
    if scored:
        lines += [format_markdown_table(scored, union_classes([r for r in runs if r.name in scored])), ""]
        protocols = {name: metrics.get("protocols", {}) for name, metrics in scored.items()}
        if any(protocols.values()):
            lines += ["Every protocol's mean (each over its own classes):", ""]
            for name, table in protocols.items():
                parts = [f"{proto} {values['mIoU']:.2f}" for proto, values in table.items()
                         if isinstance(values, dict) and isinstance(values.get("mIoU"), (int, float))]
                lines.append(f"- {name}: {', '.join(parts) if parts else '-'}")
            lines.append("")
    else:
        lines += ["No run has validation metrics yet.", ""]
    if curves:
        lines += ["## Training curves", "", f"![training curves]({curves})", ""]
    if bars:
        lines += ["## Per-class IoU chart", "", f"![per-class IoU]({bars})", ""]
    if len(runs) > 1:
        differences = config_differences(runs)
        lines += ["## How the configs differ", ""]
        if differences:
            lines += ["| key | " + " | ".join(_cell(run.name) for run in runs) + " |",
                      "| --- |" + " --- |" * len(runs)]
            lines += [f"| `{key}` | " + " | ".join(_cell(value) for value in values) + " |"
                      for key, values in differences.items()]
        else:
            lines.append("The configs are the same (apart from run name and output folder).")
        lines.append("")
    notes = [f"- {run.name}: {note}" for run in runs for note in run.notes]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def write_report(run_dirs: Sequence[str | Path], output: str | Path, names: Sequence[str] | None = None) -> Path:
    """Write training_curves.png, per_class_iou.png and report.md for ``run_dirs`` into ``output``."""
    paths = [Path(run_dir) for run_dir in run_dirs]
    if names is not None and len(names) != len(paths):
        raise ReportError(f"--names gives {len(names)} names for {len(paths)} run directories")
    names = list(names) if names is not None else _unique_names(paths)
    runs = [load_run(path, name) for path, name in zip(paths, names)]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    curves = bars = None
    if _panels_for(runs) or any(run.evals or run.metrics for run in runs):
        curves = plot_training_curves(runs, output / "training_curves.png").name
    if any(run.final_metrics and run.final_metrics.get("per_class_IoU") for run in runs):
        bars = plot_per_class_iou(runs, output / "per_class_iou.png").name
    report = output / "report.md"
    report.write_text(build_markdown(runs, curves, bars))
    return report


# --------------------------------------------------------------------------- TensorBoard images


def make_image_grid(images, predictions, labels, classes: Sequence[str], max_images: int = 4) -> np.ndarray:
    """An ``(R*H, C*W, 3) uint8`` grid: one row per image, columns input | prediction | label (if given).

    ``images``: ``(B, 3, H, W)`` RGB, 0-255 (uint8 or float); ``predictions`` / ``labels``:
    ``(B, h, w)`` class indices (255 = ignore, drawn black), resized to ``(H, W)`` with nearest
    neighbour when their size differs (e.g. predictions at the model's output stride).
    """
    import torch
    import torch.nn.functional as F

    def as_tensor(value):
        return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))

    images = as_tensor(images)[:max_images].float()
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    colors = torch.from_numpy(palette(classes))

    def colorize(maps) -> torch.Tensor:
        maps = as_tensor(maps)[: images.shape[0]]
        if maps.dim() != 3:
            raise ValueError(f"predictions / labels must be (B, H, W), got {tuple(maps.shape)}")
        if maps.shape[-2:] != (height, width):
            maps = F.interpolate(maps[:, None].float(), size=(height, width), mode="nearest")[:, 0]
        return colors[maps.long().clamp(0, 255)]  # (B, H, W, 3)

    columns = [images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1), colorize(predictions)]
    if labels is not None:
        columns.append(colorize(labels))
    rows = torch.cat(columns, dim=2)  # (B, H, C*W, 3)
    return rows.reshape(-1, rows.shape[2], 3).numpy()


def log_image_grid(writer, tag: str, images, predictions, labels, classes: Sequence[str], step: int,
                   max_images: int = 4) -> None:
    """Add :func:`make_image_grid` to TensorBoard as one image (``writer``: a SummaryWriter, or None).

    Also accepts :class:`plca.engine.logger.TensorBoard` (its ``writer`` attribute; None off the main process).
    """
    from plca.engine.logger import TensorBoard

    if isinstance(writer, TensorBoard):
        writer = writer.writer
    if writer is None:
        return
    grid = make_image_grid(images, predictions, labels, classes, max_images)
    writer.add_image(tag, grid, step, dataformats="HWC")
