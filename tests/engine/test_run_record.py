"""run.json: the environment of a run and its sessions, written atomically."""

import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import datetime

import pytest
import torch

import plca
from plca.engine import run_record
from plca.engine.run_record import environment, git_state, read_run_record, write_run_record

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A git repository holding a package folder ``pkg`` with a committed ``__init__.py``."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("x = 1\n")
    git("init", "-q", cwd=repo)
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first", cwd=repo)
    return repo


@needs_git
def test_git_state_names_the_commit_and_sees_changes(checkout):
    package = checkout / "pkg"
    assert git_state(package) == (git("rev-parse", "HEAD", cwd=checkout), False)
    (package / "__init__.py").write_text("x = 2\n")
    assert git_state(package) == (git("rev-parse", "HEAD", cwd=checkout), True)
    git("checkout", "--", ".", cwd=checkout)
    (package / "new.py").write_text("")  # an untracked source file changes the code too
    assert git_state(package)[1] is True


@needs_git
def test_git_state_is_null_outside_a_checkout_of_the_package(tmp_path, checkout):
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "__init__.py").write_text("")
    assert git_state(tmp_path / "loose") == (None, None)
    # a package copied (untracked) into some other repository, like an install inside a project
    (checkout / "site" / "pkg").mkdir(parents=True)
    (checkout / "site" / "pkg" / "__init__.py").write_text("")
    assert git_state(checkout / "site" / "pkg") == (None, None)


def test_git_state_without_git_is_null(checkout, monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert git_state(checkout / "pkg") == (None, None)


def test_environment_reports_this_process():
    env = environment()
    assert env["plca_version"] == plca.__version__
    assert env["torch"] == torch.__version__
    assert env["cuda"] == torch.version.cuda
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["hostname"] == socket.gethostname()
    assert env["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert len(env["gpus"]) == env["gpu_count"]
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert env["git_dirty"] in (None, True, False)
    json.dumps(env)  # serialisable as it is


def test_write_run_record_start_end_and_resume(tmp_path):
    config = {"train": {"seed": 3, "lr": 0.01}}
    argv = [os.path.join("x", "plca", "cli.py"), "train", "c.yaml", "train.seed=3"]
    started = 1_700_000_000.25
    path = write_run_record(tmp_path, config, argv, 3, started)
    record = json.loads(path.read_text())
    assert path == tmp_path / "run.json"
    assert record["seed"] == 3 and record["config"] == config and record["argv"] == argv
    assert record["command"] == f"{sys.executable} -m plca.cli train c.yaml train.seed=3"
    assert datetime.fromisoformat(record["started"]).timestamp() == pytest.approx(started, abs=1e-3)
    assert record["finished"] is None and len(record["sessions"]) == 1
    assert record["environment"]["torch"] == torch.__version__

    write_run_record(tmp_path, config, argv, 3, started, finished=started + 60.5)  # the same session ends
    record = read_run_record(tmp_path)
    assert len(record["sessions"]) == 1
    assert datetime.fromisoformat(record["finished"]).timestamp() == pytest.approx(started + 60.5, abs=1e-3)
    assert record["duration_s"] == pytest.approx(60.5)

    resumed = started + 1000
    write_run_record(tmp_path, config, argv + ["--resume", "RUN"], 3, resumed)  # a resume: one more session
    record = read_run_record(tmp_path)
    assert len(record["sessions"]) == 2 and record["finished"] is None
    assert record["started"] == record["sessions"][0]["started"] and record["argv"] == argv
    assert record["sessions"][1]["argv"][-2:] == ["--resume", "RUN"]
    write_run_record(tmp_path, config, argv, 3, resumed, finished=resumed + 10)
    assert read_run_record(tmp_path)["duration_s"] == pytest.approx(70.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporary file left


def test_write_run_record_is_atomic(tmp_path, monkeypatch):
    write_run_record(tmp_path, {"a": 1}, ["plca"], 0, 1.0)
    before = (tmp_path / "run.json").read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(run_record.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_run_record(tmp_path, {"a": 2}, ["plca"], 0, 1.0, finished=2.0)
    assert (tmp_path / "run.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_read_run_record_of_a_broken_file_is_none(tmp_path):
    assert read_run_record(tmp_path) is None
    (tmp_path / "run.json").write_text("{not json")
    assert read_run_record(tmp_path) is None
