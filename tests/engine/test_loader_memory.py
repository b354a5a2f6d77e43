"""The data stream's memory stays flat over a long run with worker processes; the measurement is
bench/loader_memory.py's."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "loader_memory.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("loader_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_memory_of_the_stream_and_its_workers_stays_flat(tmp_path):
    bench = load_bench()
    dataset = bench.build(tmp_path / "synthetic", generate=16, crop=(48, 48))
    batches = 500  # 125 epochs of the 16 scenes, through the same two worker processes
    samples = bench.measure(dataset, batches=batches, batch_size=4, workers=2, every=50)
    assert [s["workers"] for s in samples] == [2] * len(samples)  # the workers are measured, and never respawned
    assert all(s["workers_pss"] > 0 for s in samples)
    verdict = bench.growth(samples, warmup=0.2, key="total_pss")
    assert verdict["to_batch"] == batches
    assert verdict["growth"] < 16.0, samples
