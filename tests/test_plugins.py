"""Plugins: modules named in $PLCA_PLUGINS and entry points of the group plca.plugins are imported by the
``plca`` command (and its child processes) and by ``plca.load_model``; a broken one stops the command with
one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

from dataset_writers import write_folder
from processes import plca_in_process
from plca.engine.checkpoint import load_checkpoint
from plca.plugins import ENV_VAR, PluginError, import_plugins, plugin_modules

ROOT = Path(__file__).resolve().parent.parent
TOY = "toy_plugin_net"

#: A user's plugin module: registers a backbone of two convolutions under TOY.
TOY_PLUGIN = textwrap.dedent(f'''
    import torch.nn.functional as F
    from torch import nn

    from plca.models.registry import IMAGENET_RGB, BackboneContract, register_backbone


    @register_backbone("{TOY}", contract=BackboneContract(family="toy plugin net", normalization=IMAGENET_RGB))
    class ToyPluginNet(nn.Module):
        out_channels = (4, 8)
        strides = (4, 8)

        def __init__(self, style=None):
            super().__init__()
            self.style = style
            self.fine = nn.Conv2d(3, 4, 3, stride=4, padding=1)
            self.coarse = nn.Conv2d(4, 8, 3, stride=2, padding=1)

        def forward(self, x):
            fine = F.relu(self.fine(x))
            return [fine, F.relu(self.coarse(fine))]
''')


def env_with(plugins: str | None, *paths: Path) -> dict[str, str]:
    """This environment, one torch thread, ``paths`` and the repository first on PYTHONPATH, and
    ``PLCA_PLUGINS=plugins`` (removed when None)."""
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([*map(str, paths), str(ROOT)]))
    if plugins is not None:
        env[ENV_VAR] = plugins
    return env


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A folder dataset, the toy plugin and a broken one in ``plugins/``, and a config of 2 updates on TOY."""
    root = tmp_path_factory.mktemp("plugins")
    write_folder(root / "data", classes_count=3, splits={"train": 4, "val": 2}, size=(32, 40), seed=1)
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "toy_plugin.py").write_text(TOY_PLUGIN)
    (plugins / "broken_plugin.py").write_text("raise RuntimeError('the plugin is broken\\non two lines')\n")
    config = root / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "method": "source_only",
        "data": {"classes": ["road", "car", "sky"], "num_workers": 0,
                 "source": {"format": "folder", "root": str(root / "data"), "split": "train"},
                 "val": {"format": "folder", "root": str(root / "data"), "split": "val"}},
        "model": {"backbone": TOY},
        "train": {"iters": 2, "batch_size": 2, "crop_size": [32, 32], "lr": 0.01, "eval_every": 0,
                  "checkpoint_every": 1, "log_every": 1, "image_every": 0},
        "output_dir": str(root / "runs"), "run_name": "toy", "device": "cpu",
    }))
    return {"root": root, "plugins": plugins, "config": config}


@pytest.fixture(scope="module")
def trained(world) -> subprocess.CompletedProcess:
    """``python -m plca.cli train toy.yaml`` with PLCA_PLUGINS naming the toy plugin (and a blank name)."""
    return run(["-m", "plca.cli", "train", str(world["config"]), "--no-progress"],
               env_with(" toy_plugin, ,", world["plugins"]), cwd=world["root"])


# ------------------------------------------------------------------ in this process


def test_plugin_names_are_split_on_commas():
    assert plugin_modules(None) == [] and plugin_modules("") == [] and plugin_modules(" , ") == []
    assert plugin_modules("a, b.c ,,a") == ["a", "b.c"]


def test_a_failing_plugin_is_named_with_where_it_was_named(world, monkeypatch):
    monkeypatch.syspath_prepend(str(world["plugins"]))
    with pytest.raises(PluginError) as caught:
        import_plugins(["broken_plugin"], [])
    assert str(caught.value) == ("plugin 'broken_plugin' (named in $PLCA_PLUGINS) failed to import: "
                                 "RuntimeError: the plugin is broken on two lines")
    with pytest.raises(PluginError, match=r"plugin 'no_such_plugin_xyz' \(named in \$PLCA_PLUGINS\) failed to "
                                          r"import: ModuleNotFoundError: No module named 'no_such_plugin_xyz'"):
        import_plugins(["no_such_plugin_xyz"], [])
    entry = EntryPoint("mine", "broken_plugin", "plca.plugins")
    with pytest.raises(PluginError) as caught:
        import_plugins([], [entry])
    assert str(caught.value) == ("plugin entry point 'mine = broken_plugin' of an installed distribution, group "
                                 "plca.plugins failed to load: RuntimeError: the plugin is broken on two lines")


def test_an_entry_point_naming_a_function_is_called(tmp_path, monkeypatch):
    (tmp_path / "ep_calls.py").write_text("CALLS = []\n\ndef register():\n    CALLS.append('called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = import_plugins(["ep_calls"], [EntryPoint("calls", "ep_calls:register", "plca.plugins")])
    import ep_calls

    assert loaded == ("ep_calls", "calls = ep_calls:register") and ep_calls.CALLS == ["called"]


def test_without_the_plugin_the_backbone_is_unknown(world):
    """What the plugin adds: in this process nobody imported it, so the config is refused by name."""
    result = plca_in_process("train", str(world["config"]), "--no-progress", cwd=world["root"])
    assert result.returncode == 2 and "model.backbone" in result.stderr and TOY in result.stderr


# ------------------------------------------------------------------ in child processes, as a user runs them


@pytest.mark.slow
def test_a_plugin_backbone_trains_in_a_plca_process(world, trained):
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = load_checkpoint(world["root"] / "runs" / "toy" / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 2 and checkpoint["segmentor"]["backbone"] == TOY
    assert "fine.weight" in "".join(checkpoint["model"])  # the plugin's own layers were trained and saved
    record = json.loads((world["root"] / "runs" / "toy" / "run.json").read_text())
    assert record["sessions"][-1]["environment"]["plugins"] == ["toy_plugin"]  # the run says what it loaded


@pytest.mark.slow
def test_load_model_imports_the_plugins(world, trained):
    assert trained.returncode == 0, trained.stderr[-3000:]
    code = ("import plca; model = plca.load_model('runs/toy'); "
            "print(type(model.network.backbone).__name__, model.classes)")
    result = run(["-c", code], env_with("toy_plugin", world["plugins"]), cwd=world["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "ToyPluginNet"


@pytest.mark.slow
@pytest.mark.parametrize("plugins, named", [
    ("toy_plugin,broken_plugin", "plugin 'broken_plugin' (named in $PLCA_PLUGINS) failed to import: RuntimeError: "
                                 "the plugin is broken on two lines"),
    ("no_such_plugin_xyz", "plugin 'no_such_plugin_xyz' (named in $PLCA_PLUGINS) failed to import: "
                           "ModuleNotFoundError: No module named 'no_such_plugin_xyz'"),
])
def test_a_broken_plugin_stops_the_command_in_one_line(world, plugins, named):
    """Through the console command (which would name an extra for some missing modules): exit 2, one line."""
    result = run(["-m", "plca.console", "train", str(world["config"])], env_with(plugins, world["plugins"]),
                 cwd=world["root"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"plca: error: {named}"]


def write_distribution(folder: Path, entry: str) -> None:
    """An installed distribution 'toy-plugins' 1.0 in ``folder`` (its ``.dist-info``), whose entry point of
    the group plca.plugins is ``entry``; ``folder`` also holds the toy plugin."""
    info = folder / "toy_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[plca.plugins]\n{entry}\n")
    (folder / "toy_plugin.py").write_text(TOY_PLUGIN)
    (folder / "broken_plugin.py").write_text("raise RuntimeError('broken on import')\n")


@pytest.mark.slow
def test_an_entry_point_of_an_installed_distribution_is_loaded(world, tmp_path):
    write_distribution(tmp_path / "site", "toy = toy_plugin")
    result = run(["-m", "plca.cli", "config", "--show", str(world["config"])], env_with(None, tmp_path / "site"),
                 cwd=world["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"backbone: {TOY}" in result.stdout


@pytest.mark.slow
def test_a_broken_entry_point_names_its_distribution(world, tmp_path):
    write_distribution(tmp_path / "site", "bad = broken_plugin")
    result = run(["-m", "plca.cli", "config", "--show", str(world["config"])], env_with(None, tmp_path / "site"),
                 cwd=world["root"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "plca: error: plugin entry point 'bad = broken_plugin' of the distribution 'toy-plugins' 1.0, group "
        "plca.plugins failed to load: RuntimeError: broken on import"]
