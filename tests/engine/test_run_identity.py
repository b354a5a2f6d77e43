"""A run's id: in run.json and every checkpoint; a resume from another run's checkpoint is refused
(naming both runs) before anything in the directory changes; old checkpoints without an id resume
with a warning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataset_writers import write_folder
from tiny_runs import TINY_BACKBONE, plugin_env, tiny_in_process_config
from plca.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint
from plca.engine.run_identity import resume_identity
from plca.engine.run_record import read_run_record, write_run_record
from plca.engine.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_folder(root, classes_count=3, splits={"train": 4, "val": 2}, size=(32, 40), seed=3)
    return root


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``plca ARGS`` in a new process, which imports ``tiny_runs`` as a plugin (to resume tiny-backbone runs)."""
    env = plugin_env({**os.environ, "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-m", "plca.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def interrupted_run(data: Path, out: Path, name: str):
    """A source-only run of 4 updates stopped after 2 (checkpoints/last.pt at step 2)."""
    config = tiny_in_process_config(data, out, name, iters=4)
    return train(config, max_steps=2, progress=False)


def test_every_checkpoint_and_run_json_carry_the_same_run_id(data, tmp_path):
    part = interrupted_run(data, tmp_path, "a")
    run_id = read_run_record(part.run_dir)["run_id"]
    assert isinstance(run_id, str) and len(run_id) == 32 and int(run_id, 16) >= 0
    last = load_checkpoint(part.run_dir / "checkpoints" / "last.pt")
    assert last["run"]["id"] == run_id and last["run"]["method"] == "source_only" and last["final"] is False
    assert last["run"]["data"]["source"] == {"format": "folder", "root": str(data), "split": "train"}
    assert last["segmentor"]["backbone"] == TINY_BACKBONE
    done = train(tiny_in_process_config(data, tmp_path, "a", iters=4), resume=part.run_dir, progress=False)
    assert done.step == 4 and read_run_record(part.run_dir)["run_id"] == run_id  # a resume keeps the id
    for name in ("last.pt", "final.pt"):
        checkpoint = load_checkpoint(part.run_dir / "checkpoints" / name)
        assert checkpoint["run"]["id"] == run_id and checkpoint["final"] is True, name
    other = interrupted_run(data, tmp_path, "b")
    assert read_run_record(other.run_dir)["run_id"] != run_id  # each run its own


def test_cli_refuses_to_resume_a_foreign_checkpoint_and_changes_nothing(data, tmp_path):
    ours = interrupted_run(data, tmp_path, "ours").run_dir
    theirs = interrupted_run(data, tmp_path, "theirs").run_dir
    our_id, their_id = read_run_record(ours)["run_id"], read_run_record(theirs)["run_id"]
    shutil.copyfile(theirs / "checkpoints" / "last.pt", ours / "checkpoints" / "last.pt")  # the foreign file
    before = snapshot(ours)
    done = run_cli("train", "--resume", str(ours), "--no-progress")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"run {their_id} (source_only)" in lines[0] and f"run {our_id} (source_only)" in lines[0]
    assert "cannot resume" in lines[0]
    assert snapshot(ours) == before  # config.yaml, run.json, logs and checkpoints untouched


def test_an_old_checkpoint_without_a_run_id_resumes_with_a_warning(data, tmp_path):
    run_dir = interrupted_run(data, tmp_path, "old").run_dir
    run_id = read_run_record(run_dir)["run_id"]
    path = run_dir / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(path)
    for key in ("run", "final"):  # as a plca from before run ids wrote it
        del checkpoint[key]
    atomic_save(checkpoint, path)
    done = run_cli("train", "--resume", str(run_dir), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "carries no run id" in log and str(path) in log
    assert load_checkpoint(run_dir / "checkpoints" / "final.pt")["run"]["id"] == run_id  # the directory's id goes on


def record(run_dir: Path, method: str, run_id: str | None) -> None:
    write_run_record(run_dir, {"method": method}, ["plca", "train"], 0, 1.0)
    data = json.loads((run_dir / "run.json").read_text())
    data["run_id"] = run_id
    (run_dir / "run.json").write_text(json.dumps(data))


def test_resume_identity_rules(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    record(tmp_path, "plca", "a" * 32)
    # same id: accepted, silently
    assert resume_identity(tmp_path, {"run": {"id": "a" * 32, "method": "plca"}}, path) == ("a" * 32, [])
    # another id: refused, naming both ids and methods
    with pytest.raises(CheckpointError) as error:
        resume_identity(tmp_path, {"run": {"id": "b" * 32, "method": "self_training"}}, path)
    assert f"run {'b' * 32} (self_training)" in str(error.value) and f"run {'a' * 32} (plca)" in str(error.value)
    # no id in the checkpoint: accepted with a warning when the method agrees, refused when it does not
    run_id, warnings = resume_identity(tmp_path, {"config": {"method": "plca"}}, path)
    assert run_id == "a" * 32 and len(warnings) == 1 and "no run id" in warnings[0]
    with pytest.raises(CheckpointError, match=r"\(self_training\).*\(plca\)"):
        resume_identity(tmp_path, {"config": {"method": "self_training"}}, path)
    # a directory from before run ids takes the checkpoint's
    record(tmp_path, "plca", None)
    assert resume_identity(tmp_path, {"run": {"id": "c" * 32, "method": "plca"}}, path) == ("c" * 32, [])
    # neither has one: a fresh id
    run_id, warnings = resume_identity(tmp_path, {"run": {"method": "plca"}}, path)
    assert len(run_id) == 32 and run_id not in ("a" * 32, "c" * 32) and warnings
