"""plca sweep: grid x seeds of real tiny runs, the manifest, resume and skip, failures, the
aggregated mean +- sd table, and the submitit (local executor) path."""

import csv
import json
import pickle
import statistics
import sys
from pathlib import Path

import pytest
from PIL import Image

from run_checks import tiny_sweep_config
from tiny_runs import TINY_BACKBONE, plugin_env
from plca.cli import main
from plca.plugins import ENV_VAR
from plca.tools.sweep import (SweepError, TrainJob, check_same_sweep, parse_grid, parse_seeds, plan_runs, run_name,
                              run_sweep, split_values)
from plca.tools.sweep_table import aggregate, read_manifest, write_results

CLASSES = ["road", "car", "sky"]


@pytest.fixture(scope="module", autouse=True)
def tiny_backbone_in_the_runs():
    """The sweep's runs are ``plca`` processes: they import ``tests/tiny_runs.py`` as a plugin and train
    the tiny test backbone (kilobyte checkpoints instead of ResNet-18's 90 MB)."""
    with pytest.MonkeyPatch.context() as patch:
        for key in (ENV_VAR, "PYTHONPATH"):
            patch.setenv(key, plugin_env()[key])
        yield


# --------------------------------------------------------------------------- the plan


def test_grid_values_split_on_top_level_commas_only():
    assert split_values("0.01,0.02") == ["0.01", "0.02"]
    assert split_values("[32,32],[64, 64]") == ["[32,32]", "[64, 64]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert parse_grid(["train.lr=0.01,0.02", "method=plca"]) == {"train.lr": ["0.01", "0.02"], "method": ["plca"]}


@pytest.mark.parametrize("specs, message", [
    (["train.lr"], "must look like"),
    (["train.seed=1,2"], "use --seeds"),
    (["run_name=a,b"], "cannot be a grid key"),
    (["train.lr=0.1,,0.2"], "empty value"),
    (["train.lr=0.1,0.1"], "repeats"),
    (["train.lr=0.1", "train.lr=0.2"], "given twice"),
])
def test_bad_grids_are_refused(specs, message):
    with pytest.raises(SweepError, match=message):
        parse_grid(specs)


def test_seeds():
    assert parse_seeds(["0", "2", "1", "2"]) == [0, 2, 1]
    assert parse_seeds(["0,1,2"]) == [0, 1, 2]
    for bad in (["x"], ["-1"], []):
        with pytest.raises(SweepError):
            parse_seeds(bad)


def test_run_names_are_safe_and_distinct():
    assert run_name({"train.lr": "0.01"}, 0) == "train.lr=0.01_s0"
    assert run_name({}, 3) == "s3"
    a, b = run_name({"data.classes": "[a,b]"}, 0), run_name({"data.classes": "(a,b)"}, 0)
    assert a != b and "/" not in a and "[" not in a and " " not in a
    long = run_name({"model.backbone": "x" * 300}, 0)
    assert len(long) <= 120 and long != run_name({"model.backbone": "x" * 299}, 0)
    slashed = run_name({"model.backbone": "timm/resnet"}, 1)
    assert "/" not in slashed and slashed.startswith("model.backbone=timm-resnet")


def test_plan_is_the_product_of_grid_and_seeds():
    runs = plan_runs({"train.lr": ["0.1", "0.2"], "method": ["a", "b"]}, [0, 1], ["x=1", "output_dir=o"], "/s/runs")
    assert len(runs) == 8
    assert [(r.params["train.lr"], r.params["method"], r.seed) for r in runs[:3]] == [
        ("0.1", "a", 0), ("0.1", "a", 1), ("0.1", "b", 0)]
    assert runs[0].overrides == ("x=1", "train.lr=0.1", "method=a", "train.seed=0", "output_dir=/s/runs",
                                 "run_name=train.lr=0.1_method=a_s0")
    assert len({r.name for r in runs}) == 8


def test_train_job_commands_and_pickling(tmp_path):
    job = TrainJob(config="/c.yaml", overrides=["a=1"], run_dir=str(tmp_path / "run"), stdout="o", stderr="e",
                   cwd=str(tmp_path))
    train = ["-m", "plca.cli", "train", "/c.yaml", "a=1", "--no-progress"]
    assert job.command() == [sys.executable, *train]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    resume = [*train, "--resume", str(tmp_path / "run")]
    assert job.command() == [sys.executable, *resume]
    job.nproc_per_node = 4
    assert job.command() == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                             *resume]
    job.nnodes = 2
    assert job.command("node7:29400", "123") == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4", "--rdzv_backend",
        "c10d", "--rdzv_endpoint", "node7:29400", "--rdzv_id", "123", *resume]
    with pytest.raises(SweepError, match="rendezvous"):
        job.command()
    assert pickle.loads(pickle.dumps(job)) == job


def test_another_base_config_is_refused():
    manifest = {"config": "a.yaml", "base_overrides": [], "grid": {"train.lr": ["0.1"]}, "runs": [{"name": "x"}],
                "base_config": {"train": {"lr": 0.1, "iters": 4, "seed": 0}, "output_dir": "o"}}
    # the grid key, the seed and output_dir may differ; nothing else
    check_same_sweep(manifest, {"train": {"lr": 0.5, "iters": 4, "seed": 9}, "output_dir": "p"},
                     {"train.lr": ["0.5"]}, Path("o"))
    with pytest.raises(SweepError, match=r"train\.iters: 4 in the sweep, 5 now"):
        check_same_sweep(manifest, {"train": {"lr": 0.1, "iters": 5}, "output_dir": "o"}, {"train.lr": ["0.1"]},
                         Path("o"))
    with pytest.raises(SweepError, match="grid keys"):
        check_same_sweep(manifest, manifest["base_config"], {"method": ["plca"]}, Path("o"))


# --------------------------------------------------------------------------- aggregation


def fake_sweep(root: Path, runs: list[tuple[str, int, dict | None, str]]) -> Path:
    """A sweep directory with a manifest over ``train.lr`` and, per run (lr, seed, metrics or None, status),
    a metrics.json."""
    entries = []
    for lr, seed, metrics, status in runs:
        name = f"train.lr={lr}_s{seed}"
        entries.append({"name": name, "run_dir": f"runs/{name}", "params": {"train.lr": lr}, "seed": seed,
                        "status": status, "returncode": 2 if status == "failed" else 0,
                        "stderr_tail": ["Traceback", "ValueError: bad lr"] if status == "failed" else None})
        if metrics is not None:
            (root / "runs" / name).mkdir(parents=True)
            (root / "runs" / name / "metrics.json").write_text(json.dumps(metrics))
    lrs = list(dict.fromkeys(lr for lr, *_ in runs))
    (root / "manifest.json").write_text(json.dumps({"config": "c.yaml", "base_overrides": [], "seeds": [0, 1, 2],
                                                    "grid": {"train.lr": lrs}, "runs": entries}))
    return root


def metrics_of(road, car, sky, extra_protocol=None):
    per_class = {"road": road, "car": car, "sky": sky}
    defined = [v for v in per_class.values() if v is not None]
    protocols = {"mIoU3": {"mIoU": sum(defined) / len(defined), "classes": CLASSES}}
    if extra_protocol is not None:
        protocols["mIoU2"] = {"mIoU": extra_protocol, "classes": CLASSES[:2]}
    return {"mIoU": protocols["mIoU3"]["mIoU"], "protocol": "mIoU3", "per_class_IoU": per_class,
            "protocols": protocols}


def test_aggregate_means_sample_sd_flags_and_left_out_runs(tmp_path):
    sweep = fake_sweep(tmp_path, [
        ("0.1", 0, metrics_of(90.0, 40.0, 10.0, 65.0), "finished"),
        ("0.1", 1, metrics_of(92.0, 45.0, 12.0, 68.5), "finished"),
        ("0.1", 2, metrics_of(91.0, 5.0, None, 48.0), "finished"),  # car collapsed; sky undefined
        ("0.2", 0, metrics_of(80.0, 30.0, 20.0), "finished"),
        ("0.2", 1, None, "failed"),
        ("0.2", 2, None, "running"),
        ("0.3", 0, metrics_of(1.0, 2.0, 3.0), "failed"),  # failed: never averaged, even with a metrics.json
    ])
    table = aggregate(sweep, threshold=10.0)
    assert [row.params for row in table.rows] == [{"train.lr": "0.1"}, {"train.lr": "0.2"}]
    first, second = table.rows
    mious = [metrics_of(90.0, 40.0, 10.0)["mIoU"], metrics_of(92.0, 45.0, 12.0)["mIoU"],
             metrics_of(91.0, 5.0, None)["mIoU"]]
    assert first.n_seeds == 3 and first.miou.seeds == [0, 1, 2]
    assert first.miou.mean == pytest.approx(statistics.mean(mious))
    assert first.miou.std == pytest.approx(statistics.stdev(mious))
    assert first.classes["car"].std == pytest.approx(statistics.stdev([40.0, 45.0, 5.0]))
    assert first.classes["sky"].values == [10.0, 12.0] and first.classes["sky"].seeds == [0, 1]
    assert first.protocols["mIoU2"].mean == pytest.approx(statistics.mean([65.0, 68.5, 48.0]))
    assert first.flagged == ["car"]  # range 40 > 10; road spans 2, sky 2
    assert second.n_seeds == 1 and second.miou.std is None and second.flagged == []
    assert {name for name, _ in table.not_averaged} == {"train.lr=0.2_s1", "train.lr=0.2_s2", "train.lr=0.3_s0"}
    why = dict(table.not_averaged)
    assert why["train.lr=0.2_s1"] == "failed (exit 2): ValueError: bad lr"
    assert why["train.lr=0.2_s2"] == "no metrics.json (running)"
    assert aggregate(sweep, threshold=50.0).rows[0].flagged == []

    paths = write_results(table, tmp_path / "out")
    with open(paths["results.csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["train.lr"] for row in rows] == ["0.1", "0.2"]
    assert float(rows[0]["mIoU_mean"]) == pytest.approx(statistics.mean(mious), abs=1e-6)
    assert float(rows[0]["mIoU_std"]) == pytest.approx(statistics.stdev(mious), abs=1e-6)
    assert float(rows[0]["car_mean"]) == pytest.approx(30.0) and rows[0]["flagged_classes"] == "car"
    assert rows[1]["mIoU_std"] == "n/a" and rows[1]["n_seeds"] == "1"
    assert rows[1]["mIoU2_mean"] == "n/a" and float(rows[0]["mIoU3_mean"]) == pytest.approx(statistics.mean(mious))
    text = paths["results.md"].read_text()
    assert f"{statistics.mean(mious):.2f} ± {statistics.stdev(mious):.2f}" in text
    assert "30.00 ± 21.79 ⚠" in text  # car of lr=0.1
    assert f"{metrics_of(80.0, 30.0, 20.0)['mIoU']:.2f} ± n/a" in text
    assert "lr=0.1: car spans 40.0 points (s0 40.0, s1 45.0, s2 5.0)" in text
    assert "`train.lr=0.2_s1` | failed (exit 2): ValueError: bad lr" in text
    assert Image.open(paths["results.png"]).size[0] > 500


def test_aggregate_of_a_directory_without_manifest(tmp_path):
    with pytest.raises(SweepError, match="no manifest.json"):
        aggregate(tmp_path)


# --------------------------------------------------------------------------- real runs


def tiny_config(root: Path) -> Path:
    return tiny_sweep_config(root, iters=4, backbone=TINY_BACKBONE)


def test_cli_dry_run_lists_the_plan(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main(["sweep", str(config), "--seeds", "0", "1", f"output_dir={tmp_path / 's'}", "--grid",
                 "train.lr=0.01,0.02", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("would train") == 4 and "train.lr=0.02_s1" in out
    assert f"output_dir={(tmp_path / 's' / 'runs').absolute()}" in out
    assert not (tmp_path / "s").exists()  # nothing written
    assert main(["sweep", str(config), "train.seed=1", "--dry-run"]) == 2
    assert "use --seeds" in capsys.readouterr().err


def manifest_runs(sweep: Path) -> dict:
    return {entry["name"]: entry for entry in read_manifest(sweep)["runs"]}


def metrics(sweep: Path, name: str) -> dict:
    return json.loads((sweep / "runs" / name / "metrics.json").read_text())


GRID = ["--grid", "train.lr=0.01,0.02"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2 lr x 2 seed sweep; one run was interrupted at step 2 of 4 before the sweep started."""
    root = tmp_path_factory.mktemp("sweep")
    config = tiny_config(root)
    sweep_dir = root / "lr_sweep"
    interrupted = ["train.lr=0.01", "train.seed=0", f"output_dir={(sweep_dir / 'runs').absolute()}",
                   "run_name=train.lr=0.01_s0"]
    assert main(["train", str(config), *interrupted, "train.iters=2", "--no-progress"]) == 0
    (sweep_dir / "runs" / "train.lr=0.01_s0" / "metrics.json").unlink()  # as if stopped before the end
    lines = []
    outcome = run_sweep(config, ["0", "1"], ["train.lr=0.01,0.02"], [f"output_dir={sweep_dir}"], echo=lines.append)
    return {"config": config, "dir": sweep_dir, "outcome": outcome, "log": "\n".join(lines),
            "base": [str(config), f"output_dir={sweep_dir}", "--seeds", "0", "1", *GRID]}


NAMES = ["train.lr=0.01_s0", "train.lr=0.01_s1", "train.lr=0.02_s0", "train.lr=0.02_s1"]


@pytest.mark.slow
def test_sweep_trains_every_run_and_aggregates_them(sweep):
    sweep_dir, outcome = sweep["dir"], sweep["outcome"]
    assert outcome.exit_code == 0 and outcome.failed == [] and sorted(outcome.trained) == NAMES
    manifest = read_manifest(sweep_dir)
    assert manifest["grid"] == {"train.lr": ["0.01", "0.02"]} and manifest["seeds"] == [0, 1]
    assert manifest["base_overrides"] == [f"output_dir={sweep_dir}"] and manifest["config"] == str(sweep["config"])
    runs = manifest_runs(sweep_dir)
    for name in NAMES:
        entry = runs[name]
        assert entry["status"] == "finished" and entry["returncode"] == 0
        assert entry["started"] <= entry["finished"]
        assert f"run_name={name}" in entry["overrides"] and f"train.seed={entry['seed']}" in entry["overrides"]
        assert metrics(sweep_dir, name)["step"] == 4
        # run.json is written by the trainer (through plca.engine.run_record)
        record = json.loads((sweep_dir / "runs" / name / "run.json").read_text())
        assert record["seed"] == entry["seed"] and record["finished"] is not None
        assert record["config"]["train"]["lr"] == float(entry["params"]["train.lr"])
        assert record["environment"]["torch"]
    # the interrupted run was resumed from its checkpoint at step 2, not started again
    resumed = runs["train.lr=0.01_s0"]
    assert resumed["action"] == "resumed" and "--resume" in resumed["command"]
    assert "resumed from" in (sweep_dir / "runs" / "train.lr=0.01_s0" / "train.log").read_text()
    assert len(json.loads((sweep_dir / "runs" / "train.lr=0.01_s0" / "run.json").read_text())["sessions"]) == 2
    assert {runs[name]["action"] for name in NAMES[1:]} == {"started"}

    with open(sweep_dir / "results.csv") as handle:
        rows = {row["train.lr"]: row for row in csv.DictReader(handle)}
    text = (sweep_dir / "results.md").read_text()
    for lr in ("0.01", "0.02"):
        found = [metrics(sweep_dir, f"train.lr={lr}_s{seed}") for seed in (0, 1)]
        mious = [m["mIoU"] for m in found]
        row = rows[lr]
        assert row["n_seeds"] == "2" and row["seeds"] == "0;1"
        assert float(row["mIoU_mean"]) == pytest.approx(statistics.mean(mious), abs=1e-6)
        assert float(row["mIoU_std"]) == pytest.approx(statistics.stdev(mious), abs=1e-6)
        assert f"{statistics.mean(mious):.2f} ± {statistics.stdev(mious):.2f}" in text
        flagged = []
        for name in CLASSES:
            values = [m["per_class_IoU"][name] for m in found if m["per_class_IoU"][name] is not None]
            assert float(row[f"{name}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-6)
            assert float(row[f"{name}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
            flagged += [name] if max(values) - min(values) > 10 else []
        assert row["flagged_classes"] == ";".join(flagged)
        assert float(row["mIoU3_mean"]) == pytest.approx(statistics.mean(m["protocols"]["mIoU3"]["mIoU"]
                                                                         for m in found), abs=1e-6)
    assert Image.open(sweep_dir / "results.png").size[0] > 500
    assert "mIoU3" in sweep["log"] and "results:" in sweep["log"]


@pytest.mark.slow
def test_rerun_skips_finished_runs(sweep, capsys):
    sweep_dir = sweep["dir"]
    stamps = {name: (sweep_dir / "runs" / name / "metrics.json").stat().st_mtime_ns for name in NAMES}
    assert main(["sweep", *sweep["base"]]) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    runs = manifest_runs(sweep_dir)
    for name in NAMES:
        assert (sweep_dir / "runs" / name / "metrics.json").stat().st_mtime_ns == stamps[name]
        assert runs[name]["action"] == "skipped" and runs[name]["status"] == "finished"


@pytest.mark.slow
def test_another_base_config_or_grid_is_refused_in_the_same_directory(sweep, capsys):
    sweep_dir = sweep["dir"]
    before = (sweep_dir / "manifest.json").read_bytes()
    assert main(["sweep", *sweep["base"], "train.iters=5"]) == 2
    err = capsys.readouterr().err
    assert "another base config" in err and "train.iters: 4 in the sweep, 5 now" in err
    assert main(["sweep", str(sweep["config"]), f"output_dir={sweep_dir}", "--grid", "train.batch_size=2"]) == 2
    assert "grid keys" in capsys.readouterr().err
    assert (sweep_dir / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_report_of_a_sweep(sweep, capsys):
    sweep_dir = sweep["dir"]
    assert main(["report", str(sweep_dir)]) == 0
    assert str(sweep_dir / "report" / "report.md") in capsys.readouterr().out
    text = (sweep_dir / "report" / "report.md").read_text()
    assert "lr=0.01 s0" in text and "| config | `train.lr` |" in text and "## Differences" in text
    for name in ("results.md", "results.csv", "results.png", "training_curves.png"):
        assert (sweep_dir / "report" / name).is_file()


@pytest.mark.slow
def test_new_values_extend_the_sweep_and_a_failed_run_does_not_stop_it(sweep, capsys):
    sweep_dir = sweep["dir"]
    code = main(["sweep", str(sweep["config"]), f"output_dir={sweep_dir}", "--seeds", "0",
                 "--grid", "train.lr=bad,0.03"])
    assert code == 1  # a run failed
    runs = manifest_runs(sweep_dir)
    assert set(NAMES) <= set(runs) and {"train.lr=bad_s0", "train.lr=0.03_s0"} <= set(runs)
    failed = runs["train.lr=bad_s0"]
    assert failed["status"] == "failed" and failed["returncode"] == 2
    assert any("train.lr" in line for line in failed["stderr_tail"])
    assert runs["train.lr=0.03_s0"]["status"] == "finished"  # the sweep went on after the failure
    assert "FAILED (exit 2)" in capsys.readouterr().out
    manifest = read_manifest(sweep_dir)
    assert manifest["grid"]["train.lr"][:2] == ["0.01", "0.02"] and {"bad", "0.03"} <= set(manifest["grid"]["train.lr"])
    with open(sweep_dir / "results.csv") as handle:
        rows = {row["train.lr"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"0.01", "0.02", "0.03"}  # the failed value is listed, not averaged
    assert rows["0.03"]["n_seeds"] == "1" and rows["0.03"]["mIoU_std"] == "n/a"
    assert float(rows["0.03"]["mIoU_mean"]) == pytest.approx(metrics(sweep_dir, "train.lr=0.03_s0")["mIoU"])
    text = (sweep_dir / "results.md").read_text()
    assert "## Runs not averaged" in text and "`train.lr=bad_s0` | failed (exit 2)" in text


@pytest.mark.slow
def test_submitit_local_executor_runs_the_jobs(tmp_path, capsys):
    config = tiny_config(tmp_path)
    sweep_dir = tmp_path / "submitit_sweep"
    code = main(["sweep", str(config), f"output_dir={sweep_dir}", "--seeds", "0", "1", "--launcher", "submitit-local",
                 "--gpus-per-node", "0", "--time", "10"])
    assert code == 0, capsys.readouterr()
    runs = manifest_runs(sweep_dir)
    assert set(runs) == {"s0", "s1"}
    job_ids = {entry["job_id"] for entry in runs.values()}
    assert len(job_ids) == 2 and all(job_ids)
    for entry in runs.values():
        assert entry["status"] == "finished" and entry["launcher"] == "submitit-local" and entry["returncode"] == 0
        assert (sweep_dir / "slurm" / entry["job_id"]).is_dir()  # submitit's own files
        assert metrics(sweep_dir, entry["name"])["step"] == 4
    assert (sweep_dir / "results.csv").is_file()


# --------------------------------------------------------------------------- Slurm, without a cluster


class FakeSlurmJob:
    states: dict[str, str] = {}

    def __init__(self, folder=None, job_id="0"):
        self.job_id = job_id

    @property
    def state(self):
        return self.states.get(self.job_id, "UNKNOWN")


class FakeExecutor:
    """Records what submitit's AutoExecutor is asked to do."""

    made: list = []
    count = 100  # job ids, as Slurm numbers them: never twice

    def __init__(self, folder, cluster):
        self.folder, self.cluster, self.parameters, self.submitted = folder, cluster, {}, []
        self.made.append(self)

    def update_parameters(self, **parameters):
        self.parameters.update(parameters)

    def batch(self):
        import contextlib

        return contextlib.nullcontext()

    def submit(self, function):
        self.submitted.append(function)
        FakeExecutor.count += 1
        return FakeSlurmJob(job_id=str(FakeExecutor.count))


def test_slurm_jobs_get_the_resources_and_are_not_submitted_twice(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    monkeypatch.setattr(submitit, "SlurmJob", FakeSlurmJob)
    FakeExecutor.made.clear()
    FakeExecutor.count = 100
    config = tiny_config(tmp_path)
    from plca.tools.sweep import SlurmOptions

    slurm = SlurmOptions(partition="gpu", gpus_per_node=4, nodes=2, time_min=90, cpus_per_task=16, mem_gb=64,
                         additional={"account": "lab"})
    sweep_dir = tmp_path / "slurm_sweep"
    outcome = run_sweep(config, [0, 1], [], [f"output_dir={sweep_dir}"], launcher="slurm", slurm=slurm, wait=False,
                        echo=lambda line: None)
    executor, = FakeExecutor.made
    assert executor.cluster == "slurm" and executor.folder == str((sweep_dir / "slurm" / "%j").absolute())
    assert executor.parameters == {"name": "plca-slurm_sweep", "timeout_min": 90, "nodes": 2, "tasks_per_node": 1,
                                   "gpus_per_node": 4, "cpus_per_task": 16, "mem_gb": 64, "slurm_partition": "gpu",
                                   "slurm_additional_parameters": {"account": "lab"}}
    assert all(isinstance(job, TrainJob) and job.nnodes == 2 and job.nproc_per_node == 4 for job in executor.submitted)
    assert all(job.env == {ENV_VAR: "tiny_runs"} for job in executor.submitted)  # the plugins reach the nodes
    runs = manifest_runs(sweep_dir)
    assert {name: entry["job_id"] for name, entry in runs.items()} == {"s0": "101", "s1": "102"}
    assert {entry["status"] for entry in runs.values()} == {"pending"} and sorted(outcome.waiting) == ["s0", "s1"]
    assert outcome.exit_code == 0

    FakeSlurmJob.states = {"101": "RUNNING", "102": "FAILED"}  # the second is over: submit it again
    run_sweep(config, [0, 1], [], [f"output_dir={sweep_dir}"], launcher="slurm", slurm=slurm, wait=False,
              echo=lambda line: None)
    assert len(FakeExecutor.made[1].submitted) == 1
    assert manifest_runs(sweep_dir)["s0"]["job_id"] == "101" and manifest_runs(sweep_dir)["s1"]["job_id"] == "103"


def test_a_job_on_several_nodes_meets_at_the_first_node(tmp_path, monkeypatch):
    import submitit

    class Environment:
        node, job_id, hostnames = 1, "4242", ["gpu-a01", "gpu-a02"]

    commands = []

    class Process:
        def __init__(self, command, **kwargs):
            commands.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr(submitit, "JobEnvironment", Environment)
    monkeypatch.setattr("plca.tools.sweep.subprocess.Popen", Process)
    job = TrainJob(config="/c.yaml", overrides=[], run_dir=str(tmp_path / "run"), stdout=str(tmp_path / "x.out"),
                   stderr=str(tmp_path / "x.err"), cwd=str(tmp_path), nproc_per_node=8, nnodes=2)
    assert job() == 0
    command, = commands
    endpoint = command[command.index("--rdzv_endpoint") + 1]
    assert endpoint.startswith("gpu-a01:") and 20000 <= int(endpoint.split(":")[1]) < 40000
    assert command[command.index("--rdzv_id") + 1] == "4242" and command[command.index("--nnodes") + 1] == "2"
    assert (tmp_path / "x.err.node1").is_file() and not (tmp_path / "x.err").exists()  # each node its own log
