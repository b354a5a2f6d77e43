"""Without an extra, a command says which extra to install, in one line, with exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import plca.cli
from plca.console import EXTRA_OF_MODULE, command_of, main, missing_extra

ROOT = Path(__file__).resolve().parent.parent


def test_a_command_without_its_extra_names_it(tmp_path):
    """The [train] extra's packages blocked (what the core install lacks): `plca config` names [train]."""
    train = sorted(name for name, extra in EXTRA_OF_MODULE.items() if extra == "train")
    (tmp_path / "x.yaml").write_text("method: source_only\n")
    code = (f"import sys; sys.modules.update(dict.fromkeys({train!r}))\n"
            "from plca.console import main\n"
            "sys.exit(main(['config', 'x.yaml']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"plca config: error: this command needs the \[train\] extra \(module '(\w+)' is not installed\): "
        r"pip install 'plca\[train\]'", lines[0]), lines
    assert re.search(r"module '(\w+)'", lines[0])[1] in train


def test_a_missing_module_of_no_extra_is_a_bug_and_raises(monkeypatch):
    def broken(argv):
        raise ModuleNotFoundError("No module named 'nonexistent_thing'", name="nonexistent_thing")

    monkeypatch.setattr(plca.cli, "main", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["train", "x.yaml"])


def test_a_missing_module_of_an_extra_inside_a_command(monkeypatch, capsys):
    def needs_matplotlib(argv):
        raise ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")

    monkeypatch.setattr(plca.cli, "main", needs_matplotlib)
    assert main(["report", "runs/a"]) == 2
    assert "plca report: error: this command needs the [report] extra" in capsys.readouterr().err


def test_each_extra_named_is_declared_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    for extra in set(EXTRA_OF_MODULE.values()):
        assert f"\n{extra} = [" in text, extra
    assert missing_extra(ModuleNotFoundError(name="submitit")) == "slurm"
    assert command_of(["--no-progress", "sweep", "c.yaml"]) == "sweep" and command_of([]) == "plca"
