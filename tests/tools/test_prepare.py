"""plca prepare: each fault flagged on a fixture that has it; clean fixtures pass; statistics and cache."""

import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from plca.cli import main
from plca.config import ConfigError
from plca.data.labels import SYNTHIA16_CLASSES
from plca.tools.prepare import check_dataset, format_findings, png_header

RNG = np.random.default_rng(0)
CITYSCAPES_IDS = {7: "road", 8: "sidewalk", 26: "car"}  # label id -> class; 0 (unlabeled) is ignored


def write_png16(path, array):
    """A 16-bit RGB PNG written by hand (PIL cannot write 16-bit colour), as SYNTHIA's labels are stored."""
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def random_image(path, size=(32, 64)):
    Image.fromarray(RNG.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)


def random_ids(ids, size=(32, 64)):
    return RNG.choice(np.array(ids, dtype=np.uint8), size=size)


def make_gta5(root, count=3):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    labels = {}
    for index in range(1, count + 1):
        name = f"{index:05d}"
        random_image(root / "images" / f"{name}.png")
        labels[name] = random_ids([0, 7, 8, 26])
        Image.fromarray(labels[name]).save(root / "labels" / f"{name}.png")
    return labels


def make_synthia(root, count=2):
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    labels = {}
    for index in range(count):
        name = f"{index:07d}"
        random_image(root / "RGB" / f"{name}.png")
        ids = RNG.choice(np.array([0, 1, 3, 8], dtype=np.uint16), size=(32, 64))
        labels[name] = ids
        instance = RNG.integers(0, 2000, size=(32, 64), dtype=np.uint16)  # second channel: not the class
        write_png16(root / "GT" / "LABELS" / f"{name}.png", np.stack([ids, instance, np.zeros_like(ids)], -1))
    return labels


def make_cityscapes(root):
    labels = {}
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for index in range(2):
            stem = f"{city}_{index:06d}_000019"
            random_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            labels[(split, city, stem)] = random_ids([0, 7, 8, 26])
            Image.fromarray(labels[(split, city, stem)]).save(
                root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return labels


def make_folder(root):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(RNG.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
        Image.fromarray(random_ids([0, 1, 2, 255])).save(root / "labels" / f"{name}.png")
    (root / "train.txt").write_text("a\nb\n")
    (root / "val.txt").write_text("# validation\nc\n")


def check(fmt, root, **kwargs):
    return check_dataset(fmt, root, progress=False, workers=2, **kwargs)


def only(report, level):
    findings = {"error": report.errors, "warning": report.warnings, "note": report.notes}[level]
    assert len(findings) == 1, format_findings(report)
    return findings[0]


# --------------------------------------------------------------------------- clean data


@pytest.mark.parametrize("fmt,make", [("gta5", make_gta5), ("synthia", make_synthia),
                                      ("cityscapes", make_cityscapes), ("folder", make_folder)])
def test_clean_fixtures_pass(tmp_path, fmt, make, capsys):
    make(tmp_path)
    classes = ["road", "car", "sky"] if fmt == "folder" else None
    report = check(fmt, tmp_path, classes=classes)
    assert report.findings == [], format_findings(report)
    assert report.checked == {"gta5": 3, "synthia": 2, "cityscapes": 4, "folder": 3}[fmt]
    args = ["prepare", fmt, str(tmp_path), "--no-progress"] + (["--classes", *classes] if classes else [])
    assert main(args) == 0
    assert "Result: OK" in capsys.readouterr().out


# --------------------------------------------------------------------------- one fault each


def test_missing_label_folder(tmp_path):
    make_gta5(tmp_path)
    shutil.rmtree(tmp_path / "labels")
    assert "label folder" in only(check("gta5", tmp_path), "error").message


def test_image_without_label(tmp_path, capsys):
    make_gta5(tmp_path)
    (tmp_path / "labels" / "00002.png").unlink()
    finding = only(check("gta5", tmp_path), "error")
    assert "have no label" in finding.message and finding.items == ["00002.png"]
    assert main(["prepare", "gta5", str(tmp_path), "--no-progress"]) == 2
    assert "NOT USABLE" in capsys.readouterr().out


def test_label_without_image(tmp_path):
    make_gta5(tmp_path)
    (tmp_path / "images" / "00003.png").unlink()
    finding = only(check("gta5", tmp_path), "error")
    assert "have no image" in finding.message and finding.items == ["00003.png"]


def test_gta5_size_mismatch_is_a_listed_warning(tmp_path, capsys):
    make_gta5(tmp_path)
    Image.fromarray(random_ids([7, 26], size=(30, 64))).save(tmp_path / "labels" / "00002.png")
    report = check("gta5", tmp_path)
    assert not report.errors
    finding = only(report, "warning")
    assert "resized" in finding.message and finding.items == ["00002 (image 64x32, label 64x30)"]
    assert main(["prepare", "gta5", str(tmp_path), "--no-progress"]) == 0
    assert "00002 (image 64x32, label 64x30)" in capsys.readouterr().out


def test_truncated_image(tmp_path):
    make_gta5(tmp_path)
    path = tmp_path / "images" / "00001.png"
    path.write_bytes(path.read_bytes()[:-200])
    finding = only(check("gta5", tmp_path), "error")
    assert "cannot be read" in finding.message and "00001.png" in finding.items[0]


def test_colour_label(tmp_path):
    make_gta5(tmp_path)
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "labels" / "00003.png")
    finding = only(check("gta5", tmp_path), "error")
    assert "colour" in finding.message and finding.items == ["00003.png"]


def test_cityscapes_label_id_above_33(tmp_path):
    make_cityscapes(tmp_path)
    path = tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000001_000019_gtFine_labelIds.png"
    ids = random_ids([7, 26])
    ids[0, :3] = [40, 255, 33]  # 33 (bicycle) is valid
    Image.fromarray(ids).save(path)
    finding = only(check("cityscapes", tmp_path), "error")
    assert "outside the Cityscapes label ids" in finding.message
    assert finding.items == [f"{path.name}: 40, 255"]


def test_synthia_label_saved_as_8_bit(tmp_path):
    make_synthia(tmp_path)
    path = tmp_path / "GT" / "LABELS" / "0000001.png"
    Image.fromarray(random_ids([1, 3, 8])).save(path)
    assert png_header(path)[2] == 8
    finding = only(check("synthia", tmp_path), "error")
    assert "not 16-bit" in finding.message and finding.items == ["0000001.png (8-bit)"]


def test_folder_label_outside_the_classes(tmp_path):
    make_folder(tmp_path)
    ids = random_ids([0, 1, 255])
    ids[5, 5] = 3  # 3 classes: 3 is out of range, 255 is ignore
    Image.fromarray(ids).save(tmp_path / "labels" / "b.png")
    finding = only(check("folder", tmp_path, classes=["road", "car", "sky"]), "error")
    assert "0..2" in finding.message and finding.items == ["b.png: 3"]


def test_split_file_names_a_missing_sample(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "val.txt").write_text("c\nghost\n")
    finding = only(check("folder", tmp_path, classes=["road", "car", "sky"]), "error")
    assert "val.txt" in finding.message and finding.items == ["ghost"]


def test_folder_without_labels_is_a_target_only_note(tmp_path):
    make_folder(tmp_path)
    shutil.rmtree(tmp_path / "labels")
    report = check("folder", tmp_path, classes=["road", "car", "sky"])
    assert "unlabelled target" in only(report, "note").message and not report.errors and not report.warnings


def test_missing_dataset_folder(tmp_path, capsys):
    assert main(["prepare", "cityscapes", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().out


# --------------------------------------------------------------------------- statistics and cache


def test_statistics_and_cache_match_a_direct_count(tmp_path):
    labels = make_gta5(tmp_path / "gta5")
    classes = ["road", "car"]  # sidewalk becomes ignore
    stats_path = tmp_path / "stats.json"
    report = check("gta5", tmp_path / "gta5", classes=classes, write_cache=tmp_path / "cache", stats_path=stats_path)
    assert report.findings == []
    stats = json.loads(stats_path.read_text())
    all_ids = np.stack(list(labels.values()))
    total = int(np.isin(all_ids, [7, 26]).sum())
    assert stats["images"] == 3 and stats["labelled_pixels"] == total
    assert stats["ignored_pixels"] == all_ids.size - total
    for raw, name in ((7, "road"), (26, "car")):
        entry = stats["classes"][name]
        assert entry["pixels"] == int((all_ids == raw).sum())
        assert entry["frequency"] == pytest.approx((all_ids == raw).sum() / total)
        assert entry["images"] == sum(int((ids == raw).any()) for ids in labels.values())
    for name, ids in labels.items():
        expected = np.full(ids.shape, 255, np.uint8)
        expected[ids == 7], expected[ids == 26] = 0, 1
        assert np.array_equal(np.asarray(Image.open(tmp_path / "cache" / f"{name}.png")), expected)
    assert (tmp_path / "cache" / "classes.txt").read_text().split() == classes


def test_synthia_statistics_use_the_16_bit_first_channel(tmp_path):
    labels = make_synthia(tmp_path)
    report = check("synthia", tmp_path)
    assert report.classes == list(SYNTHIA16_CLASSES)
    all_ids = np.stack(list(labels.values()))
    for raw, name in ((1, "sky"), (3, "road"), (8, "car")):
        assert report.stats["classes"][name]["pixels"] == int((all_ids == raw).sum())
    assert report.stats["classes"]["person"]["pixels"] == 0


# --------------------------------------------------------------------------- image modes


def test_unusual_image_modes_are_converted_and_pass(tmp_path):
    make_gta5(tmp_path)
    Image.fromarray(RNG.integers(0, 65536, size=(32, 64), dtype=np.uint16)).save(tmp_path / "images" / "00001.png")
    Image.fromarray(RNG.integers(0, 256, size=(32, 64, 2), dtype=np.uint8), mode="LA").save(
        tmp_path / "images" / "00002.png")
    Image.fromarray(RNG.integers(0, 2, size=(32, 64)).astype(bool)).save(tmp_path / "images" / "00003.png")
    report = check("gta5", tmp_path)
    assert report.findings == [], format_findings(report)


def test_image_in_an_unconvertible_mode_is_an_error_naming_file_and_mode(tmp_path, capsys):
    make_gta5(tmp_path)
    Image.fromarray(np.zeros((32, 64), np.float32)).save(tmp_path / "images" / "00002.png", format="TIFF")
    finding = only(check("gta5", tmp_path), "error")
    assert "8-bit RGB" in finding.message and len(finding.items) == 1
    assert finding.items[0].startswith("00002.png (") and "mode 'F'" in finding.items[0]
    assert main(["prepare", "gta5", str(tmp_path), "--no-progress"]) == 2
    assert "mode 'F'" in capsys.readouterr().out


def test_cmyk_jpeg_in_a_folder_dataset_passes(tmp_path):
    make_folder(tmp_path)
    Image.fromarray(RNG.integers(0, 256, size=(32, 64, 4), dtype=np.uint8), mode="CMYK").save(
        tmp_path / "images" / "b.jpg")
    assert check("folder", tmp_path, classes=["road", "car", "sky"]).findings == []


# --------------------------------------------------------------------------- split files


def test_split_file_with_bom_windows_line_endings_and_spaces(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbf a \r\nb\t\r\n")
    report = check("folder", tmp_path, classes=["road", "car", "sky"])
    assert report.findings == [] and report.checked == 3


def test_split_file_not_utf8(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "val.txt").write_bytes(b"# caf\xe9\nc\n")
    finding = only(check("folder", tmp_path, classes=["road", "car", "sky"]), "error")
    assert f"{tmp_path / 'val.txt'}: line 1 (byte offset 5" in finding.message and "UTF-8" in finding.message


def test_split_file_duplicates(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train.txt").write_text("a\nb\na\n")
    finding = only(check("folder", tmp_path, classes=["road", "car", "sky"]), "error")
    assert "train.txt" in finding.message and "more than once" in finding.message and finding.items == ["a"]


# --------------------------------------------------------------------------- the wrong format


def test_wrong_format_is_one_line_saying_what_the_folder_looks_like(tmp_path, capsys):
    make_cityscapes(tmp_path)
    finding = only(check("gta5", tmp_path), "error")
    assert finding.message.startswith(f"{tmp_path} does not look like a GTA5 dataset")
    assert "looks like a Cityscapes dataset" in finding.message and "\n" not in finding.message
    assert main(["prepare", "synthia", str(tmp_path), "--no-progress"]) == 2
    assert "does not look like a SYNTHIA dataset" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("")
    finding = only(check("cityscapes", tmp_path / "other"), "error")
    assert "does not look like a Cityscapes dataset" in finding.message and "it holds notes.md" in finding.message


def test_folder_dataset_checked_as_gta5_is_flagged(tmp_path):
    make_folder(tmp_path)
    report = check("gta5", tmp_path, classes=["road", "car", "sky"])
    looks = [f for f in report.warnings if "does not look like a GTA5 dataset" in f.message]
    assert len(looks) == 1 and "looks like a folder-format dataset" in looks[0].message
    finding = only(check("folder", tmp_path / "nowhere", classes=["road"]), "error")
    assert "does not exist" in finding.message


def test_gta5_checked_as_folder_says_it_looks_like_gta5(tmp_path):
    make_gta5(tmp_path)
    finding = only(check("folder", tmp_path, classes=["road", "car", "sky"]), "error")
    assert "split file not found" in finding.message and "looks like a GTA5 dataset" in finding.message


# --------------------------------------------------------------------------- unlabelled splits


def test_split_without_any_label_is_a_note(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "labels" / "c.png").unlink()  # val (c) has no label, train (a, b) has
    report = check("folder", tmp_path, classes=["road", "car", "sky"])
    assert not report.errors and not report.warnings
    assert "split 'val'" in only(report, "note").message and "unlabelled" in only(report, "note").message
    assert report.stats["images"] == 2


def test_some_labels_missing_is_an_error_unless_unlabelled(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "labels" / "a.png").unlink()
    finding = only(check("folder", tmp_path, classes=["road", "car", "sky"]), "error")
    assert "have no label" in finding.message and finding.items == ["a.png"]
    report = check("folder", tmp_path, classes=["road", "car", "sky"], split="train", unlabelled=True)
    assert not report.errors and not report.warnings and report.checked == 2
    assert "unlabelled" in only(report, "note").message


def test_gta5_without_labels_when_told_unlabelled(tmp_path):
    make_gta5(tmp_path)
    shutil.rmtree(tmp_path / "labels")
    report = check("gta5", tmp_path, unlabelled=True)
    assert not report.errors and not report.warnings and report.checked == 3 and report.stats is None


# --------------------------------------------------------------------------- sizes and the configured resize


def test_image_sizes_are_reported(tmp_path):
    make_gta5(tmp_path)
    Image.fromarray(RNG.integers(0, 256, size=(40, 80, 3), dtype=np.uint8)).save(tmp_path / "images" / "00003.png")
    Image.fromarray(random_ids([7], size=(40, 80))).save(tmp_path / "labels" / "00003.png")
    report = check("gta5", tmp_path)
    assert report.findings == [] and report.image_sizes == {(32, 64): 2, (40, 80): 1}
    text = format_findings(report)
    assert "64x32 (2), 80x40 (1)" in text and "min / median / max: 32 / 32 / 40 px" in text


def test_resize_far_from_the_image_size_and_crop_larger_than_images_are_warnings(tmp_path):
    make_gta5(tmp_path)
    finding = only(check("gta5", tmp_path, crop_size=(48, 48)), "warning")
    assert "larger than 3 of 3 images" in finding.message and "no rescale" in finding.message
    finding = only(check("gta5", tmp_path, crop_size=(16, 16), shorter_side=(100, 120)), "warning")
    assert "upscales images up to 3.8x" in finding.message  # 120 / 32
    assert check("gta5", tmp_path, crop_size=(16, 16), scale_range=(0.5, 2.0)).findings == []
    with pytest.raises(ConfigError, match="one of them"):
        check("gta5", tmp_path, shorter_side=(10, 20), scale_range=(0.5, 2.0))


def test_cityscapes_label_without_image(tmp_path):
    make_cityscapes(tmp_path)
    (tmp_path / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000001_000019_leftImg8bit.png").unlink()
    finding = only(check("cityscapes", tmp_path), "error")
    assert "have no image" in finding.message and finding.items == ["frankfurt_000001_000019_gtFine_labelIds.png"]
