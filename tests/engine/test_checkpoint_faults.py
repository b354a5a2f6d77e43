"""Checkpoint writes that fail or are cut short: the previous
checkpoint always survives, the error says so, and the run can be resumed from it."""

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from dataset_writers import write_folder
from tiny_runs import CLASSES, tiny_in_process_config
from plca.cli import main
from plca.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint
from plca.engine.trainer import train



def run_python(code, *args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_save({"model": {"w": torch.ones(3)}, "step": 1}, tmp_path / "last.pt")
    assert events == ["fsync file", "rename", "fsync folder"]


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_save({"model": {}, "step": 1}, tmp_path / "last.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "last.pt").st_mode) == 0o644  # readable by the group, as torch.save


def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The temporary file is /dev/full: every write fails with the kernel's ENOSPC."""
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(3)}, "step": 1}, path)
    real_open = os.open

    def open_full(name, flags, mode=0o777, **kwargs):
        if str(name).endswith(".tmp"):
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(name, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_full)
    with pytest.raises(CheckpointError) as info:
        atomic_save({"model": {"w": torch.zeros(100_000)}, "step": 2}, path)
    monkeypatch.undo()
    assert info.value.__cause__.errno == errno.ENOSPC
    assert f"could not write checkpoint '{path}' (No space left on device; " in str(info.value)
    assert "previous checkpoint there, if any, is intact" in str(info.value)
    assert load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_a_file_size_limit_keeps_the_previous_checkpoint(tmp_path):
    """A real kernel write error (EFBIG from RLIMIT_FSIZE) in the middle of torch.save."""
    proc = run_python("""
        import resource, signal, sys, torch
        from plca.engine.checkpoint import CheckpointError, atomic_save
        atomic_save({"model": {"w": torch.ones(10)}, "step": 1}, sys.argv[1])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            atomic_save({"model": {"w": torch.zeros(1_000_000)}, "step": 2}, sys.argv[1])
        except CheckpointError as error:
            print(error)
    """, tmp_path / "last.pt")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"could not write checkpoint '{tmp_path / 'last.pt'}'" in out and "is intact" in out
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path):
    proc = run_python("""
        import sys, time, torch
        from plca.engine.checkpoint import atomic_save
        atomic_save({"model": {"w": torch.ones(3)}, "step": 1}, sys.argv[1])

        def slow_save(obj, handle):  # half a zip file on disk, then the process is killed
            handle.write(b"PK\\x03\\x04" + bytes(4096))
            handle.flush()
            print("writing", flush=True)
            time.sleep(120)

        torch.save = slow_save
        atomic_save({"model": {"w": torch.zeros(3)}, "step": 2}, sys.argv[1])
    """, tmp_path / "last.pt")
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    leftovers = [name for name in os.listdir(tmp_path) if name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.") and leftovers[0].endswith(".tmp")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_folder(root, classes_count=3, splits={"train": 8}, size=(40, 56), seed=1)
    return root


@pytest.mark.slow
def test_full_disk_during_training_stops_the_run_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch,
                                                                              capsys):
    real_save = torch.save
    calls = {"n": 0}

    def save_until_the_disk_is_full(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the checkpoint of step 3: a partial write, then ENOSPC
            handle.write(b"PK\x03\x04" + bytes(1000))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(CheckpointError) as info:
        train(tiny_in_process_config(data, tmp_path), progress=False)
    run_dir = tmp_path / "run"
    message = str(info.value)
    assert f"could not write checkpoint '{run_dir / 'checkpoints' / 'last.pt'}' (No space left on device" in message
    assert "Training stopped at step 3; the previous last.pt is intact (it holds step 2)" in message
    assert "Free disk space" in message and f"plca train --resume {run_dir}" in message
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2
    assert os.listdir(run_dir / "checkpoints") == ["last.pt"]

    # space freed: the resumed run continues from step 2; a temporary file of a killed write is cleaned up
    monkeypatch.undo()
    (run_dir / "checkpoints" / ".last.pt.0123abcd.tmp").write_bytes(b"partial")
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 4
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["final.pt", "last.pt"]  # the temporary file is gone


@pytest.mark.slow
def test_cli_reports_a_failed_checkpoint_without_traceback(data, tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    config = tmp_path / "c.yaml"
    config.write_text(f"""
method: source_only
data: {{classes: {CLASSES}, source: {{format: folder, root: {data}, split: train}}, num_workers: 0}}
model: {{backbone: resnet18, style: pytorch}}
train: {{iters: 2, batch_size: 2, crop_size: [32, 32], checkpoint_every: 1, eval_every: 0, image_every: 0}}
device: cpu
output_dir: {tmp_path / 'runs'}
run_name: r
""")
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the previous last.pt is intact (if there is one)" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_full_disk_for_the_logs_is_a_warning_not_the_end_of_the_run(data, tmp_path, monkeypatch):
    import builtins

    import plca.engine.run_files as run_files

    def open_without_space(path, mode="r", *args, **kwargs):
        if str(path).endswith(".jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(run_files, "open", open_without_space, raising=False)
    result = train(tiny_in_process_config(data, tmp_path, iters=2, checkpoint_every=100), progress=False)
    assert result.step == 2 and load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["step"] == 2
    log = (result.run_dir / "train.log").read_text()
    assert "could not append to" in log and "scalars.jsonl" in log and "training goes on" in log
