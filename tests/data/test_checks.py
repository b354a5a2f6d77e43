"""The file checks run before training (plca.data.checks): each kind of bad file is found and named."""

from __future__ import annotations

import numpy as np
import pytest
from dataset_writers import write_cityscapes, write_folder, write_gta5, write_synthia
from PIL import Image

from plca.data.checks import check_files
from plca.data.datasets import build_dataset
from plca.data.io import write_png_16bit
from plca.data.labels import CITYSCAPES_CLASSES, SYNTHIA16_CLASSES

SUBSET = ("sky", "road", "car")


def set_pixel(path, value, palette=False):
    ids = np.array(Image.open(path))
    ids[1, 2] = value
    image = Image.fromarray(ids)
    if palette:
        image.putpalette(Image.open(path).getpalette())
    image.save(path)


@pytest.mark.parametrize("fmt", ["gta5", "synthia", "cityscapes", "folder"])
def test_clean_datasets_pass(tmp_path, fmt):
    writer = {"gta5": write_gta5, "synthia": write_synthia, "cityscapes": write_cityscapes,
              "folder": lambda root: write_folder(root, splits={"train": 3})}[fmt]
    writer(tmp_path)
    split = {"gta5": "all", "synthia": "all"}.get(fmt, "train")
    dataset = build_dataset(fmt, tmp_path, split, SUBSET)
    report = check_files(dataset)
    assert report.ok and report.checked == len(dataset) and not report.resized, report.problems


def test_label_of_the_wrong_size(tmp_path):
    write_folder(tmp_path, splits={"train": 3}, size=(32, 64))
    Image.fromarray(np.zeros((16, 64), np.uint8)).save(tmp_path / "labels" / "train_0001.png")
    report = check_files(build_dataset("folder", tmp_path, "train", SUBSET), level="headers")
    assert list(report.problems) == ["size"]
    assert report.problems["size"] == [f"{tmp_path / 'labels' / 'train_0001.png'} (image 64x32, label 64x16)"]
    assert "1 label(s) differ in size from their image" in report.message()
    assert "fix or remove these pairs" in report.message()


def test_gta5_size_mismatch_is_counted_not_an_error(tmp_path):
    write_gta5(tmp_path, n=3, mismatched=1)
    report = check_files(build_dataset("gta5", tmp_path, "all", CITYSCAPES_CLASSES))
    assert report.ok and len(report.resized) == 1 and "00002.png" in report.resized[0]


@pytest.mark.parametrize("fmt, bad_id", [("gta5", 34), ("cityscapes", 200), ("folder", 3), ("synthia", 40)])
def test_label_with_unknown_ids(tmp_path, fmt, bad_id):
    if fmt == "gta5":
        write_gta5(tmp_path, n=2)
        label, split, palette = tmp_path / "labels" / "00002.png", "all", True
    elif fmt == "cityscapes":
        write_cityscapes(tmp_path, splits=("train",), n_per_city=1)
        label = next((tmp_path / "gtFine" / "train").glob("*/*_labelIds.png"))
        split, palette = "train", False
    elif fmt == "folder":
        write_folder(tmp_path, splits={"train": 2})
        label, split, palette = tmp_path / "labels" / "train_0001.png", "train", False
    else:
        write_synthia(tmp_path, n=2)
        label, split, palette = tmp_path / "GT" / "LABELS" / "0000001.png", "all", False
    if fmt == "synthia":
        from plca.data.io import read_synthia_label

        ids = read_synthia_label(label)
        ids[0, 0] = bad_id
        write_png_16bit(label, np.stack([ids] * 3, axis=-1))
    else:
        set_pixel(label, bad_id, palette)
    classes = SYNTHIA16_CLASSES if fmt == "synthia" else SUBSET
    dataset = build_dataset(fmt, tmp_path, split, classes)
    assert check_files(dataset, level="headers").ok  # ids need the labels decoded
    report = check_files(dataset, level="labels")
    assert report.problems == {"ids": [f"{label} (ids {bad_id})"]}
    assert "hold ids outside the table of" in report.message() and label.name in report.message()


def test_unreadable_files_and_colour_labels(tmp_path):
    write_folder(tmp_path, splits={"train": 4})
    (tmp_path / "images" / "train_0000.png").write_bytes(b"")
    (tmp_path / "labels" / "train_0001.png").write_bytes(b"GIF89a garbage")
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "labels" / "train_0002.png")
    truncated = tmp_path / "labels" / "train_0003.png"
    truncated.write_bytes(truncated.read_bytes()[:80])  # the header survives
    dataset = build_dataset("folder", tmp_path, "train", SUBSET)
    report = check_files(dataset, level="labels")
    assert set(report.problems) == {"image", "label", "colour"}
    assert "train_0000.png" in report.problems["image"][0]
    assert [p.split(" ")[0].split(":")[0] for p in report.problems["label"]] == [
        str(tmp_path / "labels" / "train_0001.png"), str(truncated)]
    assert "train_0002.png (mode RGB)" in report.problems["colour"][0]
    message = report.message()
    assert "1 image file(s) cannot be opened as images" in message and "re-extract" in message
    assert "use the id images" in message


def test_levels_and_subsets(tmp_path):
    write_folder(tmp_path, splits={"train": 4})
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "labels" / "train_0002.png")
    dataset = build_dataset("folder", tmp_path, "train", SUBSET)
    assert check_files(dataset, level="none").ok
    assert check_files(dataset, indices=[0, 1, 3]).ok  # each process checks its share
    assert not check_files(dataset, indices=[2]).ok
    with pytest.raises(ValueError, match="level"):
        check_files(dataset, level="everything")


def test_full_level_decodes_images_and_headers_find_unconvertible_modes(tmp_path):
    write_folder(tmp_path, splits={"train": 3})
    truncated = tmp_path / "images" / "train_0000.png"
    truncated.write_bytes(truncated.read_bytes()[:200])  # the header survives
    floating = tmp_path / "images" / "train_0001.png"
    Image.fromarray(np.zeros((32, 64), np.float32)).save(floating, format="TIFF")  # a TIFF named .png
    dataset = build_dataset("folder", tmp_path, "train", SUBSET)
    headers = check_files(dataset, level="headers")
    assert list(headers.problems) == ["image_mode"] and "mode 'F'" in headers.problems["image_mode"][0]
    full = check_files(dataset, level="full")
    assert full.problems["image_data"] == [f"{truncated} (" + full.files[0].reason + ")"]
    assert "truncated or corrupt" in full.files[0].reason
    assert str(floating) in full.problems["image_mode"][0]
    assert "cannot be decoded completely" in full.message() and "8-bit RGB" in full.message()


def test_synthia_label_saved_as_8_bit_is_found_from_the_header(tmp_path):
    write_synthia(tmp_path, n=2)
    label = tmp_path / "GT" / "LABELS" / "0000001.png"
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(label)
    report = check_files(build_dataset("synthia", tmp_path, "all", SYNTHIA16_CLASSES), level="headers")
    assert report.problems == {"depth": [f"{label} (8-bit)"]} and "16-bit" in report.message()


def test_statistics_sizes_and_decoded_labels(tmp_path):
    written = write_gta5(tmp_path, n=3, size=(16, 24))
    small = write_gta5(tmp_path / "small", n=1, size=(8, 12))
    (tmp_path / "small" / "images" / "00001.png").rename(tmp_path / "images" / "00004.png")
    (tmp_path / "small" / "labels" / "00001.png").rename(tmp_path / "labels" / "00004.png")
    dataset = build_dataset("gta5", tmp_path, "all", SUBSET)
    seen = {}
    report = check_files(dataset, on_label=lambda sample, label: seen.setdefault(sample.name, label))
    assert report.ok and report.labelled == 4 and report.image_sizes == {(16, 24): 3, (8, 12): 1}
    raw = {name: sample.label for name, sample in written.items()}
    raw["00004"] = small["00001"].label
    cityscapes_id = {"sky": 23, "road": 7, "car": 26}
    for name, ids in raw.items():
        expected = np.full(ids.shape, 255, np.uint8)
        for index, class_name in enumerate(SUBSET):
            expected[ids == cityscapes_id[class_name]] = index
        np.testing.assert_array_equal(seen[name], expected)
    every = np.concatenate([ids.ravel() for ids in raw.values()])
    assert report.class_pixels.tolist() == [int((every == cityscapes_id[c]).sum()) for c in SUBSET] + [
        int((~np.isin(every, list(cityscapes_id.values()))).sum())]
    assert report.class_images.tolist() == [sum(int((ids == cityscapes_id[c]).any()) for ids in raw.values())
                                            for c in SUBSET]


def test_labels_without_a_class_of_the_run_are_a_remark_not_a_problem(tmp_path):
    write_gta5(tmp_path, n=2)
    Image.fromarray(np.full((32, 64), 11, np.uint8)).save(tmp_path / "labels" / "00002.png")  # building only
    report = check_files(build_dataset("gta5", tmp_path, "all", SUBSET))
    assert report.ok and len(report.all_ignored) == 1 and "00002.png" in report.all_ignored[0]


def test_check_enough_samples(tmp_path):
    from plca.data.checks import check_enough_samples
    from plca.data.io import DatasetError

    write_folder(tmp_path, splits={"train": 3})
    dataset = build_dataset("folder", tmp_path, "train", SUBSET)
    check_enough_samples(dataset, batch_size=3)
    check_enough_samples(dataset, batch_size=1, world_size=3)
    with pytest.raises(DatasetError) as info:
        check_enough_samples(dataset, batch_size=2, world_size=2, name="source")
    message = str(info.value)
    assert "source data" in message and "split 'train'" in message and "has 3 sample(s)" in message
    assert "2 per process x 2 processes = 4" in message and "train.batch_size" in message
    with pytest.raises(DatasetError, match=r"has 3 sample\(s\), fewer than one batch \(4 per process\)"):
        check_enough_samples(dataset, batch_size=4)
