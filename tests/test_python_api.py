"""plca.load_model / plca.segment, model folders (plca export --format folder) and the README's API snippet.

One tiny run (ResNet-18, 2 updates on 32 x 64 images, scored on val) is trained once for the module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import plca
from dataset_writers import write_folder
from plca.cli import main
from plca.config import build_config
from plca.engine.trainer import train
from plca.models.segmentor import build_segmentor
from plca.models.trained import spec_of
from plca.models.weights import WeightsError
from plca.serialization import load_torch_file
from plca.tools.model_folder import read_folder_config

CLASSES = ["road", "car", "sky"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """``(run_dir, data_root)`` of a finished source-only run with metrics.json."""
    tmp = tmp_path_factory.mktemp("api")
    write_folder(tmp / "data", splits={"train": 2, "val": 2})
    folder = {"format": "folder", "root": str(tmp / "data")}
    config = build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {**folder, "split": "train"}, "val": {**folder, "split": "val"},
                 "num_workers": 0},
        "model": {"backbone": "resnet18", "style": "pytorch"},
        "train": {"iters": 2, "batch_size": 2, "crop_size": [32, 32], "lr": 0.01, "eval_every": 0,
                  "checkpoint_every": 100, "log_every": 1, "image_every": 0, "seed": 0},
        "output_dir": str(tmp / "runs"), "run_name": "run", "device": "cpu",
    })
    result = train(config, progress=False, argv=["plca", "train", "tiny.yaml", "train.iters=2"])
    return result.run_dir, tmp / "data"


@pytest.fixture(scope="module")
def model_folder(finished_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "my_model"
    assert main(["export", str(finished_run[0]), "--format", "folder", "--output", str(folder)]) == 0
    return folder


def final_model_probabilities(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """The reference: the run's final.pt rebuilt by hand, softmax of its logits upsampled bilinearly."""
    checkpoint = load_torch_file(run_dir / "checkpoints" / "final.pt", "final model")
    network = build_segmentor(spec_of(checkpoint["segmentor"]), len(CLASSES))
    network.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        logits = network.eval()(images.float())["logits"]
    upsampled = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return upsampled.softmax(dim=1)


def test_the_folder_holds_config_weights_and_a_model_card(finished_run, model_folder):
    assert sorted(path.name for path in model_folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = read_folder_config(model_folder)
    assert config["classes"] == CLASSES and config["num_labels"] == 3
    assert config["id2label"] == {"0": "road", "1": "car", "2": "sky"} and config["label2id"]["sky"] == 2
    assert config["segmentor"]["backbone"] == "resnet18" and config["normalization"]["mean"]
    assert config["inference"] == {"size": None, "test_time_aggregation": False, "alpha": 0.5, "window": [32, 32]}
    assert config["training"]["command"] == "plca train tiny.yaml train.iters=2"
    assert config["training"]["step"] == 2 and config["training"]["config"]["method"] == "source_only"
    run_metrics = json.loads((finished_run[0] / "metrics.json").read_text())
    assert config["metrics"]["mIoU"] == run_metrics["mIoU"] and "folder 'val' split" in config["metrics"]["measured"]
    card = (model_folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: plca\n")
    for part in ("## Data", "## Metrics", "plca train tiny.yaml train.iters=2", "@inproceedings{kang2020plca",
                 f"**mIoU3**: {run_metrics['mIoU']:.2f}", "| road |"):
        assert part in card, part


def test_the_folder_predicts_exactly_as_the_runs_final_model(finished_run, model_folder):
    images = torch.randint(0, 256, (2, 3, 40, 72), dtype=torch.uint8)
    expected = final_model_probabilities(finished_run[0], images)
    for source in (model_folder, finished_run[0]):
        model = plca.load_model(source)
        ids, probs = plca.segment(model, images, probabilities=True)
        assert model.classes == CLASSES
        torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(ids, expected.argmax(dim=1))


def test_every_input_kind_gives_the_same_ids(model_folder):
    model = plca.load_model(model_folder)
    array = np.random.default_rng(0).integers(0, 256, (36, 52, 3), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    ids, probs = plca.segment(model, array, probabilities=True)
    assert ids.shape == (36, 52) and probs.shape == (3, 36, 52) and isinstance(ids, np.ndarray)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-5)
    assert np.array_equal(ids, probs.argmax(axis=0))
    assert np.array_equal(plca.segment(model, Image.fromarray(array)), ids)
    assert np.array_equal(plca.segment(model, tensor).numpy(), ids)
    assert np.array_equal(plca.segment(model, tensor.float()).numpy(), ids)
    as_list = plca.segment(model, [array, Image.fromarray(array).convert("RGBA")])
    assert len(as_list) == 2 and all(np.array_equal(item, ids) for item in as_list)


def test_sliding_window_averages_windows_of_the_training_crop(model_folder):
    model = plca.load_model(model_folder)
    image = torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8)
    _, windowed = plca.segment(model, image, probabilities=True, sliding_window=True)
    # windows of 32 x 32 at stride 22 (2/3 of 32): left 0, 22 and 32; each window's logits, upsampled
    # to the window, are averaged where windows overlap, then the softmax is taken
    total, count = torch.zeros(3, 32, 64), torch.zeros(1, 32, 64)
    for left in (0, 22, 32):
        total[:, :, left:left + 32] += window_logits(model, image[:, :, left:left + 32])
        count[:, :, left:left + 32] += 1
    torch.testing.assert_close(windowed, (total / count).softmax(dim=0), rtol=1e-5, atol=1e-6)
    _, whole = plca.segment(model, image, probabilities=True)
    assert not torch.allclose(windowed, whole)


def window_logits(model, crop: torch.Tensor) -> torch.Tensor:
    """``(K, h, w)``: the network's logits of ``crop``, upsampled bilinearly to the crop."""
    with torch.no_grad():
        logits = model.network(crop[None].float())["logits"]
    return F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)[0]


def test_bad_inputs_and_paths_are_clear_errors(model_folder, tmp_path):
    model = plca.load_model(model_folder)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB, got \(4, 4\) float64"):
        plca.segment(model, np.zeros((4, 4)))
    with pytest.raises(TypeError, match="got str"):
        plca.segment(model, "photo.jpg")
    with pytest.raises(ValueError, match="sliding_window"):
        plca.segment(model, torch.zeros(3, 8, 8), sliding_window=(0, 4))
    with pytest.raises(WeightsError, match="neither a run directory nor a model file"):
        plca.load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="has no checkpoints/final.pt"):
        plca.load_model(tmp_path / "empty")


def test_export_refuses_a_folder_that_is_not_empty(finished_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["export", str(finished_run[0]), "--format", "folder", "--output", str(tmp_path / "taken")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_edited_test_time_settings_of_config_json_apply(model_folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_folder, copy)
    data = json.loads((copy / "config.json").read_text())
    data["inference"]["size"] = [16, 32]
    (copy / "config.json").write_text(json.dumps(data))
    model = plca.load_model(copy)
    assert model.options.size == (16, 32)
    image = torch.randint(0, 256, (3, 32, 64)).float()  # float images are resized by F.interpolate
    small = F.interpolate(image[None], size=(16, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = model.network(small)["logits"]
    expected = F.interpolate(logits, size=(32, 64), mode="bilinear", align_corners=False).softmax(dim=1)[0]
    torch.testing.assert_close(plca.segment(model, image, probabilities=True)[1], expected, rtol=1e-4, atol=1e-5)


def readme_snippet() -> str:
    """The README's API example: the python block after the ``<!-- api-snippet -->`` marker."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- api-snippet -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, "README.md lost its <!-- api-snippet --> python block"
    return found.group(1)


def test_the_readme_snippet_runs(model_folder, monkeypatch):
    monkeypatch.chdir(model_folder.parent)  # the snippet loads "my_model", the folder exported above
    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    assert namespace["model"].classes == CLASSES
    labels, probs = namespace["labels"], namespace["probs"]
    assert labels.shape == probs.shape[1:] and probs.shape[0] == 3
    assert np.array_equal(labels, probs.argmax(axis=0))
