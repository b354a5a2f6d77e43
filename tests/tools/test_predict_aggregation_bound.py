"""``plca predict`` with test-time aggregation: the bound from the config, the estimate printed before
the windows, and the refusal of an exact aggregation past the free memory in one line."""

import numpy as np
import pytest
import torch
from PIL import Image

from plca.cli import main
from plca.config import build_config, to_dict
from plca.evaluation import aggregation
from plca.tools.export import build_inference_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bound")
    config = build_config({
        "method": "source_only",
        "data": {"classes": ["road", "car", "sky"],
                 "source": {"format": "folder", "root": str(tmp / "data"), "split": "train"}},
        "model": {"backbone": "resnet18", "style": "pytorch"},
        "device": "cpu",
    })
    torch.manual_seed(0)
    model = build_inference_model(config).eval()
    path = tmp / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": to_dict(config)}, path)
    return path


def write_image(path, height, width):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(base).resize((width, height), Image.BILINEAR).save(path)
    return path


def test_predict_prints_the_bound_and_the_estimate_and_writes_the_labels(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(aggregation, "_ANNOUNCED", set())
    monkeypatch.setattr(aggregation, "_CALIBRATION_WORK", 1e7)
    image = write_image(tmp_path / "photo.png", 256, 320)
    rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output", str(tmp_path / "out"),
               "--aggregate", "--no-progress", "eval.aggregation_max_pixels=100"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "test-time aggregation on (exact up to 100 feature pixels, per window above" in out
    assert "test-time aggregation: 32 x 40 feature map (1,280 pixels) > eval.aggregation_max_pixels=100:" in out
    assert out.index("feature map (1,280 pixels)") < out.index("wrote 1 prediction(s)")
    assert np.asarray(Image.open(tmp_path / "out" / "labels" / "photo.png")).shape == (256, 320)


def test_exact_aggregation_past_the_free_memory_is_refused_in_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """A map over the default bound would take a 2 MP image through the backbone first (30 s here); the
    default bound is lowered instead (the threshold itself: test_bounded_aggregation.py)."""
    monkeypatch.setattr(aggregation, "free_memory_bytes", lambda device: 1 << 20)
    monkeypatch.setattr(aggregation, "DEFAULT_MAX_PIXELS", 1000)
    image = write_image(tmp_path / "huge.png", 64, 8 * 168)  # 8 x 168 = 1,344 feature pixels
    rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output", str(tmp_path / "out"),
               "--aggregate", "--no-progress", "eval.aggregation_max_pixels=null"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "exact test-time aggregation of a 8 x 168 feature map (1,344 pixels" in err
    assert "set eval.aggregation_max_pixels=1000" in err and "--no-aggregate" in err
    assert not (tmp_path / "out" / "labels").exists()
