"""plca.load_model and plca.segment on the core install (torch, numpy, safetensors): a model folder and a
``.safetensors`` export load and segment as they do with every extra installed, label for label.

A fresh interpreter stands for the core install: a ``sys.meta_path`` finder refuses the extras' packages.
The model is a tiny in-process run (the tiny test backbone), exported by ``plca export``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import plca
from dataset_writers import write_folder
from plca.cli import main
from plca.engine.trainer import train
from plca.serialization import read_safetensors, read_safetensors_metadata
from tiny_runs import tiny_in_process_config

ROOT = Path(__file__).resolve().parent.parent
#: What the core install lacks: the [train] and [report] extras' packages and the tests' cityscapesscripts.
REFUSED = ("omegaconf", "yaml", "PIL", "tqdm", "tensorboard", "matplotlib", "cityscapesscripts")

CORE_INSTALL = """
import importlib.abc, json, sys
REFUSED = {refused!r}
asked = set()

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in REFUSED:
            asked.add(name.split(".")[0])
            raise ModuleNotFoundError(f"No module named '{{name}}' (refused: the core install)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
sys.path.insert(0, {tests!r})
import numpy as np
import tiny_runs  # registers the tiny test backbone, as in the parent
import plca

results = {{}}
for path in {paths!r}:
    try:
        model = plca.load_model(path)
    except ModuleNotFoundError as error:
        results[path] = {{"error": str(error)}}
        continue
    labels = {{}}
    for name, shape in {images!r}.items():
        image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
        labels[name] = plca.segment(model, image).tolist()
        labels[name + " sliding"] = plca.segment(model, image, sliding_window=True).tolist()
    results[path] = {{"classes": model.classes, "labels": labels}}
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & REFUSED)
print(json.dumps({{"results": results, "loaded": loaded, "asked": sorted(asked)}}))
"""

#: Image shapes (H, W, 3): one smaller than the 32 x 32 training crop, one that takes several windows.
IMAGES = {"small": (24, 28, 3), "wide": (40, 72, 3)}


def segment_everywhere(paths: list[Path]) -> dict:
    """``{path: {"classes", "labels": {image: ids}}}`` of the same calls in this process (every extra)."""
    results = {}
    for path in paths:
        model = plca.load_model(path)
        labels = {}
        for name, shape in IMAGES.items():
            image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
            labels[name] = plca.segment(model, image).tolist()
            labels[name + " sliding"] = plca.segment(model, image, sliding_window=True).tolist()
        results[str(path)] = {"classes": model.classes, "labels": labels}
    return results


def segment_on_the_core_install(paths: list[Path]) -> dict:
    code = CORE_INSTALL.format(refused=set(REFUSED), tests=str(ROOT / "tests"), paths=[str(p) for p in paths],
                               images=IMAGES)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A tiny run's model folder, its single-file export, a copy of the folder with test-time aggregation
    turned on in config.json, and an export as written before ``config_json`` (YAML config only)."""
    tmp = tmp_path_factory.mktemp("light")
    write_folder(tmp / "data", splits={"train": 2})
    run = train(tiny_in_process_config(tmp / "data", tmp / "runs", iters=2, checkpoint_every=100), progress=False)
    paths = {"folder": tmp / "folder", "file": tmp / "model.safetensors", "aggregated": tmp / "aggregated",
             "old export": tmp / "old.safetensors"}
    assert main(["export", str(run.run_dir), "--format", "folder", "--output", str(paths["folder"])]) == 0
    assert main(["export", str(run.run_dir), "--output", str(paths["file"])]) == 0
    shutil.copytree(paths["folder"], paths["aggregated"])
    settings = json.loads((paths["aggregated"] / "config.json").read_text())
    settings["inference"]["test_time_aggregation"] = True
    (paths["aggregated"] / "config.json").write_text(json.dumps(settings))
    write_without_config_json(paths["file"], paths["old export"])
    return paths


def write_without_config_json(source: Path, output: Path) -> None:
    from safetensors.torch import save_file

    tensors, metadata = read_safetensors(source)
    del metadata["config_json"]
    save_file(tensors, str(output), metadata=metadata)


def test_a_model_folder_and_an_export_segment_alike_without_the_extras(exported):
    paths = [exported["folder"], exported["file"], exported["aggregated"]]
    core = segment_on_the_core_install(paths)
    assert core["results"] == segment_everywhere(paths)
    assert core["loaded"] == [], f"the core path imported {core['loaded']}"
    assert "omegaconf" in core["asked"]  # the finder was consulted: the config was read without OmegaConf
    labels = core["results"][str(exported["folder"])]["labels"]
    assert np.array(labels["wide"]).shape == IMAGES["wide"][:2]
    assert labels["wide"] != labels["wide sliding"]  # the window is used (3 windows of 32 across 72)
    aggregated = core["results"][str(exported["aggregated"])]["labels"]
    assert aggregated["wide"] != labels["wide"]  # and the folder's test-time aggregation setting too


def test_an_export_without_config_json_names_the_train_extra(exported):
    core = segment_on_the_core_install([exported["old export"]])
    error = core["results"][str(exported["old export"])]["error"]
    assert error == (f"plca.load_model('{exported['old export']}'): this file needs the [train] extra (module 'yaml' "
                     f"is not installed): pip install 'plca[train]'")
    with_extras = plca.load_model(exported["old export"])  # with pyyaml the old files still load
    assert with_extras.classes == plca.load_model(exported["file"]).classes


def test_the_export_stores_the_config_as_json_and_as_yaml(exported):
    import yaml

    metadata = read_safetensors_metadata(exported["file"])
    assert json.loads(metadata["config_json"]) == yaml.safe_load(metadata["config"])


def test_the_train_extra_modules_are_the_consoles():
    from plca.api import TRAIN_EXTRA_MODULES
    from plca.console import EXTRA_OF_MODULE

    assert set(TRAIN_EXTRA_MODULES) == {name for name, extra in EXTRA_OF_MODULE.items() if extra == "train"}
