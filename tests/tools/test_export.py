"""plca export: a run's model as .safetensors with its config; rebuilt without a config file."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from plca.cli import main
from plca.config import ConfigError, build_config, to_dict
from plca.inference import load_for_inference
from plca.models.weights import WeightsError
from plca.tools.export import EXPORT_FORMAT, build_inference_model, export_model, load_exported, read_export_metadata

CLASSES = ["road", "car", "sky"]


def tiny_config(root="data/none"):
    return build_config({
        "method": "plca",
        "data": {"classes": CLASSES,
                 "source": {"format": "folder", "root": str(root), "split": "train"},
                 "target": {"format": "folder", "root": str(root), "split": "train"},
                 "val": {"format": "folder", "root": str(root), "split": "val"}},
        "model": {"backbone": "resnet18", "style": "pytorch"},
        "train": {"iters": 7},  # the fixtures' checkpoints are at step 7: a finished run
        "device": "cpu",
    })


def trained_like_model(config):
    """A model whose weights and BatchNorm statistics are far from their initial values."""
    torch.manual_seed(0)
    model = build_inference_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.train()
        for _ in range(2):  # move the BN running statistics
            model(torch.rand(2, 3, 32, 64) * 255)
    return model.eval()


@pytest.fixture
def run_dir(tmp_path):
    config = tiny_config()
    model = trained_like_model(config)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": to_dict(config), "step": 7, "optimizer": {}},
               run / "checkpoints" / "last.pt")
    return run, model, config


def logits(model, images):
    with torch.no_grad():
        return model.eval()(images)["logits"]


def test_round_trip_gives_identical_logits(run_dir, tmp_path):
    run, model, config = run_dir
    path = export_model(run, tmp_path / "out" / "model.safetensors")
    loaded, loaded_config = load_exported(path)
    images = torch.rand(2, 3, 32, 64) * 255
    assert torch.equal(logits(loaded, images), logits(model, images))
    assert to_dict(loaded_config) == to_dict(config)
    assert not loaded.training


def test_metadata_holds_format_classes_and_config(run_dir, tmp_path):
    run, _, config = run_dir
    metadata = read_export_metadata(export_model(run, tmp_path / "model.safetensors"))
    assert metadata["format"] == EXPORT_FORMAT == "plca-segmentor"
    assert json.loads(metadata["classes"]) == CLASSES
    segmentor = json.loads(metadata["segmentor"])
    assert (segmentor["backbone"], segmentor["head"], segmentor["style"], segmentor["num_classes"]) == \
        ("resnet18", "deeplabv2", "pytorch", 3)
    assert segmentor["normalization"] == {"bgr": False, "mean": [123.675, 116.28, 103.53],
                                          "std": [58.395, 57.12, 57.375]}
    assert yaml.safe_load(metadata["config"]) == to_dict(config)
    assert metadata["step"] == "7"


def test_evaluate_path_loads_the_export_with_a_config(run_dir, tmp_path):
    run, model, config = run_dir
    path = export_model(run / "checkpoints" / "last.pt", tmp_path / "model.safetensors")
    fresh, _, file = load_for_inference(path)
    assert file.kind == "plca export"
    images = torch.rand(1, 3, 32, 32) * 255
    assert torch.equal(logits(fresh, images), logits(model, images))


def test_cli_export(run_dir, tmp_path, capsys):
    run, model, _ = run_dir
    out = tmp_path / "cli.safetensors"
    assert main(["export", str(run), "--output", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    images = torch.rand(1, 3, 32, 32) * 255
    assert torch.equal(logits(load_exported(out)[0], images), logits(model, images))


def test_checkpoint_without_config_needs_one(tmp_path):
    config = tiny_config()
    bare = tmp_path / "weights.pt"
    torch.save({"model": build_inference_model(config).state_dict()}, bare)
    with pytest.raises(ConfigError, match="--config"):
        export_model(bare, tmp_path / "model.safetensors")
    assert export_model(bare, tmp_path / "model.safetensors", config=config).is_file()


def test_clear_errors(tmp_path, run_dir):
    run, _, config = run_dir
    with pytest.raises(WeightsError, match="best_on_val.pt"):
        export_model(run, tmp_path / "m.safetensors", which="best_on_val")
    with pytest.raises(ConfigError, match=".safetensors"):
        export_model(run, tmp_path / "m.pt")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(WeightsError, match="not a plca export"):
        load_exported(plain)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 10)
    with pytest.raises(WeightsError, match="broken.safetensors"):
        load_exported(broken)
    wrong = tmp_path / "wrong.pt"  # a checkpoint of a 5-class model under a 3-class config
    other = build_config({**to_dict(config), "data": {**to_dict(config)["data"], "classes": CLASSES + ["a", "b"]}})
    torch.save({"model": build_inference_model(other).state_dict(), "config": to_dict(config)}, wrong)
    with pytest.raises(WeightsError, match="does not fit the resnet18 .* with 3 classes"):
        export_model(wrong, tmp_path / "w.safetensors")


@pytest.mark.slow
def test_mit_daformer_plca_run_exports_and_evaluates_from_the_file_alone(tmp_path, capsys):
    from dataset_writers import write_folder
    from plca.engine.trainer import train

    data = tmp_path / "data"
    write_folder(data, classes_count=3, splits={"train": 4, "val": 2}, size=(40, 56), seed=0)
    config = build_config({
        "method": "plca",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(data), "split": "train"},
                 "target": {"format": "folder", "root": str(data), "split": "train"},
                 "val": {"format": "folder", "root": str(data), "split": "val"}, "num_workers": 0},
        "model": {"backbone": "mit_b0", "head": "daformer", "features": "head_embedding"},
        "train": {"iters": 2, "batch_size": 2, "crop_size": [32, 32], "optimizer": "adamw", "lr": 1e-3,
                  "eval_every": 0, "log_every": 1, "image_every": 0},
        "eval": {"test_time_aggregation": False},
        "output_dir": str(tmp_path / "runs"), "run_name": "mit", "device": "cpu",
    })
    result = train(config, progress=False)
    assert result.metrics is not None
    out = tmp_path / "mit.safetensors"
    assert main(["export", str(result.run_dir), "--output", str(out)]) == 0
    segmentor = json.loads(read_export_metadata(out)["segmentor"])
    assert (segmentor["backbone"], segmentor["head"], segmentor["features"]) == ("mit_b0", "daformer", "head_embedding")
    assert segmentor["normalization"]["mean"] == [123.675, 116.28, 103.53]
    assert main(["evaluate", "--checkpoint", str(out), "--output", str(tmp_path / "m.json"), "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["mIoU"] == pytest.approx(result.metrics["mIoU"], abs=1e-9)
    assert "mit_b0 + daformer head with 3 classes" in capsys.readouterr().out


def test_model_files_get_ordinary_permissions(run_dir, tmp_path):
    import os
    import stat

    from plca.engine.checkpoint import atomic_save

    run, _, _ = run_dir
    previous = os.umask(0o022)
    try:
        exported = export_model(run, tmp_path / "perm.safetensors")
        atomic_save({"model": {}}, tmp_path / "final.pt")
    finally:
        os.umask(previous)
    for path in (exported, tmp_path / "final.pt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_round_trip_of_the_reduced_deeplab_v2_head(tmp_path):
    # DAFormer's two-branch head (biases included) survives checkpoint -> export -> rebuilt model
    config = build_config(to_dict(tiny_config()), ["model.head=deeplabv2_reduced"])
    model = trained_like_model(config)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "segmentor": model.describe(), "classes": CLASSES,
                "config": to_dict(config), "step": 7, "optimizer": {}}, run / "checkpoints" / "last.pt")
    path = export_model(run, tmp_path / "reduced.safetensors")
    assert json.loads(read_export_metadata(path)["segmentor"])["head"] == "deeplabv2_reduced"
    loaded, loaded_config = load_exported(path)
    assert loaded_config.model.head == "deeplabv2_reduced" and len(loaded.head.convs) == 2
    assert loaded.head.convs[0].bias is not None
    images = torch.rand(2, 3, 32, 64) * 255
    assert torch.equal(logits(loaded, images), logits(model, images))


def test_round_trip_of_a_narrow_daformer_head(tmp_path):
    # model.head_width is part of the description: the export rebuilds the same narrow head
    config = build_config(to_dict(tiny_config()), ["model.backbone=efficientnet_lite0", "model.head=daformer",
                                                   "model.head_width=16", "model.style=null"])
    model = trained_like_model(config)
    assert model.head.embed_channels == 16 and model.head.classifier.in_channels == 16
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "segmentor": model.describe(), "classes": CLASSES,
                "config": to_dict(config), "step": 7, "optimizer": {}}, run / "checkpoints" / "last.pt")
    path = export_model(run, tmp_path / "narrow.safetensors")
    assert json.loads(read_export_metadata(path)["segmentor"])["head_width"] == 16
    loaded, _ = load_exported(path)
    assert loaded.head.embed_channels == 16
    images = torch.rand(2, 3, 32, 64) * 255
    assert torch.equal(logits(loaded, images), logits(model, images))
