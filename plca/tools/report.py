"""``plca report``: compare runs, or sweeps, in plots, Markdown and one HTML page.

From each run directory (see :mod:`plca.engine.trainer`) it reads ``scalars.jsonl``,
``eval_history.jsonl``, ``metrics.json``, ``config.yaml`` and ``run.json``, and writes, into
the output folder::

    training_curves.png   losses, learning rate, association diagnostics, validation mIoU
    per_class_iou.png     grouped bars of each run's final per-class IoU (runs, not sweeps)
    report.md             the runs, their per-class table, the plots, and how their configs and
                          environments differ
    report.html           the same as one page (inline CSS, no script, images linked relatively)
    gallery/              with ``--gallery N``: each run's final model on its data.val, the N
                          images with the lowest and highest per-image mIoU (see plca.tools.gallery)

Given sweep directories (see :mod:`plca.tools.sweep`) it also writes their aggregated
``results.md`` / ``results.csv`` / ``results.png`` (mean +- sd over seeds) and draws the curves
of all their runs, one colour per configuration.

Legends use short names: what differs between the runs' configs (``lr=0.01 s0``), or
numbers listed with the full names in report.md when that is still long.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from plca.engine.run_record import read_run_record
from plca.files import atomic_write_text, flatten
from plca.tools.sweep_table import (DEFAULT_FLAG_RANGE, MANIFEST, aggregate, combine, read_manifest, results_markdown,
                                    short_keys, write_results)

_SHORT_NAME = 24  # folder names up to this long are legends as they are
_LONG_LABEL = 36  # derived labels longer than this are replaced by numbers


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
    run_info: dict | None = None  # run.json (environment, command, times)
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
    record.run_info = read_run_record(path)
    if (path / "run.json").is_file() and record.run_info is None:
        record.notes.append("run.json is not valid JSON; ignored")
    if not (record.scalars or record.evals or record.metrics):
        raise ReportError(f"'{path}' holds no scalars.jsonl, eval_history.jsonl or metrics.json: "
                          f"is it a plca run directory?")
    return record


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [path.name for path in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{path.parent.name}/{path.name}" if names.count(path.name) > 1 else path.name for path in paths]


def _value_text(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def short_names(runs: Sequence[RunRecord]) -> list[str] | None:
    """Labels from what differs between the runs' configs (``lr=0.01 s0``); None when that does not
    tell them apart or is long."""
    differences = config_differences(runs)
    keys = [key for key in differences if key != "train.seed"]
    if not differences:
        return None
    short = short_keys(keys)
    labels = []
    for index in range(len(runs)):
        parts = [f"{short[key]}={_value_text(differences[key][index])}" for key in keys]
        if "train.seed" in differences:
            parts.append(f"s{differences['train.seed'][index]}")
        labels.append(" ".join(parts))
    if len(set(labels)) != len(labels) or max(len(label) for label in labels) > _LONG_LABEL:
        return None
    return labels


def display_names(runs: Sequence[RunRecord]) -> list[str]:
    """Legend labels: the folder names when short (or one run), else :func:`short_names`, else ``#1``, ``#2``, ..."""
    names = [run.name for run in runs]
    if len(runs) == 1 or (max(len(name) for name in names) <= _SHORT_NAME and len(set(names)) == len(names)):
        return names
    return short_names(runs) or [f"#{index}" for index in range(1, len(runs) + 1)]


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
_MARKED = 30  # series with at most this many points get a marker on each (a single point stays visible)


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


def _colour_groups(runs: Sequence[RunRecord], groups: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """The colour index of each run and the legend label of each colour (runs of one group share one)."""
    if groups is None:
        return list(range(len(runs))), [run.name for run in runs]
    labels = list(dict.fromkeys(groups))
    return [labels.index(group) for group in groups], labels


def plot_training_curves(runs: Sequence[RunRecord], path: str | Path, groups: Sequence[str] | None = None) -> Path:
    """One figure of subplots (losses, LR, association diagnostics, validation mIoU), runs by colour.

    ``groups``: a label per run; runs with the same label (the seeds of one configuration)
    share a colour and one legend entry. The legend sits below the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels = _panels_for(runs)
    has_val = any(run.evals or run.metrics for run in runs)
    count = len(panels) + int(has_val)
    if count == 0:
        raise ReportError("the runs logged no scalars and no validation: nothing to plot")
    colour_of, legend_labels = _colour_groups(runs, groups)
    cmap = plt.get_cmap("tab10" if len(legend_labels) <= 10 else "tab20")

    def colour(index: int):
        return cmap(colour_of[index] % cmap.N)

    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, (title, ylabel, keys) in zip(axes, panels):
        drawn_keys = []
        for index, run in enumerate(runs):
            for style, (key, label) in zip(_LINESTYLES * 4, keys):
                steps, values = _series(run.scalars, key)
                if not steps:
                    continue
                drawn_keys += [(style, label)] if (style, label) not in drawn_keys else []
                if ylabel == "loss" and len(values) > 50:  # noisy: faint raw curve under a smoothed one
                    ax.plot(steps, values, style, color=colour(index), linewidth=0.8, alpha=0.25)
                    values = smooth(values)
                marker = "o" if len(steps) <= _MARKED else None
                ax.plot(steps, values, style, color=colour(index), linewidth=1.4, marker=marker, markersize=3)
        ax.set(title=title, xlabel="update step", ylabel=ylabel)
        if ylabel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(drawn_keys) > 1:  # line styles tell the terms apart; colours are in the figure legend
            ax.legend([Line2D([], [], color="0.3", linestyle=style) for style, _ in drawn_keys],
                      [label for _, label in drawn_keys], fontsize=8)
    if has_val:
        ax = axes[len(panels)]
        protocols = set()
        for index, run in enumerate(runs):
            history = run.evals or ([run.metrics] if run.metrics else [])
            points = [(e["step"], e["mIoU"]) for e in history if "step" in e and "mIoU" in e]
            protocols |= {e.get("protocol") for e in history if e.get("protocol")}
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, "o-", color=colour(index), linewidth=1.4, markersize=4)
        label = "/".join(sorted(protocols)) if protocols else "mIoU"
        ax.set(title=f"Validation {label}", xlabel="update step", ylabel=f"{label} (%)")
    for ax in axes[:count]:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.suptitle("Training curves (losses smoothed, raw values faint)"
                 if any(len(run.scalars) > 50 for run in runs) else "Training curves", fontsize=13)
    fig.tight_layout()
    handles = [Line2D([], [], color=cmap(index % cmap.N), linewidth=2) for index in range(len(legend_labels))]
    shown = [f"{label} ({groups.count(label)} runs)" if groups is not None and groups.count(label) > 1 else label
             for label in legend_labels]
    fig.legend(handles, shown, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(shown)),
               fontsize=9, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
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
    """Grouped bars: per-class IoU (%) of each run's final metrics, class names on the x axis.

    A zero IoU is labelled "0" and an undefined one "n/a", so a missing bar is never ambiguous;
    the legend sits below the axes.
    """
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
    colors = plt.get_cmap("tab10" if len(scored) <= 10 else "tab20")
    for index, run in enumerate(scored):
        metrics = run.final_metrics
        values = [metrics["per_class_IoU"].get(name) for name in classes]
        heights = [math.nan if value is None else float(value) for value in values]
        label = (f"{run.name} ({metrics.get('protocol', 'mIoU')} {metrics['mIoU']:.1f})" if "mIoU" in metrics
                 else run.name)
        positions = x - 0.4 + width * (index + 0.5)
        bars = ax.bar(positions, heights, width, color=colors(index % colors.N), label=label)
        ax.bar_label(bars, labels=["0" if h == 0 else "" for h in heights], fontsize=7, padding=1)
        for position, height in zip(positions, heights):
            if math.isnan(height):
                ax.text(position, 1, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color="0.4")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set(ylabel="IoU (%)", title="Per-class IoU on the validation set", xlim=(-0.6, len(classes) - 0.4))
    ax.set_ylim(0, max(100.0, ax.get_ylim()[1]))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(scored)), fontsize=8, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report.md


def _differing(flats: Sequence[dict], skip: Sequence[str] = ()) -> dict:
    keys = sorted({key for flat in flats for key in flat})
    return {key: [flat.get(key, "-") for flat in flats] for key in keys
            if key not in skip and len({json.dumps(flat.get(key, "-"), default=str) for flat in flats}) > 1}


def config_differences(runs: Sequence[RunRecord], skip: Sequence[str] = ("run_name", "output_dir")) -> dict:
    """``{dotted key: [value per run]}`` for config keys whose values differ between runs."""
    return _differing([flatten(run.config or {}) for run in runs], skip)


def environment_differences(runs: Sequence[RunRecord]) -> dict:
    """``{key: [value per run]}`` for ``run.json`` environment keys that differ between the runs that
    have a run.json (``-`` for the others)."""
    recorded = [run for run in runs if run.run_info and isinstance(run.run_info.get("environment"), dict)]
    if len(recorded) < 2:
        return {}
    differing = _differing([flatten(run.run_info["environment"]) for run in recorded])
    column = {id(run): index for index, run in enumerate(recorded)}
    return {key: [values[column[id(run)]] if id(run) in column else "-" for run in runs]
            for key, values in differing.items()}


def _cell(value) -> str:
    return _value_text(value).replace("|", "\\|")


def differences_markdown(runs: Sequence[RunRecord], labels: Sequence[str]) -> list[str]:
    """The "Differences" section: config keys (config.yaml) and environment keys (run.json) that differ."""
    config, env = config_differences(runs), environment_differences(runs)
    lines = ["## Differences", ""]
    if not config and not env:
        recorded = sum(1 for run in runs if run.run_info)
        return lines + ["The configs are the same (apart from run name and output folder)"
                        + (", and so are the environments." if recorded > 1 else
                           "; fewer than two runs have a run.json to compare environments."), ""]
    lines += ["| | key | " + " | ".join(_cell(label) for label in labels) + " |",
              "| --- | --- |" + " --- |" * len(runs)]
    lines += [f"| config | `{key}` | " + " | ".join(_cell(v) for v in values) + " |" for key, values in config.items()]
    lines += [f"| environment | `{key}` | " + " | ".join(_cell(v) for v in values) + " |"
              for key, values in env.items()]
    return lines + [""]


def _runs_table(runs: Sequence[RunRecord], labels: Sequence[str]) -> list[str]:
    lines = ["| label | run | method | steps | protocol | mIoU | directory |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run, label in zip(runs, labels):
        final = run.final_metrics or {}
        steps = final.get("step", run.scalars[-1]["step"] if run.scalars and "step" in run.scalars[-1] else "-")
        miou = f"{final['mIoU']:.2f}" if isinstance(final.get("mIoU"), (int, float)) else "-"
        method = final.get("method") or (run.config or {}).get("method", "-")
        status = "" if run.metrics is not None else " (not finished: last validation)" if run.evals else ""
        lines.append(f"| {_cell(label)} | {_cell(run.path.name)}{status} | {method} | {steps} "
                     f"| {final.get('protocol', '-')} | {miou} | `{run.path}` |")
    return lines


def build_markdown(runs: Sequence[RunRecord], curves: str | None, bars: str | None,
                   labels: Sequence[str] | None = None, galleries: Sequence[tuple[str, dict, str]] = ()) -> str:
    """The text of report.md (image paths relative to it); ``labels``: the runs' legend labels;
    ``galleries``: ``(run label, gallery index, folder relative to report.md)`` (see :func:`write_run_gallery`)."""
    from plca.evaluation.metrics import format_markdown_table
    from plca.tools.gallery import gallery_markdown, gallery_title

    labels = list(labels) if labels is not None else [run.name for run in runs]
    lines = ["# plca report", "", *_runs_table(runs, labels)]
    scored = {label: run.final_metrics for run, label in zip(runs, labels)
              if run.final_metrics and run.final_metrics.get("per_class_IoU")}
    lines += ["", "## Per-class IoU (%)", ""]
    if scored:
        scored_runs = [run for run, label in zip(runs, labels) if label in scored]
        lines += [format_markdown_table(scored, union_classes(scored_runs)), ""]
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
    for label, index, folder in galleries:
        title = f"{gallery_title(index['count'])}: {label}" if len(galleries) > 1 else None
        lines += gallery_markdown(index, prefix=f"{folder}/", heading="##", title=title)
    if len(runs) > 1:
        lines += differences_markdown(runs, labels)
    notes = [f"- {label}: {note}" for run, label in zip(runs, labels) for note in run.notes]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- report.html

_HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1500px; padding: 0 1.5em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
.scroll { overflow-x: auto; margin: .6em 0 1em; }
table { border-collapse: collapse; font-size: .88em; }
th, td { border: 1px solid #d0d0d0; padding: .25em .55em; white-space: nowrap; }
th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .92em; background: #f3f3f3;
       padding: 0 .2em; border-radius: 3px; }
figure { margin: .8em 0 1.4em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
figcaption { font-size: .85em; color: #555; }
"""
_NUMBER_CELL = re.compile(r"^(-|n/a|[-+]?\d+(\.\d+)?\*?)( ± ([-+]?\d+(\.\d+)?|n/a))?( ⚠)?$")


def _page_layout(root) -> None:
    """The page's touches on the HTML Python-Markdown builds (an ElementTree ``root``): tables scroll
    sideways in a ``div.scroll``; right-aligned and numeric cells get ``class="num"``; an image alone in
    its paragraph becomes a figure linked to the full-size file, its path URL-quoted."""
    from xml.etree import ElementTree

    for index, child in enumerate(list(root)):
        if child.tag == "table":
            wrapper = ElementTree.Element("div", {"class": "scroll"})
            wrapper.append(child)
            root.remove(child)
            root.insert(index, wrapper)
        elif child.tag == "p" and len(child) == 1 and child[0].tag == "img" and not (child.text or "").strip() \
                and not (child[0].tail or "").strip():
            source = urllib.parse.quote(urllib.parse.unquote(child[0].get("src", "")))
            image = ElementTree.Element("img", {"src": source, "alt": child[0].get("alt", ""), "loading": "lazy"})
            child.clear()
            child.tag = "figure"
            ElementTree.SubElement(child, "a", {"href": source}).append(image)
    for cell in root.iter():
        if cell.tag in ("td", "th"):
            right = "right" in cell.attrib.pop("style", "")
            if right or (cell.tag == "td" and _NUMBER_CELL.match("".join(cell.itertext()).strip())):
                cell.set("class", "num")


def markdown_to_html(text: str, title: str = "plca report") -> str:
    """A standalone HTML page (inline CSS, no script, nothing fetched) of the Markdown the report writes.

    Python-Markdown with pipe tables converts it; raw HTML and entities in the text are not markup
    there (its HTML block, inline HTML and entity rules are removed), so every piece of text comes
    out escaped. :func:`_page_layout` adds the page's own touches (scrolling tables, numeric cells,
    linked figures, URL-quoted image paths).
    """
    import markdown
    from markdown.treeprocessors import Treeprocessor

    class _Layout(Treeprocessor):
        def run(self, root):
            _page_layout(root)

    converter = markdown.Markdown(extensions=["tables"], output_format="html")
    converter.preprocessors.deregister("html_block")
    for rule in ("html", "entity"):
        converter.inlinePatterns.deregister(rule)
    converter.treeprocessors.register(_Layout(converter), "plca_layout", 1)
    body = converter.convert(text)
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>{html.escape(title)}</title>", f"<style>{_HTML_STYLE}</style>", "</head>", "<body>",
                      body, "</body>", "</html>", ""])


def _write_report_files(output: Path, text: str) -> Path:
    """report.md and report.html (the same content) in ``output``; the path of report.md."""
    report = output / "report.md"
    atomic_write_text(report, text)
    first = next((line for line in text.split("\n") if line.startswith("# ")), "# plca report")
    atomic_write_text(output / "report.html", markdown_to_html(text, title=first[2:].replace("`", "")))
    return report


def default_output(paths: Sequence[Path]) -> Path:
    """``DIR/report`` for one directory; ``report/`` in the deepest folder holding several."""
    if len(paths) == 1:
        return paths[0] / "report"
    return Path(os.path.commonpath([str(path.absolute()) for path in paths])) / "report"


def _sweep_runs(sweep_dir: Path, sweep_name: str | None) -> tuple[list[RunRecord], list[str], list[str]]:
    """The loadable runs of a sweep, with run labels (``lr=0.01 s0``) and group labels (``lr=0.01``)."""
    manifest = read_manifest(sweep_dir)
    keys = list(manifest.get("grid") or {})
    short = short_keys(keys)
    runs, labels, groups = [], [], []
    for entry in manifest["runs"]:
        path = sweep_dir / entry.get("run_dir", f"runs/{entry.get('name')}")
        try:
            run = load_run(path, entry.get("name"))
        except ReportError:
            continue
        group = " ".join(f"{short[k]}={entry.get('params', {}).get(k, '-')}" for k in keys) or "base config"
        group = f"{sweep_name} {group}" if sweep_name else group
        runs.append(run)
        groups.append(group)
        labels.append(f"{group} s{entry.get('seed', '?')}")
    return runs, labels, groups


def write_sweep_report(sweep_dirs: Sequence[str | Path], output: str | Path | None = None,
                       flag_range: float = DEFAULT_FLAG_RANGE) -> Path:
    """results.md/.csv/.png (mean +- sd over seeds), training_curves.png and report.md of sweeps."""
    paths = [Path(path) for path in sweep_dirs]
    output = Path(output) if output is not None else default_output(paths)
    tables = [aggregate(path, flag_range) for path in paths]
    names = _unique_names(paths) if len(paths) > 1 else [None]
    table = tables[0] if len(paths) == 1 else combine(tables, names)
    output.mkdir(parents=True, exist_ok=True)
    results = write_results(table, output)
    runs, labels, groups = [], [], []
    for path, name in zip(paths, names):
        found = _sweep_runs(path, name)
        runs += found[0]
        labels += found[1]
        groups += found[2]
    for run, label in zip(runs, labels):
        run.name = label
    curves = None
    if runs and (_panels_for(runs) or any(run.evals or run.metrics for run in runs)):
        curves = plot_training_curves(runs, output / "training_curves.png", groups=groups).name
    body = results_markdown(table).split("\n", 1)[1]  # without its title
    lines = [f"# plca report: {', '.join(f'`{p}`' for p in paths)}", body.rstrip(), ""]
    if "results.png" in results:
        lines += ["## Results chart", "", "![results](results.png)", ""]
    if curves:
        lines += ["## Training curves", "", "One colour per configuration, one line per seed.", "",
                  f"![training curves]({curves})", ""]
    if runs:
        lines += ["## Runs", "", *_runs_table(runs, labels), ""]
        lines += differences_markdown(runs, labels) if len(runs) > 1 else []
    notes = [f"- {label}: {note}" for run, label in zip(runs, labels) for note in run.notes]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    lines += [f"Files: {', '.join(path.name for path in results.values())}"
              + (f", {curves}" if curves else "") + ", report.html.", ""]
    return _write_report_files(output, "\n".join(lines))


def _gallery_folder(name: str, taken: set[str]) -> str:
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"
    base, count = folder, 2
    while folder in taken:
        folder, count = f"{base}_{count}", count + 1
    taken.add(folder)
    return folder


def write_run_gallery(run: RunRecord, folder: Path, count: int, panel_width: int = 512,
                      progress: bool = True) -> dict:
    """Evaluate the run's final model (``checkpoints/final.pt``, else ``last.pt``) on its own ``data.val``
    and write the gallery of its ``count`` lowest and highest images into ``folder``; the gallery index.

    Raises :class:`ReportError` naming the run when it has no model file or no validation set.
    """
    from plca.config import ConfigError
    from plca.data.io import DatasetError
    from plca.engine.checkpoint import CheckpointError
    from plca.engine.distributed import DeviceError
    from plca.tools.evaluate import evaluate_checkpoint
    from plca.models.weights import WeightsError
    from plca.serialization import UnreadableFileError

    try:
        evaluate_checkpoint(run.path, progress=progress, gallery=count, gallery_dir=folder, panel_width=panel_width,
                            allow_unfinished=True)
    except (ConfigError, DatasetError, WeightsError, CheckpointError, DeviceError, UnreadableFileError) as error:
        raise ReportError(f"--gallery: run '{run.path}': {error}") from None
    return json.loads((folder / "index.json").read_text())


def write_report(run_dirs: Sequence[str | Path], output: str | Path | None = None,
                 names: Sequence[str] | None = None, flag_range: float = DEFAULT_FLAG_RANGE, gallery: int = 0,
                 panel_width: int = 512, progress: bool = True) -> Path:
    """Write the report of run directories (or sweep directories) into ``output``; return report.md.

    Runs: training_curves.png, per_class_iou.png, report.md and report.html (the same content as
    a standalone page). With ``gallery=N``, each run's final model is evaluated on its ``data.val``
    and its N lowest and N highest images go to ``gallery/`` (``gallery/<run>/`` for several runs),
    shown in both reports. Sweeps (directories with a manifest.json): see :func:`write_sweep_report`.
    ``output`` defaults to :func:`default_output`.
    """
    if gallery < 0:
        raise ReportError(f"--gallery must be a positive number of images, got {gallery}")
    paths = [Path(run_dir) for run_dir in run_dirs]
    sweeps = [path for path in paths if (path / MANIFEST).is_file()]
    if sweeps:
        if len(sweeps) != len(paths):
            plain = next(path for path in paths if path not in sweeps)
            raise ReportError(f"give sweep directories or run directories, not both: '{sweeps[0]}' is a sweep, "
                              f"'{plain}' is not")
        if names is not None:
            raise ReportError("--names labels runs; a sweep's runs are labelled by their grid values and seed")
        if gallery:
            raise ReportError("--gallery is for run directories: give the sweep's runs/<name> folders")
        return write_sweep_report(sweeps, output, flag_range)
    if names is not None and len(names) != len(paths):
        raise ReportError(f"--names gives {len(names)} names for {len(paths)} run directories")
    runs = [load_run(path, name) for path, name in zip(paths, _unique_names(paths))]
    labels = list(names) if names is not None else display_names(runs)
    full_names = [run.name for run in runs]
    for run, label in zip(runs, labels):
        run.name = label
    output = Path(output) if output is not None else default_output(paths)
    output.mkdir(parents=True, exist_ok=True)
    curves = bars = None
    if _panels_for(runs) or any(run.evals or run.metrics for run in runs):
        curves = plot_training_curves(runs, output / "training_curves.png").name
    if any(run.final_metrics and run.final_metrics.get("per_class_IoU") for run in runs):
        bars = plot_per_class_iou(runs, output / "per_class_iou.png").name
    galleries = []
    if gallery:
        taken: set[str] = set()
        for run, label in zip(runs, labels):
            folder = "gallery" if len(runs) == 1 else f"gallery/{_gallery_folder(run.path.name, taken)}"
            galleries.append((label, write_run_gallery(run, output / folder, gallery, panel_width, progress), folder))
    text = build_markdown(runs, curves, bars, labels, galleries)
    if labels != full_names:
        text = text.replace("# plca report\n", "# plca report\n\nLegends use the labels below; the run column "
                                               "is each run's folder name.\n", 1)
    return _write_report_files(output, text)
