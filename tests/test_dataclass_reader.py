"""The plain dataclass reader that builds the config without OmegaConf (the core install's plca.load_model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from plca.config import (ConfigError, DataConfig, DatasetConfig, EvalConfig, TrainConfig, build_config, load_config,
                         to_dict)
from plca.dataclass_reader import DataclassReadError, read_dataclass

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_omegaconf(monkeypatch):
    """This process as the core install sees it: ``import omegaconf`` fails."""
    monkeypatch.setitem(sys.modules, "omegaconf", None)
    with pytest.raises(ModuleNotFoundError):
        import omegaconf  # noqa: F401


def test_every_shipped_config_reads_back_as_omegaconf_built_it(monkeypatch):
    """A stored config (to_dict of OmegaConf's build) gives the same Config, value and type, without OmegaConf."""
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(paths) > 20
    built = {path: load_config(path) for path in paths}
    monkeypatch.setitem(sys.modules, "omegaconf", None)
    for path, reference in built.items():
        plain = build_config(to_dict(reference))
        assert plain == reference, path.name
        assert repr(to_dict(plain)) == repr(to_dict(reference)), path.name  # 1 and 1.0 compare equal; repr does not


def test_the_reader_without_omegaconf_names_a_bad_key(no_omegaconf):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.itres'; keys allowed at 'train': iters, "):
        build_config({"method": "source_only", "train": {"itres": 3}})
    with pytest.raises(ConfigError, match=r"config key 'eval\.alpha' must be a number, got 'half'"):
        build_config({"method": "source_only", "eval": {"alpha": "half"}})


def test_numbers_are_read_as_the_schema_says():
    evaluation = read_dataclass(EvalConfig, {"alpha": 1, "size": [512, 1024]})
    assert evaluation.alpha == 1.0 and type(evaluation.alpha) is float
    assert evaluation.size == [512, 1024] and evaluation.model == "student"  # absent keys: the defaults
    train = read_dataclass(TrainConfig, {"betas": [1, 0.5]})
    assert [type(beta) for beta in train.betas] == [float, float]
    for bad in (True, 2.0, "3", None):
        with pytest.raises(DataclassReadError, match=r"config key 'train\.iters' must be an integer, got "):
            read_dataclass(TrainConfig, {"iters": bad}, "train.")
    with pytest.raises(DataclassReadError, match=r"'train\.crop_size\.1' must be an integer, got 'a'"):
        read_dataclass(TrainConfig, {"crop_size": [32, "a"]}, "train.")
    with pytest.raises(DataclassReadError, match=r"'train\.flip' must be true or false, got 1"):
        read_dataclass(TrainConfig, {"flip": 1}, "train.")


def test_nested_and_optional_sections():
    data = read_dataclass(DataConfig, {"source": {"root": "/a"}, "target": {"root": "/b", "split": "val"}}, "data.")
    assert data.source == DatasetConfig(root="/a") and data.target == DatasetConfig(root="/b", split="val")
    assert read_dataclass(DataConfig, {"target": None}).target is None
    with pytest.raises(DataclassReadError, match=r"unknown config key 'data\.source\.fromat'; keys allowed at "
                                                 r"'data\.source': format, root, split$"):
        read_dataclass(DataConfig, {"source": {"fromat": "folder"}}, "data.")
    with pytest.raises(DataclassReadError, match=r"'data\.source' must be a mapping, got 'x'"):
        read_dataclass(DataConfig, {"source": "x"}, "data.")
    with pytest.raises(DataclassReadError, match=r"the config must be a mapping, got \['x'\]"):
        read_dataclass(DataConfig, ["x"])


def test_the_aggregation_notice_prints_without_tqdm(monkeypatch, capsys):
    from plca.evaluation import aggregation

    monkeypatch.setitem(sys.modules, "tqdm", None)
    aggregation._write_line("test-time aggregation: 4 windows")
    assert capsys.readouterr().out == "test-time aggregation: 4 windows\n"
