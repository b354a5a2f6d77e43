"""A run's train.log is closed when train() returns: later lines of the same process stay out of it."""

import logging

from dataset_writers import write_folder
from tiny_runs import tiny_in_process_config

from plca.engine.trainer import train


def test_lines_after_a_run_do_not_go_into_its_log(tmp_path):
    write_folder(tmp_path / "data", classes_count=3, splits={"train": 4})
    first = train(tiny_in_process_config(tmp_path / "data", tmp_path / "runs", "first", iters=1), progress=False)
    logging.getLogger("plca").info("a line after the first run")
    second = train(tiny_in_process_config(tmp_path / "data", tmp_path / "runs", "second", iters=1), progress=False)
    logging.getLogger("plca").info("a line after the second run")
    first_log, second_log = ((run.run_dir / "train.log").read_text() for run in (first, second))
    assert "finished at step 1" in first_log and "finished at step 1" in second_log
    assert "after the first run" not in first_log and "after the first run" not in second_log
    assert "after the second run" not in second_log
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("plca").handlers)
