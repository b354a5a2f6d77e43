"""Results of a sweep: one row per configuration, mean +- sample sd over its seeds.

Reads ``SWEEP_DIR/manifest.json`` (written by :mod:`plca.tools.sweep`) and each run's
``metrics.json``; writes ``results.md``, ``results.csv`` and ``results.png``. A run that
failed or has no ``metrics.json`` is listed, never averaged. The standard deviation is the
sample one (``ddof=1``) and "n/a" for a single seed. A class whose IoU spans more than
``threshold`` points across the seeds of a configuration is flagged (a class that collapsed
on one seed).
"""

from __future__ import annotations

import csv
from plca.files import atomic_write_text
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
RESULT_FILES = ("results.md", "results.csv", "results.png")
DEFAULT_FLAG_RANGE = 10.0


class SweepError(ValueError):
    """A sweep directory, its manifest or a sweep request is invalid; the message names it."""


def read_manifest(sweep_dir: str | Path) -> dict:
    """``SWEEP_DIR/manifest.json``; :class:`SweepError` when it is missing or unreadable."""
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        raise SweepError(f"'{sweep_dir}' has no {MANIFEST}: is it a plca sweep directory?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SweepError(f"'{path}' cannot be read as JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
        raise SweepError(f"'{path}' is not a plca sweep manifest (no list of runs)")
    return manifest


@dataclass
class Stat:
    """One quantity over the seeds of a configuration: ``values[i]`` was measured with ``seeds[i]``."""

    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, seed: int, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.seeds.append(seed)
            self.values.append(float(value))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None with fewer than two values."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def spread(self) -> float | None:
        """max - min; None with fewer than two values."""
        return max(self.values) - min(self.values) if len(self.values) > 1 else None


@dataclass
class ConfigRow:
    """One grid combination: the runs averaged and their statistics."""

    params: dict[str, str]
    runs: list[tuple[int, str]] = field(default_factory=list)  # (seed, run name) of the averaged runs
    miou: Stat = field(default_factory=Stat)  # the main protocol's mIoU (metrics.json "mIoU")
    protocols: dict[str, Stat] = field(default_factory=dict)
    classes: dict[str, Stat] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)  # classes whose spread exceeds the threshold

    @property
    def n_seeds(self) -> int:
        return len(self.runs)


@dataclass
class SweepTable:
    """The aggregated results of one sweep (or several, with a ``sweep`` key)."""

    keys: list[str]  # the grid keys, in order
    rows: list[ConfigRow]
    classes: list[str]
    protocols: list[str]
    main_protocol: str | None
    not_averaged: list[tuple[str, str]]  # (run name, why)
    threshold: float
    description: list[str] = field(default_factory=list)  # lines shown above the tables


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_metrics(path: Path) -> dict | None:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if isinstance(metrics, dict) and _is_number(metrics.get("mIoU")) else None


def _why_not_averaged(run: dict, has_file: bool) -> str:
    status = run.get("status", "unknown")
    if status == "failed":
        code = run.get("returncode")
        tail = [line for line in run.get("stderr_tail") or [] if line.strip()]
        return f"failed (exit {code})" + (f": {tail[-1].strip()}" if tail else "")
    return f"metrics.json is not readable ({status})" if has_file else f"no metrics.json ({status})"


def aggregate(sweep_dir: str | Path, threshold: float = DEFAULT_FLAG_RANGE) -> SweepTable:
    """Read the manifest and the runs' metrics of ``sweep_dir``; one :class:`ConfigRow` per grid combination."""
    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    grid = {key: [str(v) for v in values] for key, values in (manifest.get("grid") or {}).items()}
    keys = list(grid)
    rows: dict[tuple, ConfigRow] = {}
    classes: list[str] = []
    protocols: list[str] = []
    main_protocol = None
    not_averaged = []
    for run in manifest["runs"]:
        params = {key: str(run.get("params", {}).get(key, "-")) for key in keys}
        path = sweep_dir / run.get("run_dir", f"runs/{run.get('name')}") / "metrics.json"
        metrics = _read_metrics(path) if run.get("status") != "failed" else None
        if metrics is None:
            not_averaged.append((run.get("name", "?"), _why_not_averaged(run, path.is_file())))
            continue
        seed = int(run.get("seed", 0))
        row = rows.setdefault(tuple(params.values()), ConfigRow(params))
        row.runs.append((seed, run["name"]))
        row.miou.add(seed, metrics["mIoU"])
        main_protocol = main_protocol or metrics.get("protocol")
        for name, values in (metrics.get("protocols") or {}).items():
            if isinstance(values, dict):
                protocols += [name] if name not in protocols else []
                row.protocols.setdefault(name, Stat()).add(seed, values.get("mIoU"))
        for name, value in (metrics.get("per_class_IoU") or {}).items():
            classes += [name] if name not in classes else []
            row.classes.setdefault(name, Stat()).add(seed, value)
    for row in rows.values():
        row.runs.sort()
        row.flagged = [name for name in classes if name in row.classes
                       and (row.classes[name].spread or 0.0) > threshold]

    def order(row: ConfigRow) -> tuple:
        return tuple(grid[key].index(row.params[key]) if row.params[key] in grid[key] else len(grid[key])
                     for key in keys)

    description = [f"Sweep `{sweep_dir}`: config `{manifest.get('config', '?')}`"
                   + (f", overrides `{' '.join(manifest['base_overrides'])}`" if manifest.get("base_overrides") else "")
                   + f"; seeds {', '.join(str(s) for s in manifest.get('seeds', []))}."]
    return SweepTable(keys, sorted(rows.values(), key=order), classes, protocols, main_protocol, not_averaged,
                      threshold, description)


def combine(tables: Sequence[SweepTable], names: Sequence[str]) -> SweepTable:
    """Several sweeps in one table: a first key ``sweep`` holds ``names[i]`` for the rows of ``tables[i]``."""
    keys = ["sweep"] + list(dict.fromkeys(key for table in tables for key in table.keys))
    rows, classes, protocols, missing, description = [], [], [], [], []
    for table, name in zip(tables, names):
        for row in table.rows:
            rows.append(ConfigRow({"sweep": name, **{k: row.params.get(k, "-") for k in keys[1:]}}, row.runs,
                                  row.miou, row.protocols, row.classes, row.flagged))
        classes += [c for c in table.classes if c not in classes]
        protocols += [p for p in table.protocols if p not in protocols]
        missing += [(f"{name}/{run}", why) for run, why in table.not_averaged]
        description += table.description
    main = next((t.main_protocol for t in tables if t.main_protocol), None)
    return SweepTable(keys, rows, classes, protocols, main, missing, tables[0].threshold if tables else 10.0,
                      description)


# --------------------------------------------------------------------------- text


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Dotted keys shortened to their last components, as few as keep them apart: ``train.lr`` -> ``lr``."""
    parts = {key: key.split(".") for key in keys}
    depth = {key: 1 for key in keys}
    while True:
        short = {key: ".".join(parts[key][-depth[key]:]) for key in keys}
        clashes = [key for key in keys if list(short.values()).count(short[key]) > 1
                   and depth[key] < len(parts[key])]
        if not clashes:
            return short
        for key in clashes:
            depth[key] += 1


def row_label(table: SweepTable, row: ConfigRow) -> str:
    """``lr=0.01 method=plca`` (short keys); ``base config`` without grid keys."""
    short = short_keys(table.keys)
    return " ".join(f"{short[key]}={row.params[key]}" for key in table.keys) or "base config"


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def mean_sd(stat: Stat | None, digits: int = 2) -> str:
    """``45.10 ± 1.02``; ``45.10 ± n/a`` for one value; ``-`` for none."""
    if stat is None or stat.n == 0:
        return "-"
    return f"{_num(stat.mean, digits)} ± {_num(stat.std, digits)}"


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|")


def _protocol_columns(table: SweepTable) -> list[str]:
    """Protocols other than the main one (whose mean is the mIoU column)."""
    return [p for p in table.protocols if p != table.main_protocol]


def results_markdown(table: SweepTable) -> str:
    """The text of results.md: mIoU table, per-class table (flags marked), per-seed values, runs left out."""
    main = table.main_protocol or "mIoU"
    others = _protocol_columns(table)
    keys = [_md_cell(key) for key in table.keys]
    lines = ["# Sweep results", "", *table.description, "",
             "Mean ± sample standard deviation over seeds (n/a with one seed); IoU in %.", "",
             f"## {main}" + (" and the other protocols" if others else ""), "",
             "| " + " | ".join(keys + ["n_seeds", main, *others, f"per seed ({main})"]) + " |",
             "| " + " | ".join(["---"] * len(keys) + ["---:"] * (2 + len(others)) + ["---"]) + " |"]
    for row in table.rows:
        per_seed = ", ".join(f"s{seed} {value:.2f}" for seed, value in zip(row.miou.seeds, row.miou.values))
        cells = [_md_cell(row.params[k]) for k in table.keys] + [str(row.n_seeds), mean_sd(row.miou)]
        cells += [mean_sd(row.protocols.get(p)) for p in others] + [per_seed]
        lines.append("| " + " | ".join(cells) + " |")
    if not table.rows:
        lines.append("| " + " | ".join(["-"] * (len(keys) + 3 + len(others))) + " |")
    if table.classes:
        lines += ["", "## Per-class IoU", "",
                  "| " + " | ".join(keys + [_md_cell(c) for c in table.classes]) + " |",
                  "| " + " | ".join(["---"] * len(keys) + ["---:"] * len(table.classes)) + " |"]
        for row in table.rows:
            cells = [_md_cell(row.params[k]) for k in table.keys]
            cells += [mean_sd(row.classes.get(c)) + (" ⚠" if c in row.flagged else "") for c in table.classes]
            lines.append("| " + " | ".join(cells) + " |")
        flagged = [(row, name) for row in table.rows for name in row.flagged]
        lines += ["", f"⚠ marks a class whose IoU spans more than {table.threshold:g} points across seeds"
                      + (":" if flagged else " (none here)."), ""]
        for row, name in flagged:
            stat = row.classes[name]
            values = ", ".join(f"s{seed} {value:.1f}" for seed, value in zip(stat.seeds, stat.values))
            lines.append(f"- {row_label(table, row)}: {name} spans {stat.spread:.1f} points ({values})")
    lines += ["", "## Per-seed values", "",
              "| " + " | ".join(keys + ["seed", "run", main, *others, *[_md_cell(c) for c in table.classes]]) + " |",
              "| " + " | ".join(["---"] * (len(keys) + 2) + ["---:"] * (1 + len(others) + len(table.classes))) + " |"]
    for row in table.rows:
        for seed, name in row.runs:
            def at(stat: Stat | None, seed: int = seed) -> str:
                return _num(stat.values[stat.seeds.index(seed)]) if stat and seed in stat.seeds else "-"

            cells = [_md_cell(row.params[k]) for k in table.keys] + [str(seed), f"`{name}`", at(row.miou)]
            cells += [at(row.protocols.get(p)) for p in others] + [at(row.classes.get(c)) for c in table.classes]
            lines.append("| " + " | ".join(cells) + " |")
    if table.not_averaged:
        lines += ["", "## Runs not averaged", "", "| run | why |", "| --- | --- |"]
        lines += [f"| `{name}` | {_md_cell(why)} |" for name, why in table.not_averaged]
    return "\n".join(lines) + "\n"


def format_summary(table: SweepTable) -> str:
    """A plain-text mIoU table for the terminal."""
    main = table.main_protocol or "mIoU"
    others = _protocol_columns(table)
    header = [*table.keys, "n_seeds", main, *others, "flagged classes"]
    body = [[row.params[k] for k in table.keys] + [str(row.n_seeds), mean_sd(row.miou)]
            + [mean_sd(row.protocols.get(p)) for p in others] + [", ".join(row.flagged) or "-"]
            for row in table.rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [f"not averaged: {name}: {why}" for name, why in table.not_averaged]
    return "\n".join(lines)


def _csv_number(value: float | None) -> str:
    return "n/a" if value is None else repr(round(value, 6))


def csv_columns(table: SweepTable) -> list[str]:
    """Column names of results.csv."""
    columns = [*table.keys, "n_seeds", "seeds", "mIoU_mean", "mIoU_std", "mIoU_per_seed"]
    for protocol in table.protocols:
        columns += [f"{protocol}_mean", f"{protocol}_std"]
    for name in table.classes:
        columns += [f"{name}_mean", f"{name}_std", f"{name}_per_seed"]
    return columns + ["flagged_classes", "runs"]


def write_results_csv(table: SweepTable, path: str | Path) -> Path:
    """results.csv: one line per configuration (numbers with 6 decimals, ``n/a`` where undefined)."""
    path = Path(path)

    def per_seed(stat: Stat | None) -> str:
        return ";".join(f"s{s}={v:.6g}" for s, v in zip(stat.seeds, stat.values)) if stat else ""

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(table))
        writer.writeheader()
        for row in table.rows:
            line = {**row.params, "n_seeds": row.n_seeds, "seeds": ";".join(str(s) for s, _ in row.runs),
                    "mIoU_mean": _csv_number(row.miou.mean), "mIoU_std": _csv_number(row.miou.std),
                    "mIoU_per_seed": per_seed(row.miou), "flagged_classes": ";".join(row.flagged),
                    "runs": ";".join(name for _, name in row.runs)}
            for protocol in table.protocols:
                stat = row.protocols.get(protocol)
                line[f"{protocol}_mean"] = _csv_number(stat.mean if stat else None)
                line[f"{protocol}_std"] = _csv_number(stat.std if stat else None)
            for name in table.classes:
                stat = row.classes.get(name)
                line[f"{name}_mean"] = _csv_number(stat.mean if stat else None)
                line[f"{name}_std"] = _csv_number(stat.std if stat else None)
                line[f"{name}_per_seed"] = per_seed(stat)
            writer.writerow(line)
    return path


# --------------------------------------------------------------------------- chart


def plot_results(table: SweepTable, path: str | Path) -> Path:
    """results.png: the protocols' mIoU per configuration (bars = mean, error bars = sd, dots = seeds)
    above the per-class IoU of each configuration (flagged classes starred)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not table.rows:
        raise SweepError("no run of the sweep has metrics yet: nothing to plot")
    labels = [row_label(table, row) for row in table.rows]
    protocols = [table.main_protocol or "mIoU"] + _protocol_columns(table)
    colors = plt.get_cmap("tab10")
    n_rows, n_classes = len(table.rows), len(table.classes)
    width_in = max(8.0, 0.9 * n_rows * len(protocols), 0.28 * n_classes * max(1, n_rows) + 2.0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(min(width_in, 28.0), 9.0),
                                      gridspec_kw={"height_ratios": [1.0, 1.25]})

    def bars(ax, x, stats, width, color, label):
        means = [s.mean if s is not None and s.n else np.nan for s in stats]
        sds = [s.std if s is not None and s.std is not None else 0.0 for s in stats]
        drawn = ax.bar(x, means, width, yerr=sds, capsize=3, color=color, label=label, error_kw={"linewidth": 1})
        ax.bar_label(drawn, labels=["0" if m == 0 else "" for m in means], fontsize=7, padding=2)
        for xi, stat in zip(x, stats):
            if stat is not None and stat.n:
                ax.plot([xi] * stat.n, stat.values, "o", color="black", markersize=3, zorder=3)

    def offsets(centres, count):
        """Bar positions and width for ``count`` bars side by side at each centre (narrow when few)."""
        total = min(0.8, 0.3 * count)
        width = total / count
        return [centres - total / 2 + width * (index + 0.5) for index in range(count)], width

    x = np.arange(n_rows)
    positions, width = offsets(x, len(protocols))
    for index, protocol in enumerate(protocols):
        stats = [row.miou if protocol == protocols[0] else row.protocols.get(protocol) for row in table.rows]
        bars(top, positions[index], stats, width, colors(index % 10), protocol)
    top.set_xticks(x, labels, rotation=20 if max(len(label) for label in labels) > 12 else 0, ha="right"
                   if max(len(label) for label in labels) > 12 else "center")
    top.set_xlim(-0.6, n_rows - 0.4)
    top.set(ylabel="mIoU (%)", title="mIoU per configuration (bar: mean, error bar: sd, dots: seeds)")
    top.set_ylim(0, max(100.0, top.get_ylim()[1]))
    top.grid(axis="y", alpha=0.3)
    top.legend(fontsize=8, loc="upper right")

    if n_classes:
        cx = np.arange(n_classes)
        positions, cwidth = offsets(cx, n_rows)
        for index, (row, label) in enumerate(zip(table.rows, labels)):
            offset = positions[index]
            bars(bottom, offset, [row.classes.get(c) for c in table.classes], cwidth, colors(index % 10), label)
            for xi, name in zip(offset, table.classes):
                stat = row.classes.get(name)
                if name in row.flagged and stat is not None:
                    top_of_bar = max(max(stat.values), (stat.mean or 0.0) + (stat.std or 0.0))
                    bottom.annotate("*", (xi, top_of_bar), xytext=(0, 2), textcoords="offset points", ha="center",
                                    va="bottom", fontsize=12, color="crimson")
        flagged = {name for row in table.rows for name in row.flagged}
        bottom.set_xticks(cx, [f"{c} *" if c in flagged else c for c in table.classes], rotation=45, ha="right")
        for tick, name in zip(bottom.get_xticklabels(), table.classes):
            if name in flagged:
                tick.set_color("crimson")
        bottom.set(ylabel="IoU (%)", xlim=(-0.6, n_classes - 0.4),
                   title="Per-class IoU" + (f" (* spans more than {table.threshold:g} points across seeds)"
                                            if flagged else ""))
        bottom.set_ylim(0, max(100.0, bottom.get_ylim()[1]))
        bottom.grid(axis="y", alpha=0.3)
    else:
        bottom.set_visible(False)
    fig.tight_layout()
    if n_classes:  # below everything, tick labels included (the saved figure grows to hold it)
        fig.legend(*bottom.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(4, n_rows), fontsize=9, frameon=False, title="configuration")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_results(table: SweepTable, output_dir: str | Path) -> dict[str, Path]:
    """Write results.md, results.csv and (when some run has metrics) results.png into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results.md": output_dir / "results.md", "results.csv": output_dir / "results.csv"}
    text = results_markdown(table)
    if table.rows:
        paths["results.png"] = plot_results(table, output_dir / "results.png")
        text += "\n![results](results.png)\n"
    else:
        (output_dir / "results.png").unlink(missing_ok=True)  # of an earlier state of the sweep
    atomic_write_text(paths["results.md"], text)
    write_results_csv(table, paths["results.csv"])
    return paths
