"""Untrusted files: every command that reads a checkpoint or weights
refuses a pickle that carries code, says so, and never runs the code."""

import json
import os

import pytest
import torch

from dataset_writers import write_folder
from plca.cli import main

CLASSES = ["road", "car", "sky"]


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    write_folder(root / "data", classes_count=3, splits={"train": 2, "val": 1}, size=(32, 32), seed=0)
    config = {
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(root / "data"), "split": "train"},
                 "val": {"format": "folder", "root": str(root / "data"), "split": "val"}, "num_workers": 0},
        "model": {"backbone": "resnet18", "style": "pytorch"},
        "train": {"iters": 2, "batch_size": 1, "crop_size": [32, 32], "eval_every": 0, "image_every": 0},
        "output_dir": str(root / "runs"), "run_name": "victim", "device": "cpu",
    }
    (root / "config.yaml").write_text(json.dumps(config))
    run_dir = root / "runs" / "victim"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(json.dumps(config))
    return root


def evil_file(path, marker, wrapper):
    payload = {"conv1.weight": torch.zeros(1), "payload": RunsCode(marker)}
    torch.save({wrapper: payload} if wrapper else payload, path)
    return path


COMMANDS = {
    "train --resume": lambda root, evil: ["train", "--resume", str(root / "runs" / "victim"), "--no-progress"],
    "train pretrained": lambda root, evil: ["train", str(root / "config.yaml"), f"model.pretrained={evil}",
                                            "run_name=pretrained", "--no-progress"],
    "evaluate": lambda root, evil: ["evaluate", str(root / "config.yaml"), "--checkpoint", str(evil),
                                    "--no-progress"],
    "predict": lambda root, evil: ["predict", str(root / "config.yaml"), "--checkpoint", str(evil), "--input",
                                   str(root / "data" / "images"), "--output", str(root / "out"), "--no-progress"],
    "export": lambda root, evil: ["export", str(evil), "--output", str(root / "m.safetensors"), "--config",
                                  str(root / "config.yaml")],
    "weights inspect": lambda root, evil: ["weights", "inspect", str(evil)],
    "weights convert": lambda root, evil: ["weights", "convert", str(evil), str(root / "w.safetensors")],
}


@pytest.mark.parametrize("wrapper", [None, "model"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_pickle_carrying_code_is_refused_by_every_command(setup, tmp_path, capsys, command, wrapper):
    marker = tmp_path / "code-ran"
    if command == "train --resume":
        evil = evil_file(setup / "runs" / "victim" / "checkpoints" / "last.pt", marker, wrapper)
    else:
        evil = evil_file(tmp_path / "evil.pt", marker, wrapper)
    assert main(COMMANDS[command](setup, evil)) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "for safety" in err, err
    assert "Traceback" not in err
    assert not marker.exists(), "the pickle's code ran"
