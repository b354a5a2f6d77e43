"""Fixes found by probing the day's features with odd inputs: a plugin that calls ``sys.exit`` on import,
and a model folder whose ``config.json`` inference settings were edited by hand with a wrong type."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from plca.models.weights import WeightsError
from plca.plugins import PluginError, import_plugins
from plca.tools.model_folder import FOLDER_FORMAT, MODEL_FOLDER_CONFIG, read_folder_config

# ------------------------------------------------------------------ a plugin that exits


@pytest.fixture
def exiting_plugins(tmp_path, monkeypatch) -> Path:
    (tmp_path / "exits_quietly.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "exits_with_text.py").write_text("raise SystemExit('no GPU here')\n")
    (tmp_path / "exits_in_register.py").write_text("import sys\n\ndef register():\n    sys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(("module", "said"), [("exits_quietly", "it called sys.exit(0)"),
                                              ("exits_with_text", "it called sys.exit('no GPU here')")])
def test_a_plugin_that_calls_sys_exit_is_a_plugin_error(exiting_plugins, module, said):
    # before: SystemExit went through, and `plca train` ended with status 0 having done nothing
    with pytest.raises(PluginError) as caught:
        import_plugins([module], [])
    assert str(caught.value) == f"plugin '{module}' (named in $PLCA_PLUGINS) failed to import: {said}"


def test_an_entry_point_function_that_calls_sys_exit_is_a_plugin_error(exiting_plugins):
    entry = EntryPoint("mine", "exits_in_register:register", "plca.plugins")
    with pytest.raises(PluginError, match=r"entry point 'mine = exits_in_register:register'.* failed to load: "
                                          r"it called sys.exit\(3\)$"):
        import_plugins([], [entry])


def test_the_plca_command_stops_with_status_2_on_a_plugin_that_exits(exiting_plugins, monkeypatch, capsys):
    import plca.plugins as plugins
    from plca.cli import main

    monkeypatch.setattr(plugins, "_LOADED", None)  # load again in this process, with the exiting plugin
    monkeypatch.setattr(plugins, "_FAILURE", None)
    monkeypatch.setenv(plugins.ENV_VAR, "exits_quietly")
    assert main(["config", "--help"]) == 2
    assert "plugin 'exits_quietly' (named in $PLCA_PLUGINS) failed to import: it called sys.exit(0)" in \
        capsys.readouterr().err


# ------------------------------------------------------------------ a model folder's config.json edited by hand


def folder_with(tmp_path: Path, **inference) -> Path:
    settings = {"size": None, "test_time_aggregation": False, "alpha": 0.5, "window": [32, 32], **inference}
    (tmp_path / MODEL_FOLDER_CONFIG).write_text(json.dumps({"format": FOLDER_FORMAT, "classes": ["a", "b"],
                                                            "inference": settings}))
    return tmp_path


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("test_time_aggregation", "false", "true or false"),  # before: bool("false") turned the aggregation on
    ("test_time_aggregation", 1, "true or false"),
    ("size", 512, "null or two positive integers"),  # before: TypeError 'int' object is not iterable
    ("size", "512", "null or two positive integers"),
    ("size", [0, 10], "null or two positive integers"),
    ("window", 32, "null or two positive integers"),
    ("window", [32, 32, 32], "null or two positive integers"),
    ("window", [True, 32], "null or two positive integers"),
    ("alpha", "x", "a number in \\[0, 1\\]"),  # before: ValueError naming neither the file nor the key
    ("alpha", None, "a number in \\[0, 1\\]"),
    ("alpha", 1.5, "a number in \\[0, 1\\]"),
])
def test_a_wrong_inference_setting_names_the_file_and_the_key(tmp_path, key, value, expected):
    folder = folder_with(tmp_path, **{key: value})
    with pytest.raises(WeightsError, match=f"config.json': inference.{key} must be {expected}.*, got "):
        read_folder_config(folder)


def test_the_settings_an_export_writes_are_accepted(tmp_path):
    assert read_folder_config(folder_with(tmp_path))["inference"]["window"] == [32, 32]
    edited = read_folder_config(folder_with(tmp_path, size=[512, 1024], window=None, alpha=0,
                                            test_time_aggregation=True))
    assert edited["inference"] == {"size": [512, 1024], "test_time_aggregation": True, "alpha": 0, "window": None}
    del_keys = folder_with(tmp_path)
    data = json.loads((del_keys / MODEL_FOLDER_CONFIG).read_text())
    data["inference"] = {}  # absent keys keep the stored config's settings (plca.api)
    (del_keys / MODEL_FOLDER_CONFIG).write_text(json.dumps(data))
    assert read_folder_config(del_keys)["inference"] == {}


# ------------------------------------------------------------------ the border mask of a rescaled crop

BORDER_MASK_WARNINGS = """
import warnings
import numpy as np
from plca.data.datasets import border_mask
from plca.data.transforms import TrainTransform

warnings.simplefilter("error")  # torch warns once per process: a fresh one sees the first
transform = TrainTransform(crop_size=(16, 16), scale_range=(0.5, 0.5), flip=False)
# 20 x 16 after the rescale: the window spans whole rows, so the crop is a contiguous view, not a copy
image, label = np.zeros((40, 32, 3), np.uint8), np.zeros((40, 32), np.uint8)
_, _, valid = transform(image, label, np.random.default_rng(0), border_mask((40, 32), (2, 2, 2, 2)))
print(int(valid.sum()))
"""


def test_a_rescaled_border_mask_becomes_a_tensor_without_a_warning():
    import subprocess
    import sys

    # before: torch.from_numpy of a view of PIL's read-only array warned "The given NumPy array is not
    # writable" in the DataLoader workers of a run with image_margins whose crop spans a rescaled image's width
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", BORDER_MASK_WARNINGS], cwd=root, capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    # margins of 1 pixel after the rescale: 14 valid columns, 14 to 16 valid rows of the window's 16
    assert 14 * 14 <= int(result.stdout) <= 16 * 14


# ------------------------------------------------------------------ a second signal during the set-up's stop


def test_a_second_signal_does_not_interrupt_the_first_ones_clean_up():
    import os
    import signal

    from plca.engine.failure import StopAtOnce, TrainingInterrupted

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    cleaned = []
    with pytest.raises(TrainingInterrupted) as caught:
        with StopAtOnce(lambda name: f"stopped by {name}"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.sigtimedwait([], 5)  # the handler runs before this returns
            finally:
                # Ctrl-C on top of a scheduler's SIGTERM: before, it raised again here (the clean-up, e.g.
                # an atomic write's removal of its temporary file, was cut short) or inside __exit__ (a
                # traceback of plca.engine.failure._SignalArrived, status 1, nothing in train.log)
                os.kill(os.getpid(), signal.SIGINT)
                cleaned.append("done")
    assert cleaned == ["done"]
    assert str(caught.value) == "stopped by SIGTERM" and caught.value.exit_code == 143  # the first signal's
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers are back as they were


# ------------------------------------------------------------------ plca evaluate --output


@pytest.fixture(scope="module")
def run_with_val(tmp_path_factory) -> Path:
    from dataset_writers import write_folder
    from plca.config import build_config
    from plca.engine.trainer import train
    from tiny_runs import CLASSES, TINY_BACKBONE

    root = tmp_path_factory.mktemp("evaluate_output")
    write_folder(root / "data", classes_count=3, splits={"train": 2, "val": 1}, size=(32, 40), seed=3)
    folder = {"format": "folder", "root": str(root / "data")}
    config = build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "num_workers": 0, "source": {**folder, "split": "train"},
                 "val": {**folder, "split": "val"}},
        "model": {"backbone": TINY_BACKBONE},
        "train": {"iters": 1, "batch_size": 2, "crop_size": [32, 32], "eval_every": 0, "checkpoint_every": 1,
                  "log_every": 1, "image_every": 0},
        "output_dir": str(root / "runs"), "run_name": "run", "device": "cpu"})
    return train(config, progress=False).run_dir


def test_evaluate_output_in_a_new_folder_is_written(run_with_val, tmp_path, capsys):
    from plca.cli import main

    output = tmp_path / "new" / "folder" / "metrics.json"
    # before: the evaluation ran, then a FileNotFoundError traceback naming a hidden temporary file
    assert main(["evaluate", "--checkpoint", str(run_with_val), "--output", str(output), "--no-progress"]) == 0
    assert json.loads(output.read_text())["mIoU"] == pytest.approx(
        json.loads((run_with_val / "metrics.json").read_text())["mIoU"])


def test_evaluate_output_naming_a_folder_is_refused_before_evaluating(run_with_val, tmp_path, capsys, monkeypatch):
    import plca.tools.evaluate as evaluate_tool
    from plca.cli import main

    def never(*args, **kwargs):
        raise AssertionError("evaluated although the output cannot be written")

    monkeypatch.setattr(evaluate_tool, "evaluate_checkpoint", never)
    # before: an IsADirectoryError traceback, after the whole evaluation
    assert main(["evaluate", "--checkpoint", str(run_with_val), "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"plca evaluate: error: --output '{tmp_path}' is a folder; give the "
                                               f"metrics file's name, e.g. {tmp_path / 'metrics.json'}")
