"""Dataset readers for the real on-disk formats, their up-front checks, error handling and determinism."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label
from dataset_writers import write_cityscapes, write_folder, write_gta5, write_synthia
from PIL import Image

from plca.data.datasets import DATASET_FORMATS, SegmentationDataset, build_dataset
from plca.data.io import DatasetError, write_png_16bit
from plca.data.labels import CITYSCAPES_CLASSES, SYNTHIA16_CLASSES, SYNTHIA_ID_TO_NAME
from plca.data.transforms import TrainTransform

SUBSET = ("sky", "road", "car")


# Expected labels, computed per pixel straight from the official tables (not through the lookup tables).


def expected_from_cityscapes_ids(raw: np.ndarray, classes) -> np.ndarray:
    out = np.full(raw.shape, 255, np.int64)
    for value in np.unique(raw):
        train_id = id2label[int(value)].trainId
        if 0 <= train_id < 255:
            name = id2label[int(value)].name
            out[raw == value] = classes.index(name) if name in classes else 255
    return out


def expected_from_synthia_ids(raw: np.ndarray, classes) -> np.ndarray:
    out = np.full(raw.shape, 255, np.int64)
    for value in np.unique(raw):
        name = SYNTHIA_ID_TO_NAME.get(int(value))
        if name in classes:
            out[raw == value] = classes.index(name)
    return out


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:100])


# ----------------------------------------------------------------------------------------------
# GTA5


@pytest.mark.parametrize("classes", [CITYSCAPES_CLASSES, SUBSET])
def test_gta5_read_back(tmp_path, classes):
    written = write_gta5(tmp_path, n=3)
    dataset = build_dataset("gta5", tmp_path, "all", classes)
    assert [s.name for s in dataset.samples] == ["00001", "00002", "00003"] and dataset.has_labels
    for index, (name, sample) in enumerate(written.items()):
        item = dataset[index]
        assert item["name"] == name and item["index"] == index
        assert item["image"].dtype == torch.uint8 and item["label"].dtype == torch.int64
        np.testing.assert_array_equal(item["image"].numpy(), sample.image.transpose(2, 0, 1))
        np.testing.assert_array_equal(item["label"].numpy(), expected_from_cityscapes_ids(sample.label, classes))


def test_gta5_known_ids(tmp_path):
    write_gta5(tmp_path, n=1, size=(4, 4))
    label = np.array([[26, 7, 23, 8]] * 4, np.uint8)  # car, road, sky, sidewalk
    Image.fromarray(label).save(tmp_path / "labels" / "00001.png")
    out = build_dataset("gta5", tmp_path, "train", SUBSET)[0]["label"]
    assert out[0].tolist() == [2, 1, 0, 255]
    full = build_dataset("gta5", tmp_path, "train", CITYSCAPES_CLASSES)[0]["label"]
    assert full[0].tolist() == [13, 0, 10, 1]  # Cityscapes train ids of car, road, sky, sidewalk


def test_gta5_mismatched_pair_is_resized_with_one_warning(tmp_path):
    written = write_gta5(tmp_path, n=3, size=(16, 24), mismatched=1)
    dataset = build_dataset("gta5", tmp_path, "all", CITYSCAPES_CLASSES)
    with pytest.warns(RuntimeWarning, match="00002") as record:
        first = dataset[1]
        second = dataset[1]
    assert len([w for w in record if "00002" in str(w.message)]) == 1
    raw = written["00002"].label
    assert raw.shape == (32, 48)
    expected = expected_from_cityscapes_ids(raw[::2, ::2], CITYSCAPES_CLASSES)
    np.testing.assert_array_equal(first["label"].numpy(), expected)
    assert torch.equal(first["label"], second["label"])


def test_gta5_split_file(tmp_path):
    write_gta5(tmp_path, n=4)
    (tmp_path / "mine.txt").write_text("# a comment\n00003\n\n00001.png\n")
    dataset = build_dataset("gta5", tmp_path, "mine", CITYSCAPES_CLASSES)
    assert [s.name for s in dataset.samples] == ["00003", "00001"]
    with pytest.raises(DatasetError, match="val.txt"):
        build_dataset("gta5", tmp_path, "val", CITYSCAPES_CLASSES)


# ----------------------------------------------------------------------------------------------
# SYNTHIA


@pytest.mark.parametrize("classes", [SYNTHIA16_CLASSES, SUBSET])
def test_synthia_read_back(tmp_path, classes):
    written = write_synthia(tmp_path, n=3)
    dataset = build_dataset("synthia", tmp_path, "all", classes)
    assert len(dataset) == 3
    for index, sample in enumerate(written.values()):
        assert sample.label.shape[2] in (3, 4) and sample.label[:, :, 1:].max() > 255  # junk channels
        item = dataset[index]
        np.testing.assert_array_equal(item["image"].numpy(), sample.image.transpose(2, 0, 1))
        np.testing.assert_array_equal(item["label"].numpy(), expected_from_synthia_ids(sample.label[:, :, 0], classes))


def test_synthia_16bit_ids(tmp_path):
    write_synthia(tmp_path, n=1, size=(2, 4))
    label = np.full((2, 4, 3), 40000, np.uint16)
    # road, car, sky, then 259 = 256 + 3: not a SYNTHIA id; reading 8 bits would make it road (low byte) or sky (high).
    label[:, :, 0] = [[3, 8, 1, 259], [10, 0, 16, 513]]
    write_png_16bit(tmp_path / "GT" / "LABELS" / "0000000.png", label)
    out = build_dataset("synthia", tmp_path, "all", SUBSET)[0]["label"]
    assert out.tolist() == [[1, 2, 0, 255], [255, 255, 255, 255]]
    out16 = build_dataset("synthia", tmp_path, "all", SYNTHIA16_CLASSES)[0]["label"]
    assert out16[1, 0] == SYNTHIA16_CLASSES.index("person")
    assert build_dataset("synthia", tmp_path, "all", CITYSCAPES_CLASSES)[0]["label"][1, 2] == \
        CITYSCAPES_CLASSES.index("terrain")


# ----------------------------------------------------------------------------------------------
# Cityscapes


def test_cityscapes_read_back(tmp_path):
    written = write_cityscapes(tmp_path, splits=("train", "val"), n_per_city=2)
    for split in ("train", "val"):
        dataset = build_dataset("cityscapes", tmp_path, split, SUBSET)
        expected = {name: s for name, s in written.items() if s.split == split}
        assert [s.name for s in dataset.samples] == sorted(expected)  # colour / instance files not picked up
        for index in range(len(dataset)):
            item = dataset[index]
            sample = expected[item["name"]]
            np.testing.assert_array_equal(item["image"].numpy(), sample.image.transpose(2, 0, 1))
            np.testing.assert_array_equal(item["label"].numpy(), expected_from_cityscapes_ids(sample.label, SUBSET))


def test_cityscapes_car_id(tmp_path):
    write_cityscapes(tmp_path, splits=("val",), n_per_city=1, cities=("lindau",), size=(2, 2))
    path = tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.array([[26, 26], [7, 21]], np.uint8)).save(path)
    label = build_dataset("cityscapes", tmp_path, "val", SUBSET)[0]["label"]
    assert label.tolist() == [[2, 2], [1, 255]]  # car, car, road, vegetation (not in the run's classes)
    label = build_dataset("cityscapes", tmp_path, "val", CITYSCAPES_CLASSES)[0]["label"]
    assert label.tolist() == [[13, 13], [0, 8]]


def test_cityscapes_without_labels(tmp_path):
    write_cityscapes(tmp_path, splits=("train",), with_labels=False)
    with pytest.raises(DatasetError, match="gtFine"):
        build_dataset("cityscapes", tmp_path, "train", SUBSET)
    dataset = build_dataset("cityscapes", tmp_path, "train", SUBSET, require_labels=False)
    assert not dataset.has_labels and len(dataset) == 4
    item = dataset[0]
    assert item["label"].shape == item["image"].shape[1:] and (item["label"] == 255).all()


def test_cityscapes_unknown_split(tmp_path):
    write_cityscapes(tmp_path, splits=("train", "val"), n_per_city=1)
    with pytest.raises(DatasetError, match="splits there: train, val"):
        build_dataset("cityscapes", tmp_path, "test", SUBSET)


def test_cityscapes_missing_label_file(tmp_path):
    write_cityscapes(tmp_path, splits=("val",), n_per_city=2)
    (tmp_path / "gtFine" / "val" / "bremen" / "bremen_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match="1 of 4 label files") as info:
        build_dataset("cityscapes", tmp_path, "val", SUBSET)
    assert "bremen_000001_000019_gtFine_labelIds.png" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Folder format and synthetic


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_folder_read_back(tmp_path, ext):
    written = write_folder(tmp_path, classes_count=3, splits={"train": 4, "val": 2}, ext=ext)
    classes = ["road", "car", "sky"]
    for split, count in (("train", 4), ("val", 2)):
        dataset = build_dataset("folder", tmp_path, split, classes)
        assert len(dataset) == count
        for index in range(count):
            item = dataset[index]
            sample = written[item["name"]]
            assert sample.split == split and dataset.samples[index].image.suffix == f".{ext}"
            np.testing.assert_array_equal(item["label"].numpy(), sample.label.astype(np.int64))
            if ext == "png":
                np.testing.assert_array_equal(item["image"].numpy(), sample.image.transpose(2, 0, 1))
            else:
                assert item["image"].shape == (3, *sample.image.shape[:2])
    assert set(np.unique(build_dataset("folder", tmp_path, "train", classes)[0]["label"])) <= {0, 1, 2, 255}


def test_folder_split_file_comments_and_blank_lines(tmp_path):
    write_folder(tmp_path, splits={"train": 3})
    (tmp_path / "few.txt").write_text("# picked by hand\n\ntrain_0002  # the last one\n   \ntrain_0000\n")
    dataset = build_dataset("folder", tmp_path, "few", ["a", "b", "c"])
    assert [s.name for s in dataset.samples] == ["train_0002", "train_0000"]


def test_folder_bad_label_values(tmp_path):
    write_folder(tmp_path, classes_count=3, splits={"train": 2})
    label = np.zeros((32, 64), np.uint8)
    label[0, :3] = [7, 255, 3]
    Image.fromarray(label).save(tmp_path / "labels" / "train_0001.png")
    dataset = build_dataset("folder", tmp_path, "train", ["a", "b", "c"])
    dataset[0]
    with pytest.raises(DatasetError, match="values 3, 7") as info:
        dataset[1]
    assert "train_0001.png" in str(info.value)
    assert build_dataset("folder", tmp_path, "train", [*"abcdefgh"])[1]["label"][0, :3].tolist() == [7, 255, 3]


def test_folder_without_labels(tmp_path):
    write_folder(tmp_path, splits={"train": 2})
    for path in (tmp_path / "labels").iterdir():
        path.unlink()
    (tmp_path / "labels").rmdir()
    with pytest.raises(DatasetError, match="labels"):
        build_dataset("folder", tmp_path, "train", ["a", "b", "c"])
    dataset = build_dataset("folder", tmp_path, "train", ["a", "b", "c"], require_labels=False)
    assert not dataset.has_labels and (dataset[1]["label"] == 255).all()


def test_folder_classes_file_must_match(tmp_path):
    write_folder(tmp_path, splits={"train": 1}, class_names=["road", "car", "sky"])
    assert len(build_dataset("folder", tmp_path, "train", ["road", "car", "sky"])) == 1
    with pytest.raises(DatasetError, match="classes.txt"):
        build_dataset("folder", tmp_path, "train", ["car", "road", "sky"])


def test_synthetic_generates_then_reads_folder_format(tmp_path, monkeypatch):
    import plca.data.synthetic as synthetic

    calls = []

    def fake_ensure_generated(root):
        calls.append(root)
        if not (root / "images").exists():
            write_folder(root, splits={"source_train": 2, "target_val": 1})

    monkeypatch.setattr(synthetic, "ensure_generated", fake_ensure_generated)
    dataset = build_dataset("synthetic", tmp_path / "synthetic", "source_train", ["a", "b", "c"])
    assert calls == [tmp_path / "synthetic"] and len(dataset) == 2 and dataset[0]["label"].shape == (32, 64)

    def refuse(root):
        raise ValueError(f"{root} holds synthetic data made with other parameters")

    monkeypatch.setattr(synthetic, "ensure_generated", refuse)
    with pytest.raises(DatasetError, match="other parameters"):
        build_dataset("synthetic", tmp_path / "synthetic", "source_train", ["a", "b", "c"])


# ----------------------------------------------------------------------------------------------
# Up-front checks


def test_unknown_format_lists_the_known_ones(tmp_path):
    with pytest.raises(DatasetError) as info:
        build_dataset("kitti", tmp_path, "train", SUBSET)
    for name in DATASET_FORMATS:
        assert name in str(info.value)
    assert set(DATASET_FORMATS) == {"gta5", "synthia", "cityscapes", "folder", "synthetic", "acdc", "darkzurich"}


@pytest.mark.parametrize("fmt,folder", [("gta5", "images"), ("synthia", "RGB"), ("cityscapes", "leftImg8bit"),
                                        ("folder", "images")])
def test_missing_root_and_sub_folders(tmp_path, fmt, folder):
    with pytest.raises(DatasetError, match="root folder not found"):
        build_dataset(fmt, tmp_path / "nowhere", "train", SUBSET)
    with pytest.raises(DatasetError, match=f"{folder}: .*folder not found"):
        build_dataset(fmt, tmp_path, "train", SUBSET)


def test_missing_label_folders(tmp_path):
    write_gta5(tmp_path / "gta", n=1)
    write_synthia(tmp_path / "synthia", n=1)
    for root, folder in ((tmp_path / "gta", "labels"), (tmp_path / "synthia", "GT/LABELS")):
        for path in (root / folder).iterdir():
            path.unlink()
        (root / folder).rmdir()
    with pytest.raises(DatasetError, match="gta/labels: GTA5 labels folder not found"):
        build_dataset("gta5", tmp_path / "gta", "all", SUBSET)
    with pytest.raises(DatasetError, match="GT/LABELS: SYNTHIA GT/LABELS folder not found"):
        build_dataset("synthia", tmp_path / "synthia", "all", SUBSET)
    assert not build_dataset("synthia", tmp_path / "synthia", "all", SUBSET, require_labels=False).has_labels


def test_empty_split(tmp_path):
    write_folder(tmp_path, splits={"train": 2})
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    with pytest.raises(DatasetError, match="lists no samples") as info:
        build_dataset("folder", tmp_path, "empty", SUBSET)
    assert "empty.txt" in str(info.value)
    gta = tmp_path / "gta"
    (gta / "images").mkdir(parents=True)
    (gta / "labels").mkdir()
    with pytest.raises(DatasetError, match="no .png images"):
        build_dataset("gta5", gta, "all", SUBSET)


def test_missing_files_are_counted_and_named(tmp_path):
    write_gta5(tmp_path, n=8)
    for name in ("00002", "00005", "00007"):
        (tmp_path / "labels" / f"{name}.png").unlink()
    with pytest.raises(DatasetError, match="3 of 8 label files") as info:
        build_dataset("gta5", tmp_path, "all", SUBSET)
    assert all(f"{n}.png" in str(info.value) for n in ("00002", "00005", "00007"))
    (tmp_path / "listed.txt").write_text("00001\n00099\n")
    with pytest.raises(DatasetError, match="1 of 2 images") as info:
        build_dataset("gta5", tmp_path, "listed", SUBSET)
    assert "00099.png" in str(info.value)


def test_duplicate_names_and_unknown_classes(tmp_path):
    write_folder(tmp_path, splits={"train": 2})
    (tmp_path / "twice.txt").write_text("train_0000\ntrain_0000\n")
    with pytest.raises(DatasetError, match="more than once"):
        build_dataset("folder", tmp_path, "twice", SUBSET)
    write_gta5(tmp_path / "gta", n=1)
    with pytest.raises(DatasetError, match="unicorn"):
        build_dataset("gta5", tmp_path / "gta", "all", ["road", "unicorn"])
    with pytest.raises(DatasetError, match="class names"):
        build_dataset("gta5", tmp_path / "gta", "all", "road")


# ----------------------------------------------------------------------------------------------
# Errors while loading


def test_corrupt_image_raises_naming_the_file(tmp_path):
    write_folder(tmp_path, splits={"train": 3})
    truncate(tmp_path / "images" / "train_0001.png")
    dataset = build_dataset("folder", tmp_path, "train", SUBSET)  # existence checks pass
    with pytest.raises(DatasetError, match="train_0001.png"):
        dataset[1]


def test_on_error_skip_returns_the_next_sample(tmp_path):
    write_folder(tmp_path, splits={"train": 3})
    truncate(tmp_path / "images" / "train_0001.png")
    truncate(tmp_path / "labels" / "train_0002.png")
    dataset = build_dataset("folder", tmp_path, "train", SUBSET, on_error="skip")
    with pytest.warns(RuntimeWarning) as record:
        item = dataset[1]
    # train_0002 has a broken label too, so both are skipped and the index wraps around to 0.
    assert ["train_0001.png" in str(w.message) for w in record] == [True, False]
    assert ["train_0002.png" in str(w.message) for w in record] == [False, True]
    assert item["name"] == "train_0000" and item["index"] == 0 and dataset.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset[0]["name"] == "train_0000"
    truncate(tmp_path / "images" / "train_0000.png")
    with pytest.warns(RuntimeWarning), pytest.raises(DatasetError, match="none of its 3 samples"):
        dataset[0]


def test_on_error_must_be_known(tmp_path):
    write_folder(tmp_path, splits={"train": 1})
    with pytest.raises(ValueError, match="on_error"):
        build_dataset("folder", tmp_path, "train", SUBSET, on_error="ignore")


# ----------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_epoch_index_same_sample(tmp_path):
    write_gta5(tmp_path, n=3, size=(40, 60))
    transform = TrainTransform((24, 24), shorter_side=(30, 50))

    def make(seed=5):
        return build_dataset("gta5", tmp_path, "all", CITYSCAPES_CLASSES, transform, seed=seed)

    dataset = make()
    dataset.set_epoch(2)
    a = dataset[1]
    dataset.set_epoch(0)
    dataset[1]
    dataset.set_epoch(2)
    b = dataset[1]
    c = pickle.loads(pickle.dumps(make()))  # as in a DataLoader worker process
    c.set_epoch(2)
    c = c[1]
    for other in (b, c):
        assert torch.equal(a["image"], other["image"]) and torch.equal(a["label"], other["label"])
    # It is exactly the transform driven by default_rng([seed, epoch, index]).
    raw = build_dataset("gta5", tmp_path, "all", CITYSCAPES_CLASSES)[1]
    expected = transform(raw["image"].permute(1, 2, 0).numpy(), raw["label"].numpy().astype(np.uint8),
                         np.random.default_rng([5, 2, 1]))
    assert torch.equal(a["image"], expected[0]) and torch.equal(a["label"], expected[1])
    # Other epochs and seeds give other augmentations.
    changed = []
    for seed, epoch in ((5, 3), (5, 4), (6, 2), (7, 2)):
        d = make(seed)
        d.set_epoch(epoch)
        changed.append(not torch.equal(d[1]["image"], a["image"]))
    assert all(changed)


def test_segmentation_dataset_validates(tmp_path):
    with pytest.raises(DatasetError, match="no samples"):
        SegmentationDataset([], SUBSET, lambda path: None)
    write_folder(tmp_path, splits={"train": 2})
    dataset = build_dataset("folder", tmp_path, "train", SUBSET)
    with pytest.raises(IndexError):
        dataset[2]
    assert dataset[-1]["name"] == "train_0001" and dataset[-1]["index"] == 1
    with pytest.raises(ValueError, match="seed"):
        build_dataset("folder", tmp_path, "train", SUBSET, seed=-1)


# ----------------------------------------------------------------------------------------------
# Split files read robustly; one label reader for every format


def test_split_file_with_bom_crlf_and_stray_spaces(tmp_path):
    write_folder(tmp_path, splits={"train": 3})
    (tmp_path / "mine.txt").write_bytes(b"\xef\xbb\xbf train_0002 \r\n\ttrain_0000.png\r\n")
    dataset = build_dataset("folder", tmp_path, "mine", SUBSET)
    assert [s.name for s in dataset.samples] == ["train_0002", "train_0000"]


def test_split_file_not_utf8_is_one_line_naming_file_and_line(tmp_path):
    write_gta5(tmp_path, n=2)
    (tmp_path / "latin.txt").write_bytes(b"00001\n0000\xe92\n")
    with pytest.raises(DatasetError) as info:
        build_dataset("gta5", tmp_path, "latin", SUBSET)
    message = str(info.value)
    assert str(tmp_path / "latin.txt") in message and "line 2 (byte offset 10" in message and "\n" not in message


def test_one_label_map_for_every_format(tmp_path):
    from plca.data.datasets import LabelMap
    from plca.data.io import read_label, read_synthia_label

    write_gta5(tmp_path / "gta", n=1)
    write_synthia(tmp_path / "synthia", n=1)
    write_folder(tmp_path / "folder", splits={"train": 1})
    readers = [build_dataset("gta5", tmp_path / "gta", "all", SUBSET).label_reader,
               build_dataset("synthia", tmp_path / "synthia", "all", SUBSET).label_reader,
               build_dataset("folder", tmp_path / "folder", "train", SUBSET).label_reader]
    assert all(type(reader) is LabelMap for reader in readers)
    assert [reader.decode for reader in readers] == [read_label, read_synthia_label, read_label]
    assert readers[1].table.shape == (65536,) and readers[1].bit_depth == 16 and readers[1].any_mode
    assert [reader.reject_unknown for reader in readers] == [False, False, True]
    copy = pickle.loads(pickle.dumps(readers[1]))
    label = tmp_path / "synthia" / "GT" / "LABELS" / "0000000.png"
    np.testing.assert_array_equal(copy(label), readers[1](label))


def test_16bit_grey_image_is_read_scaled(tmp_path):
    write_gta5(tmp_path, n=1, size=(4, 4))
    grey = np.full((4, 4), 65535, np.uint16)
    grey[0] = 32768
    Image.fromarray(grey).save(tmp_path / "images" / "00001.png")
    image = build_dataset("gta5", tmp_path, "all", SUBSET)[0]["image"]
    assert image[:, 1:].eq(255).all() and image[:, 0].eq(128).all()


# ----------------------------------------------------------------------------------------------
# scan_dataset: the same readers, every problem recorded with its files


def test_scan_records_every_problem_and_keeps_the_good_samples(tmp_path):
    from plca.data.datasets import scan_dataset

    write_folder(tmp_path, splits={"train": 4})
    (tmp_path / "train.txt").write_text("train_0000\ntrain_0001\nghost\ntrain_0001\ntrain_0002\ntrain_0003\n")
    (tmp_path / "labels" / "train_0002.png").unlink()
    with pytest.raises(DatasetError, match="more than once"):
        build_dataset("folder", tmp_path, "train", SUBSET)  # the strict reader stops at the first
    scan = scan_dataset("folder", tmp_path, "train", SUBSET)
    assert [f.level for f in scan.findings] == ["error"] * 3
    duplicated, no_image, no_label = scan.findings
    assert "train.txt: names listed more than once" in duplicated.message and duplicated.items == ["train_0001"]
    assert f"1 of 5 images listed in {tmp_path / 'train.txt'}" in no_image.message and no_image.items == ["ghost"]
    assert "1 of 4 label files" in no_label.message and no_label.items == ["train_0002.png"]
    dataset = scan.dataset
    assert [s.name for s in dataset.samples] == ["train_0000", "train_0001", "train_0002", "train_0003"]
    assert dataset.samples[2].label is None and dataset.samples[3].label is not None


def test_scan_of_an_unlistable_split(tmp_path):
    from plca.data.datasets import scan_dataset

    scan = scan_dataset("gta5", tmp_path / "nowhere", "all", SUBSET)
    assert scan.dataset is None and len(scan.findings) == 1 and "does not exist" in scan.findings[0].message


def test_wrong_format_says_what_the_folder_looks_like(tmp_path):
    from plca.data.datasets import guess_format

    write_cityscapes(tmp_path / "cs", splits=("val",), n_per_city=1)
    write_gta5(tmp_path / "gta", n=1)
    write_synthia(tmp_path / "synthia", n=1)
    write_folder(tmp_path / "folder", splits={"train": 1})
    assert [guess_format(tmp_path / name) for name in ("cs", "gta", "synthia", "folder")] == [
        "cityscapes", "gta5", "synthia", "folder"]
    assert guess_format(tmp_path) is None
    with pytest.raises(DatasetError) as info:
        build_dataset("gta5", tmp_path / "cs", "all", SUBSET)
    message = str(info.value)
    assert "does not look like a GTA5 dataset" in message and "looks like a Cityscapes dataset" in message
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README").write_text("")
    with pytest.raises(DatasetError, match="it holds README"):
        build_dataset("synthia", tmp_path / "other", "all", SUBSET)
    with pytest.raises(DatasetError, match="looks like a GTA5 dataset"):
        build_dataset("folder", tmp_path / "gta", "train", SUBSET)  # no split file, GTA5's names


def test_splits_and_unpaired_labels(tmp_path):
    from plca.data.datasets import dataset_splits, unpaired_labels

    write_gta5(tmp_path / "gta", n=3)
    (tmp_path / "gta" / "val.txt").write_text("00001\n")
    (tmp_path / "gta" / "images" / "00002.png").unlink()
    assert dataset_splits("gta5", tmp_path / "gta") == ["all", "val"]
    assert unpaired_labels("gta5", tmp_path / "gta") == [tmp_path / "gta" / "labels" / "00002.png"]
    write_cityscapes(tmp_path / "cs", splits=("train", "val"), n_per_city=1)
    image = next((tmp_path / "cs" / "leftImg8bit" / "val").glob("*/*.png"))
    image.unlink()
    assert dataset_splits("cityscapes", tmp_path / "cs") == ["train", "val"]
    orphans = unpaired_labels("cityscapes", tmp_path / "cs", ["train", "val"])
    assert [p.name for p in orphans] == [image.name.replace("_leftImg8bit", "_gtFine_labelIds")]
    write_folder(tmp_path / "folder", splits={"a": 1, "b": 1}, class_names=["x", "y", "z"])
    assert dataset_splits("folder", tmp_path / "folder") == ["a", "b"]
