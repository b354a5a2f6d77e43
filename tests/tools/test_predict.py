"""plca predict: outputs at full resolution in the palette; sliding window, flip and scales against plain references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from plca.cli import main
from plca.config import build_config, to_dict
from plca.data.labels import palette
from plca.data.transforms import resize_image
from plca.tools.export import build_inference_model, export_model
from plca.tools.predict import InferenceOptions, predict_full, window_starts

CLASSES = ["road", "car", "sky"]


def tiny_config(root, val_split="val"):
    return build_config({
        "method": "source_only",
        "data": {"classes": CLASSES,
                 "source": {"format": "folder", "root": str(root), "split": "train"},
                 "val": {"format": "folder", "root": str(root), "split": val_split}},
        "model": {"backbone": "resnet18", "style": "pytorch"},
        "device": "cpu",
    })


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-weight model saved as a plca checkpoint, and a folder of images of two sizes."""
    tmp = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    config = tiny_config(tmp / "data")
    model = build_inference_model(config).eval()
    with torch.no_grad():  # a larger classifier makes the classes compete visibly
        for conv in model.head.convs:
            conv.weight.mul_(20)
    checkpoint = tmp / "run" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": to_dict(config)}, checkpoint)
    rng = np.random.default_rng(0)
    inputs = tmp / "inputs"
    (inputs / "sub").mkdir(parents=True)
    sizes = {"a": (32, 64), "b": (32, 64), "sub/c": (40, 48)}
    for name, (h, w) in sizes.items():
        # smooth images so that predictions form regions
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(inputs / f"{name}.png")
    return {"tmp": tmp, "model": model, "config": config, "checkpoint": checkpoint, "inputs": inputs, "sizes": sizes}


def read(path):
    return np.asarray(Image.open(path))


def image_tensor(path):
    """``(1, 3, H, W) uint8``."""
    return torch.from_numpy(read(path).copy()).permute(2, 0, 1)[None]


def reference_logits(model, images, size, flip=False, out_size=None):
    """Logits of uint8 ``images`` resized to ``size`` the way evaluation does (:func:`resize_image`),
    optionally mirrored, upsampled from the model's stride to ``out_size`` (default: the input size),
    mirrored back."""
    resized = resize_image(images[0].permute(1, 2, 0).numpy(), size)
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None].float()
    x = x.flip(-1) if flip else x
    with torch.no_grad():
        logits = model(x)["logits"]
    logits = F.interpolate(logits, size=out_size or images.shape[-2:], mode="bilinear", align_corners=False)
    return logits.flip(-1) if flip else logits


def reference_probs(model, images, size, flip=False):
    """As :func:`reference_logits`, then the softmax: logits are upsampled first (mmsegmentation's order)."""
    return reference_logits(model, images, size, flip).softmax(dim=1)


def test_window_starts_cover_the_length():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(10, 4, 4) == [0, 4, 6]
    assert window_starts(8, 8, 5) == [0]
    assert window_starts(5, 8, 5) == [0]


def test_cli_writes_full_size_labels_in_the_palette(setup, tmp_path):
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(setup["checkpoint"]), "--input", str(setup["inputs"]),
               "--output", str(out), "--original-size", "--no-progress", "--num-workers", "0"])
    assert rc == 0
    colors = palette(CLASSES)
    for name, (h, w) in setup["sizes"].items():
        labels = read(out / "labels" / f"{name}.png")
        color = read(out / "color" / f"{name}.png")
        overlay = read(out / "overlay" / f"{name}.jpg")
        assert labels.shape == (h, w) and labels.dtype == np.uint8
        assert color.shape == overlay.shape == (h, w, 3)
        assert np.array_equal(color, colors[labels])
        # the labels are the argmax of the whole-image probabilities at full resolution
        expected = reference_probs(setup["model"], image_tensor(setup["inputs"] / f"{name}.png"), (h, w)).argmax(1)[0]
        assert np.array_equal(labels, expected.numpy())
        image = read(setup["inputs"] / f"{name}.png").astype(float)
        assert np.abs(overlay - (0.5 * image + 0.5 * colors[labels])).mean() < 4  # JPEG-compressed blend
    assert len({int(v) for name in setup["sizes"] for v in np.unique(read(out / "labels" / f"{name}.png"))}) > 1


def test_sliding_window_of_the_whole_image_equals_whole_image(setup):
    images = image_tensor(setup["inputs"] / "a.png")
    whole = predict_full(setup["model"], images, InferenceOptions())
    one_window = predict_full(setup["model"], images, InferenceOptions(window=(32, 64)))
    bigger_window = predict_full(setup["model"], images, InferenceOptions(window=(100, 100)))
    assert torch.allclose(whole, one_window, atol=1e-6) and torch.allclose(whole, bigger_window, atol=1e-6)


def test_sliding_window_averages_overlapping_windows(setup):
    model, images = setup["model"], image_tensor(setup["inputs"] / "a.png")
    got = predict_full(model, images, InferenceOptions(window=(32, 40), stride=(16, 16), batch_size=2))
    # plain reference: windows at columns 0, 16 and 24 (the last one ends at the border), full height;
    # their logits (upsampled to the window) are averaged, then the softmax (mmsegmentation's slide_inference)
    total, count = torch.zeros(1, 3, 32, 64), torch.zeros(32, 64)
    for left in (0, 16, 24):
        total[:, :, :, left:left + 40] += reference_logits(model, images[:, :, :, left:left + 40], (32, 40))
        count[:, left:left + 40] += 1
    assert torch.allclose(got, (total / count).softmax(dim=1), atol=1e-6)
    assert torch.allclose(got.sum(dim=1), torch.ones(1, 32, 64), atol=1e-5)


def test_flip_and_scales_average_probabilities(setup):
    model, images = setup["model"], image_tensor(setup["inputs"] / "a.png")
    got = predict_full(model, images, InferenceOptions(flip=True, scales=(0.5, 1.0)))
    variants = [reference_probs(model, images, size, flip) for size in ((16, 32), (32, 64)) for flip in (False, True)]
    assert torch.allclose(got, torch.stack(variants).mean(0), atol=1e-6)
    resized = predict_full(model, images, InferenceOptions(size=(16, 32)))
    assert resized.shape == (1, 3, 32, 64)
    assert torch.allclose(resized, reference_probs(model, images, (16, 32)), atol=1e-6)


def test_flip_tta_and_sliding_window_run_from_the_cli(setup, tmp_path):
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(setup["checkpoint"]), "--input", str(setup["inputs"] / "a.png"),
               "--output", str(out), "--flip", "--aggregate", "--sliding-window", "--window", "24", "32",
               "--scales", "0.75", "1.0", "--no-progress", "--num-workers", "0"])
    assert rc == 0
    assert read(out / "labels" / "a.png").shape == (32, 64)


def test_exported_model_needs_no_config(setup, tmp_path):
    exported = export_model(setup["checkpoint"], tmp_path / "model.safetensors")
    common = ["--input", str(setup["inputs"]), "--original-size", "--no-progress", "--num-workers", "0"]
    assert main(["predict", "--checkpoint", str(exported), "--output", str(tmp_path / "st"), *common]) == 0
    assert main(["predict", "--checkpoint", str(setup["checkpoint"]), "--output", str(tmp_path / "pt"), *common]) == 0
    for name in setup["sizes"]:
        assert np.array_equal(read(tmp_path / "st" / "labels" / f"{name}.png"),
                              read(tmp_path / "pt" / "labels" / f"{name}.png"))


def test_unreadable_image_is_skipped_and_reported(setup, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.open(setup["inputs"] / "a.png").save(inputs / "good.png")
    (inputs / "bad.png").write_bytes((setup["inputs"] / "b.png").read_bytes()[:60])  # truncated
    rc = main(["predict", "--checkpoint", str(setup["checkpoint"]), "--input", str(inputs),
               "--output", str(tmp_path / "out"), "--no-progress", "--num-workers", "0"])
    assert rc == 1
    assert (tmp_path / "out" / "labels" / "good.png").is_file()
    assert not (tmp_path / "out" / "labels" / "bad.png").exists()
    assert "bad.png" in capsys.readouterr().err


def test_split_of_the_config_val_dataset(setup, tmp_path):
    from dataset_writers import write_folder

    root = tmp_path / "data"
    write_folder(root, classes_count=3, splits={"train": 2, "val": 3}, size=(32, 48), seed=0)
    config = tmp_path / "config.yaml"
    import yaml

    config.write_text(yaml.safe_dump(to_dict(tiny_config(root))))
    rc = main(["predict", str(config), "--checkpoint", str(setup["checkpoint"]), "--split", "val",
               "--output", str(tmp_path / "out"), "--no-progress", "--num-workers", "0"])
    assert rc == 0
    names = [line.strip() for line in (root / "val.txt").read_text().splitlines() if line.strip()]
    written = sorted(p.stem for p in (tmp_path / "out" / "labels").rglob("*.png"))
    assert len(written) == len(names) == 3
    assert all(read(p).shape == (32, 48) for p in (tmp_path / "out" / "labels").rglob("*.png"))


def test_bad_arguments_are_clear(setup, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(setup["checkpoint"]), "--output", str(tmp_path)]) == 2
    assert "exactly one of --input" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(setup["checkpoint"]), "--input", str(tmp_path / "nope"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
