"""The demo's configs and its mean +- sd table."""

import math
import statistics

import pytest

from plca.demo import DEMO_METHODS, demo_config, spread_table


def _metrics(road: float | None, car: float, miou: float) -> dict:
    return {"mIoU": miou, "per_class_IoU": {"road": road, "car": car}}


def test_spread_table_gives_the_mean_and_sample_sd_of_each_class_and_the_miou():
    results = {"A": [_metrics(10.0, 30.0, 20.0), _metrics(20.0, 50.0, 35.0), _metrics(30.0, 40.0, 35.0)],
               "B": [_metrics(None, 1.0, 1.0), _metrics(5.0, 3.0, 4.0)]}
    lines = spread_table(results, ["road", "car"]).splitlines()

    assert lines[0] == "| method | road | car | mIoU |"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "A (n=3)"
    # road 10/20/30: mean 20, sample sd 10 (population sd would be 8.2)
    assert cells[1] == "20.0 +- 10.0"
    assert cells[2] == f"40.0 +- {statistics.stdev([30.0, 50.0, 40.0]):.1f}" == "40.0 +- 10.0"
    assert cells[3] == f"30.0 +- {math.sqrt(75):.1f}"
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells == ["B (n=2)", "-", "2.0 +- 1.4", "2.5 +- 2.1"]


@pytest.mark.parametrize("method", list(DEMO_METHODS))
def test_every_demo_method_has_a_valid_config_with_the_same_budget(method, tmp_path):
    config = demo_config(method, tmp_path / "data", tmp_path / "runs", seed=3, iters=7)
    assert config.train.iters == 7 and config.train.seed == 3
    assert config.train.lr == demo_config("source_only", tmp_path / "data", tmp_path / "runs", 3, 7,
                                          "source_train").train.lr
    with_association = method in ("plca", "self_training_plca")
    assert (config.plca is not None and config.plca.association.feature_weight > 0) == with_association
    assert (config.plca is None) == (method == "source_only")
