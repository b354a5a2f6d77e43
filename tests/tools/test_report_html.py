"""report.html: the report's tables, plots and gallery as one page; only local files; everything escaped."""

import json
import re
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tiny_runs import TINY_BACKBONE  # registers the tiny backbone
from plca.cli import main
from plca.evaluation.metrics import summarize
from plca.tools.report import ReportError, markdown_to_html, write_report

CLASSES = ["road", "car", "sky"]


class PageParser(HTMLParser):
    """Tags, attributes and text of a page; table cells as text."""

    def __init__(self):
        super().__init__()
        self.tags, self.sources, self.links, self.cells, self.text = [], [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.sources.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(path):
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def fake_run(path, seed, method, lr, name_in_config=None):
    """A finished run directory: config, scalars, validation history and metrics (random confusion matrices)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(
        {"method": method, "data": {"classes": CLASSES}, "train": {"lr": lr, "iters": 30},
         "run_name": name_in_config or path.name}))
    scalars = [{"step": step, "loss/total": 2.0 / step, "lr": lr * (1 - step / 40)} for step in (10, 20, 30)]
    (path / "scalars.jsonl").write_text("".join(json.dumps(line) + "\n" for line in scalars))
    history = []
    for step in (20, 30):
        matrix = torch.from_numpy(rng.integers(1, 100, size=(3, 3))) + torch.eye(3, dtype=torch.int64) * 200
        history.append({**summarize(matrix, CLASSES), "step": step})
    (path / "eval_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (path / "metrics.json").write_text(json.dumps({**history[-1], "method": method}))
    return history[-1]


def assert_local_files_only(page_path):
    parser = parse(page_path)
    assert "script" not in parser.tags and "link" not in parser.tags and "iframe" not in parser.tags
    text = page_path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "//" not in "".join(parser.sources)
    for source in parser.sources + parser.links:
        assert not urllib.parse.urlparse(source).scheme, source
        assert (page_path.parent / urllib.parse.unquote(source)).is_file(), source
    return parser


def test_markdown_to_html_escapes_and_renders_the_subset():
    text = "\n".join([
        "# report of <b>runs</b>", "", "| run | `key` | mIoU |", "| --- | --- | ---: |",
        "| a \\| b <script>alert(1)</script> | `x<y` | 45.10 ± 1.02 |", "| c & d | - | n/a |", "",
        "- one `<i>`", "- two", "", "some text", "continued", "", "![chart \"<x>\"](my chart.png)", ""])
    page = markdown_to_html(text, title="t <&>")
    assert "<script>" not in page and "<b>runs" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<title>t &lt;&amp;&gt;</title>" in page
    assert "<td>a | b &lt;script&gt;alert(1)&lt;/script&gt;</td>" in page  # the escaped pipe is a pipe again
    assert '<td class="num">45.10 ± 1.02</td>' in page and '<td class="num">n/a</td>' in page
    assert "<th><code>key</code></th>" in page and "<td><code>x&lt;y</code></td>" in page
    assert "<li>one <code>&lt;i&gt;</code></li>" in page and "<p>some text\ncontinued</p>" in page
    figure = re.search(r'<figure><a href="my%20chart.png"><img ([^>]*)></a></figure>', page)
    assert figure and sorted(figure[1].split('" ')) == ['alt="chart &quot;&lt;x&gt;&quot;', 'loading="lazy',
                                                         'src="my%20chart.png"']
    assert page.count("<table>") == 1 and page.count("<tr>") == 3


def test_report_html_has_the_tables_and_the_plots(tmp_path):
    a = fake_run(tmp_path / "source_only_s0", 0, "source_only", 0.01)
    b = fake_run(tmp_path / "plca_<s0>", 1, "plca", 0.02)
    report = write_report([tmp_path / "source_only_s0", tmp_path / "plca_<s0>"], tmp_path / "report")
    page = report.with_name("report.html")
    assert page.is_file()
    parser = assert_local_files_only(page)
    assert sorted(parser.sources) == ["per_class_iou.png", "training_curves.png"]
    text = page.read_text(encoding="utf-8")
    assert "plca_&lt;s0&gt;" in text and "plca_<s0>" not in text
    for metrics in (a, b):  # the per-class table's numbers, one cell each
        for name in CLASSES:
            assert f"{metrics['per_class_IoU'][name]:.1f}" in parser.cells
        assert f"{metrics['mIoU']:.1f}" in parser.cells and f"{metrics['mIoU']:.2f}" in parser.cells
    # the differences table: config keys and both values
    row = parser.cells.index("train.lr")
    assert parser.cells[row - 1:row + 3] == ["config", "train.lr", "0.01", "0.02"]
    assert "source_only" in parser.cells and "plca" in parser.cells


def test_sweep_report_html_has_mean_and_sd(tmp_path):
    sweep = tmp_path / "sweep"
    entries = []
    for lr in ("0.01", "0.02"):
        for seed in (0, 1):
            name = f"train.lr={lr}_s{seed}"
            fake_run(sweep / "runs" / name, seed + (2 if lr == "0.02" else 0), "plca", float(lr))
            entries.append({"name": name, "run_dir": f"runs/{name}", "params": {"train.lr": lr}, "seed": seed,
                            "status": "finished"})
    (sweep / "manifest.json").write_text(json.dumps({"config": "c.yaml", "seeds": [0, 1],
                                                     "grid": {"train.lr": ["0.01", "0.02"]}, "runs": entries}))
    assert main(["report", str(sweep)]) == 0
    page = sweep / "report" / "report.html"
    parser = assert_local_files_only(page)
    assert "results.png" in parser.sources and "training_curves.png" in parser.sources
    values = [json.loads((sweep / "runs" / f"train.lr=0.01_s{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert f"{np.mean([v['mIoU'] for v in values]):.2f} ± {np.std([v['mIoU'] for v in values], ddof=1):.2f}" \
        in parser.cells
    car = [v["per_class_IoU"]["car"] for v in values]
    assert f"{np.mean(car):.2f} ± {np.std(car, ddof=1):.2f}" in " ".join(parser.cells)
    with pytest.raises(ReportError, match="--gallery is for run directories"):
        write_report([sweep], tmp_path / "x", gallery=2)


def run_with_a_model(tmp_path, name="run", seed=0):
    """A finished run directory whose checkpoints/final.pt is a random ResNet-18 and whose data.val is a
    folder of 3 labelled 32 x 48 images."""
    from dataset_writers import write_folder

    from plca.config import build_config, to_dict
    from plca.tools.export import build_inference_model

    root = tmp_path / "data"
    if not root.exists():
        write_folder(root, classes_count=3, splits={"train": 1, "val": 3}, size=(32, 48), seed=0)
    config = build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(root), "split": "train"},
                 "val": {"format": "folder", "root": str(root), "split": "val"}},
        "model": {"backbone": TINY_BACKBONE}, "device": "cpu", "run_name": name,
    })
    run = tmp_path / name
    fake_run(run, seed, "source_only", 0.01, name_in_config=name)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))
    torch.manual_seed(len(name))
    (run / "checkpoints").mkdir()
    torch.save({"model": build_inference_model(config).eval().state_dict(), "config": to_dict(config), "step": 30},
               run / "checkpoints" / "final.pt")
    return run


def test_report_gallery_of_the_final_model(tmp_path, capsys):
    run = run_with_a_model(tmp_path)
    assert main(["report", str(run), "--gallery", "1", "--no-progress"]) == 0
    assert "report.html" in capsys.readouterr().out
    index = json.loads((run / "report" / "gallery" / "index.json").read_text())
    assert len(index["lowest"]) == len(index["highest"]) == 1 and index["images"] == 3
    assert str(run / "checkpoints" / "final.pt") in index["description"]
    page = run / "report" / "report.html"
    parser = assert_local_files_only(page)
    files = [f"gallery/{entry['file']}" for entry in index["lowest"] + index["highest"]]
    assert all(file in parser.sources for file in files)
    assert f"{index['lowest'][0]['mIoU']:.1f}" in parser.cells
    assert all(f"({file})" in (run / "report" / "report.md").read_text() for file in files)
    # several runs: one gallery folder each; a run without a model is named in the error
    other = run_with_a_model(tmp_path, "other", seed=1)
    write_report([run, other], tmp_path / "both", gallery=1)
    assert (tmp_path / "both" / "gallery" / "run" / "index.json").is_file()
    assert (tmp_path / "both" / "gallery" / "other" / "index.json").is_file()
    assert_local_files_only(tmp_path / "both" / "report.html")
    (other / "checkpoints" / "final.pt").unlink()
    with pytest.raises(ReportError, match="other"):
        write_report([other], tmp_path / "none", gallery=1)


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no chromium to render report.html")
def test_report_html_renders_in_headless_chromium(tmp_path):
    runs = [run_with_a_model(tmp_path, "baseline", seed=3), run_with_a_model(tmp_path, "adapted", seed=4)]
    write_report(runs, tmp_path / "report", gallery=1, progress=False)
    page = tmp_path / "report" / "report.html"
    shot = tmp_path / "report.png"
    subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                    "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1400,2000", page.as_uri()],
                   check=True, timeout=120, capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1400)
    not_white = (pixels < 240).any(axis=2)
    assert not_white.mean() > 0.02  # text, table borders and plots, not a blank page
    colourful = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 60
    assert colourful.mean() > 0.005  # the plots' colours were loaded
