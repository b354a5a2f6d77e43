"""Malformed configs and files through the real command line: each ends with a non-zero exit and one
clear line that names the key or the file, never a traceback, and never touches an existing run.

The cases run in this process through ``plca.cli.main(argv)`` (a fresh interpreter per case cost a
second each); one case per command also runs as a real ``python -m plca.cli`` process and must print
the same line."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dataset_writers import write_folder
from processes import plca_in_process
from plca.config import merge_dicts, save_config
from tiny_runs import tiny_in_process_config


def plca(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "plca.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


class _Code:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset, a finished run (whose files must never change) and its config as plain data."""
    from plca.engine.trainer import train

    tmp = tmp_path_factory.mktemp("fuzz")
    data = tmp / "data"
    write_folder(data, classes_count=3, splits={"train": 4, "val": 2}, size=(40, 56), seed=0)
    config = tiny_in_process_config(data, tmp / "runs", "existing", iters=1)
    config.data.val = type(config.data.source)(format="folder", root=str(data), split="val")
    run = train(config, progress=False).run_dir
    base = yaml.safe_load((run / "config.yaml").read_text())
    base["run_name"] = None
    snapshot = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    yield {"tmp": tmp, "data": data, "run": run, "base": base}
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == snapshot, "a failed command changed a file of an existing run"


CONFIG_CASES = [  # (change merged into a valid config, the key the message must name)
    ({"bogus": 1}, "bogus"),
    ({"train": {"itres": 3}}, "train.itres"),
    ({"train": {"iters": "many"}}, "train.iters"),
    ({"train": {"iters": 0}}, "train.iters"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"train": {"momentum": 1.5}}, "train.momentum"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay"),
    ({"train": {"crop_size": 5}}, "train.crop_size"),
    ({"train": {"crop_size": [0, 32]}}, "train.crop_size"),
    ({"train": {"flip": 3}}, "train.flip"),
    ({"train": {"shorter_side": [50, 10]}}, "train.shorter_side"),
    ({"train": {"scale_range": [0.5, 2.0], "shorter_side": [10, 20]}}, "train.scale_range"),
    ({"train": {"iters": 10, "poly_iters": 1}}, "train.poly_iters"),
    ({"model": {"backbone": "resnet152"}}, "model.backbone"),
    ({"model": {"head": "fcn"}}, "model.head"),
    ({"model": {"style": "tf"}}, "model.style"),
    ({"model": {"backbone": "mit_b0", "style": "caffe"}}, "model.style"),
    ({"method": "dacs"}, "method"),
    ({"data": {"classes": []}}, "data.classes"),
    ({"data": {"classes": ["a", "a", "b"]}}, "data.classes"),
    ({"data": {"source": {"format": "kitti"}}}, "data.source.format"),
    ({"data": {"source": {"root": ""}}}, "data.source.root"),
    ({"method": "plca", "data": {"target": None}}, "data.target"),
    ({"loss": {"lovasz_weight": -1}}, "loss.lovasz_weight"),
    ({"loss": {"association": {"alpha": 2}}}, "loss.association.alpha"),
    ({"device": "tpu"}, "device"),
    ({"train": {"batch_size": 8}}, "batch"),  # 4 training images: fewer than one batch
]


def _one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"plca {command}")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def config_cases(world) -> list[tuple[Path, str]]:
    """(config file, the key its message must name) for malformed configs."""
    tmp = world["tmp"]
    paths = []
    for index, (change, key) in enumerate(CONFIG_CASES):
        data = merge_dicts(world["base"], change)
        data["output_dir"] = str(tmp / "fuzz_runs" / str(index))
        path = tmp / f"config_{index}.yaml"
        path.write_text(yaml.safe_dump(data))
        paths.append((path, key))
    extra = tmp / "extra"
    extra.mkdir()
    (extra / "list.yaml").write_text("- a\n- b\n")
    (extra / "broken.yaml").write_text("train: [unclosed\n")
    (extra / "binary.yaml").write_bytes(bytes(range(256)) * 8)
    (extra / "bases.yaml").write_text("_base_: nowhere.yaml\n")
    for name in ("list.yaml", "broken.yaml", "binary.yaml", "bases.yaml"):
        paths.append((extra / name, "nowhere.yaml" if name == "bases.yaml" else name))
    return paths


def test_malformed_configs_get_one_line_naming_the_key(world, config_cases):
    tmp = world["tmp"]
    assert len(config_cases) >= 30
    results = [plca_in_process("train", str(path), "--no-progress", cwd=tmp) for path, _ in config_cases]
    for (path, key), result in zip(config_cases, results):
        line = _one_error_line(result, "train")
        assert key in line, (path.name, key, line)
    assert not any((tmp / "fuzz_runs").rglob("*.pt"))  # nothing trained, nothing saved
    assert not [p for p in (tmp / "fuzz_runs").rglob("*") if p.is_dir() and p.parent.name.isdigit()]


def _write_files(tmp: Path, world) -> list[tuple[list[str], str, str]]:
    """(command line, the command's name, what the message must name) for malformed files."""

    bad = tmp / "bad"
    bad.mkdir()
    run = world["run"]
    final = run / "checkpoints" / "final.pt"
    cases: list[tuple[list[str], str, str]] = []

    def evaluate(path: Path, fragment: str | None = None, *extra: str) -> None:
        cases.append((["evaluate", *extra, "--checkpoint", str(path), "--no-progress",
                       "--output", str(bad / "m.json")], "evaluate", fragment or path.name))

    (bad / "empty.pt").write_bytes(b"")
    evaluate(bad / "empty.pt")
    (bad / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    evaluate(bad / "noise.pt")
    (bad / "half.pt").write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    evaluate(bad / "half.pt")
    with open(bad / "code.pt", "wb") as handle:
        pickle.dump({"model": _Code()}, handle)
    evaluate(bad / "code.pt", "not loaded for safety")
    torch.save([1, 2, 3], bad / "list.pt")
    evaluate(bad / "list.pt")
    (bad / "text.pt").write_text("these are not weights\n")
    evaluate(bad / "text.pt")
    torch.save({"weights_of": torch.zeros(2)}, bad / "nomodel.pt")
    evaluate(bad / "nomodel.pt")
    (bad / "noise.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{]")
    evaluate(bad / "noise.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(bad / "plain.safetensors"))
    evaluate(bad / "plain.safetensors", "not a plca export")
    evaluate(bad / "missing.pt")
    # a real checkpoint of another network, with a config that asks for this one
    other_config = tiny_in_process_config(world["data"], tmp / "other_runs", "five", iters=1)
    other_config.data.classes = ["a", "b", "c", "d", "e"]
    other_run = tmp / "other"
    other_run.mkdir()
    config_path = other_run / "config.yaml"
    save_config(tiny_in_process_config(world["data"], tmp / "x", "y"), config_path)
    from plca.engine.checkpoint import atomic_save
    from plca.models import build_segmentor

    five = build_segmentor(other_config.model, 5)
    atomic_save({"model": five.state_dict(), "segmentor": five.describe(), "classes": other_config.data.classes},
                bad / "five.pt")
    evaluate(bad / "five.pt", "with 5 classes; the config asks for", str(config_path))
    r34 = build_segmentor(type(other_config.model)(backbone="resnet34", style="pytorch"), 3)
    atomic_save({"model": r34.state_dict(), "segmentor": r34.describe(), "classes": ["road", "car", "sky"]},
                bad / "r34.pt")
    evaluate(bad / "r34.pt", "resnet34", str(config_path))

    # training with bad files
    base = world["base"]
    def train_case(change: dict, fragment: str, *extra: str) -> None:
        data = merge_dicts(base, {"output_dir": str(tmp / "bad_runs"), **change})
        path = bad / f"train_{len(cases)}.yaml"
        path.write_text(yaml.safe_dump(data))
        cases.append((["train", str(path), *extra, "--no-progress"], "train", fragment))

    weights = bad / "garbage_weights.pth"
    weights.write_bytes(np.random.default_rng(1).bytes(2048))
    resnet = {"backbone": "resnet18", "style": "pytorch"}  # a backbone with a weight loader (the tiny one has none)
    train_case({"model": {**resnet, "pretrained": str(weights)}}, weights.name)
    train_case({"model": {**resnet, "pretrained": str(bad / "code.pt")}}, "not loaded for safety")
    latin = bad / "latin"
    write_folder(latin, classes_count=3, splits={"train": 4}, size=(40, 56), seed=3)
    (latin / "train.txt").write_bytes("caf\xe9\n".encode("latin-1") + (latin / "train.txt").read_bytes())
    train_case({"data": {"source": {"root": str(latin)}}}, "train.txt")
    missing = bad / "missing_image"
    write_folder(missing, classes_count=3, splits={"train": 4}, size=(40, 56), seed=4)
    next((missing / "images").iterdir()).unlink()
    train_case({"data": {"source": {"root": str(missing)}}}, str(missing))
    (bad / "outfile").write_text("a file, not a folder")
    train_case({"output_dir": str(bad / "outfile")}, "outfile")
    zero = bad / "zero_run"
    (zero / "checkpoints").mkdir(parents=True)
    (zero / "checkpoints" / "last.pt").write_bytes(b"")
    cases.append((["train", "--resume", str(zero), "--no-progress"], "train", "last.pt"))

    # prepare
    cases.append((["prepare", "gta5", str(world["data"]), "--no-progress"], "prepare", "GTA5"))
    mode_root = bad / "modes"
    write_folder(mode_root, classes_count=3, splits={"train": 2}, size=(40, 56), seed=5)
    first = sorted((mode_root / "images").iterdir())[0]
    Image.fromarray(np.random.default_rng(2).random((40, 56)).astype(np.float32), mode="F").save(
        first.with_suffix(".tif"))
    first.unlink()
    cases.append((["prepare", "folder", str(mode_root), "--classes", "road", "car", "sky", "--no-progress"],
                  "prepare", first.stem))
    return cases


@pytest.fixture(scope="module")
def file_cases(world) -> list[tuple[list[str], str, str]]:
    return _write_files(world["tmp"], world)


def _check_file_case(args: list[str], command: str, fragment: str, result: subprocess.CompletedProcess) -> None:
    assert result.returncode != 0, (args, result.stdout[-500:])
    output = result.stdout + result.stderr
    assert "Traceback" not in output, (args, output[-3000:])
    assert fragment in output, (args, fragment, output[-1500:])
    if command != "prepare":  # prepare prints its report of findings; the others one line
        line = _one_error_line(result, command)
        assert fragment in line, (args, fragment, line)


def test_malformed_files_get_a_clear_message_naming_the_file(world, file_cases):
    assert len(file_cases) >= 20
    for args, command, fragment in file_cases:
        _check_file_case(args, command, fragment, plca_in_process(*args, cwd=world["tmp"]))


@pytest.mark.slow
def test_a_real_process_per_command_prints_what_main_prints(world, config_cases, file_cases):
    """The in-process cases stand for real runs: one case of each command, as its own interpreter, ends the
    same way (exit status and the error line) as through ``main``."""
    config, key = next(case for case in config_cases if case[1] == "train.itres")
    cases = [(["train", str(config), "--no-progress"], "train", key)]
    for command in ("evaluate", "prepare"):
        cases.append(next(case for case in file_cases if case[1] == command))
    assert {case[1] for case in cases} == {"train", "evaluate", "prepare"}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: plca(*case[0], cwd=world["tmp"]), cases))
    for (args, command, fragment), result in zip(cases, results):
        _check_file_case(args, command, fragment, result)
        again = plca_in_process(*args, cwd=world["tmp"])
        _check_file_case(args, command, fragment, again)
        assert again.returncode == result.returncode, (args, again.stderr[-1500:])
        said = [[line for line in run.stderr.splitlines() if line.startswith("plca ")] for run in (result, again)]
        assert said[0] == said[1], (args, said)
