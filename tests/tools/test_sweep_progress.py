"""``plca sweep`` says, while a run trains, its step and ETA and how many of the sweep's runs are done."""

import re

import pytest

from run_checks import tiny_sweep_config
from plca.cli import main
from plca.tools.sweep_progress import duration, last_logged_step, progress_line


def test_last_logged_step_reads_the_last_step_line(tmp_path):
    log = tmp_path / "train.log"
    assert last_logged_step(log) is None  # not written yet
    log.write_text("10:00:01 INFO run dir x\n10:00:02 INFO step 3/50 | total 1.2 | lr 0.01\n"
                   "10:00:03 INFO resumed from x at step 3\n10:00:04 INFO step 12/50 | total 0.9 | lr 0.01\n"
                   "10:00:05 INFO validation at step 12\n")
    assert last_logged_step(log) == (12, 50)
    log.write_text("10:00:01 INFO checked the files\n")
    assert last_logged_step(log) is None


def test_progress_line_extrapolates_this_attempts_pace():
    # 30 steps (from 10 to 40) in 60 s: 2 s a step, 160 steps left
    assert progress_line(40, 200, 10, 60.0) == "step 40/200 (20 %), 1 min 0 s, ETA 5 min 20 s"
    assert progress_line(10, 200, 10, 5.0).endswith("ETA after its first logged steps")
    assert duration(59.4) == "59 s" and duration(3725) == "1 h 2 min"


@pytest.mark.slow
def test_a_local_sweep_says_the_runs_step_eta_and_the_runs_done(tmp_path, capsys):
    config = tiny_sweep_config(tmp_path, iters=8)
    assert main(["sweep", str(config), f"output_dir={tmp_path / 's'}", "--seeds", "0", "1",
                 "--progress-every", "0.05"]) == 0
    out = capsys.readouterr().out
    step = r"step (\d)/8 \(\d+ %\), \d+ s, ETA (\d+ s|\d+ min \d+ s|after its first logged steps)"
    assert re.search(rf"\n  s0: {step} \| sweep: 0 of 2 runs done\n", out), out  # the first run, as it trains
    assert re.search(rf"\n  s1: {step} \| sweep: 1 of 2 runs done\n", out), out
    assert re.search(r"ETA \d", out), out  # once a step is logged, an estimate
    assert re.search(r"  s0: finished, mIoU\w* [\d.]+ \| sweep: 1 of 2 runs done", out), out
    assert re.search(r"  s1: finished, mIoU\w* [\d.]+ \| sweep: 2 of 2 runs done", out), out
