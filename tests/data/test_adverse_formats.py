"""ACDC and Dark Zurich in their real on-disk layouts: splits, conditions, label mapping, invalid masks,
unlabelled targets, plca prepare, and a tiny Cityscapes -> ACDC run."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label
from dataset_writers import ACDC_SEQUENCES, write_acdc, write_cityscapes, write_darkzurich

from plca.cli import main
from plca.config import ConfigError
from plca.data.datasets import build_dataset, dataset_splits, scan_dataset, unpaired_labels
from plca.data.formats import check_split, get_format, guess_format
from plca.data.io import DatasetError
from plca.data.labels import CITYSCAPES_CLASSES, IGNORE_INDEX
from plca.tools.prepare import check_dataset, format_findings

SUBSET = ("sky", "road", "car")
CONDITIONS = tuple(ACDC_SEQUENCES)


def expected_from_label_ids(raw: np.ndarray, classes) -> np.ndarray:
    """Class indices of ``classes`` for Cityscapes label ids, per pixel from cityscapesscripts' own table."""
    out = np.full(raw.shape, IGNORE_INDEX, np.int64)
    for value in np.unique(raw):
        label = id2label[int(value)]
        if 0 <= label.trainId < IGNORE_INDEX and label.name in classes:
            out[raw == value] = list(classes).index(label.name)
    return out


@pytest.fixture
def acdc(tmp_path):
    root = tmp_path / "acdc"
    return root, write_acdc(root, splits={"train": 2, "val": 1, "test": 1})


@pytest.fixture
def darkzurich(tmp_path):
    root = tmp_path / "dark_zurich"
    return root, write_darkzurich(root, splits={"train": {"day": 1, "twilight": 1, "night": 2}, "val": {"night": 2},
                                                "test": {"night": 1}})


# ----------------------------------------------------------------------------------------------
# ACDC


def test_acdc_lists_every_condition_of_a_split(acdc):
    root, written = acdc
    assert dataset_splits("acdc", root) == ["train", "val", "test"]  # not train_ref, val_ref, ...
    for split, per_condition in (("train", 2), ("val", 1)):
        dataset = build_dataset("acdc", root, split, CITYSCAPES_CLASSES)
        assert sorted(s.name for s in dataset.samples) == sorted(n for n, w in written.items() if w.split == split)
        fmt = get_format("acdc")
        assert Counter(fmt.condition_of(s) for s in dataset.samples) == dict.fromkeys(CONDITIONS, per_condition)
        for index, sample in enumerate(dataset.samples):
            assert sample.image.name == f"{sample.name}_rgb_anon.png"
            assert sample.label.name == f"{sample.name}_gt_labelTrainIds.png"
            assert sample.label.parent.parent == root / "gt" / fmt.condition_of(sample) / split
            np.testing.assert_array_equal(dataset[index]["image"].permute(1, 2, 0).numpy(),
                                          written[sample.name].image)


@pytest.mark.parametrize("split, conditions", [("train:night", ["night"]), ("train:fog+snow", ["fog", "snow"]),
                                               ("train:snow+fog", ["fog", "snow"]), ("val:rain", ["rain"])])
def test_acdc_condition_subsets(acdc, split, conditions):
    root, written = acdc
    dataset = build_dataset("acdc", root, split, SUBSET)
    assert sorted(s.name for s in dataset.samples) == sorted(
        name for name, w in written.items() if w.split == split.split(":")[0] and w.condition in conditions)
    assert check_split("acdc", split) is None


@pytest.mark.parametrize("split, message", [
    ("train:fgo", "unknown ACDC condition(s) ['fgo']; write train:COND or train:COND+COND with conditions among "
                  "fog, night, rain, snow"),
    ("train:", "unknown ACDC condition(s) ['']"),
    ("train:fog+fog", "names the condition(s) fog more than once"),
    (":fog", "no split name before the ':'"),
])
def test_acdc_bad_condition_selections_are_named(acdc, split, message):
    root, _ = acdc
    assert message in check_split("acdc", split)  # before any file is read (config validation can ask)
    with pytest.raises(DatasetError, match=re.escape(message)):
        build_dataset("acdc", root, split, SUBSET)
    assert check_split("gta5", split) is None  # a format without conditions takes any split name


@pytest.mark.parametrize("classes", [CITYSCAPES_CLASSES, SUBSET])
def test_acdc_labels_read_from_train_ids_agree_with_the_label_ids(acdc, classes):
    root, written = acdc
    dataset = build_dataset("acdc", root, "val", classes)
    for index, sample in enumerate(dataset.samples):
        np.testing.assert_array_equal(dataset[index]["label"].numpy(),
                                      expected_from_label_ids(written[sample.name].label, classes))


def test_invalid_pixels_keep_their_label_and_the_masks_are_never_read(acdc):
    root, written = acdc
    before = build_dataset("acdc", root, "val", CITYSCAPES_CLASSES)
    labels = {s.name: before[i]["label"].numpy() for i, s in enumerate(before.samples)}
    invalid_pixels = 0
    for name, label in labels.items():
        invalid = written[name].invalid.astype(bool)
        invalid_pixels += int(invalid.sum())
        np.testing.assert_array_equal(label[invalid], expected_from_label_ids(written[name].label,
                                                                              CITYSCAPES_CLASSES)[invalid])
    assert invalid_pixels > 0
    for mask in root.glob("gt/*/val/*/*_gt_invIds.png"):
        mask.write_bytes(b"not a png")  # unreadable: nothing may open them
    after = build_dataset("acdc", root, "val", CITYSCAPES_CLASSES)
    for index, sample in enumerate(after.samples):
        np.testing.assert_array_equal(after[index]["label"].numpy(), labels[sample.name])
    assert not check_dataset("acdc", root, split="val", progress=False).errors
    assert unpaired_labels("acdc", root, ["train", "val"]) == []  # label ids / colour / invalid files: not labels


def test_acdc_as_an_unlabelled_target(tmp_path):
    root = tmp_path / "acdc"
    write_acdc(root, splits={"train": 1}, with_labels=False)  # no gt/ folder at all
    assert not (root / "gt").exists()
    target = build_dataset("acdc", root, "train", SUBSET, require_labels=False)
    assert len(target) == 4 and not any(s.label for s in target.samples)
    assert bool((target[0]["label"] == IGNORE_INDEX).all())
    with pytest.raises(DatasetError, match=r"gt/\{fog,night,rain,snow\}/train: ACDC gt/<condition>/train folder "
                                           r"not found"):
        build_dataset("acdc", root, "train", SUBSET)
    write_acdc(tmp_path / "labelled", splits={"train": 1})
    unread = build_dataset("acdc", tmp_path / "labelled", "train", SUBSET, require_labels=False, read_labels=False)
    assert all(sample.label is None for sample in unread.samples)


def test_acdc_test_split_has_no_labels(acdc):
    root, _ = acdc
    with pytest.raises(DatasetError, match="test labels are withheld"):
        build_dataset("acdc", root, "test", SUBSET)
    assert len(build_dataset("acdc", root, "test", SUBSET, require_labels=False)) == 4
    scan = scan_dataset("acdc", root, "test", SUBSET)
    assert [f.level for f in scan.findings] == ["note"] and "unlabelled target" in scan.findings[0].message


def test_acdc_missing_condition_and_orphan_labels(acdc):
    root, written = acdc
    for path in sorted((root / "rgb_anon" / "snow" / "val").glob("*/*")):
        path.unlink()
    for path in sorted((root / "rgb_anon" / "snow" / "val").glob("*")):
        path.rmdir()
    (root / "rgb_anon" / "snow" / "val").rmdir()
    assert Counter(get_format("acdc").condition_of(s) for s in build_dataset("acdc", root, "val", SUBSET).samples) \
        == {"fog": 1, "night": 1, "rain": 1}  # every condition the split has
    with pytest.raises(DatasetError, match="ACDC condition 'snow' of split 'val:snow' not found"):
        build_dataset("acdc", root, "val:snow", SUBSET)
    orphans = unpaired_labels("acdc", root, ["train", "val"])
    snow_val = [n for n, w in written.items() if w.condition == "snow" and w.split == "val"]
    assert [p.name for p in orphans] == [f"{n}_gt_labelTrainIds.png" for n in snow_val]


def test_acdc_ignores_mic_flattened_copies(acdc):
    root, _ = acdc
    for path in root.glob("rgb_anon/*/train/*/*_rgb_anon.png"):  # MIC's README: rsync rgb_anon/*/train/*/* -> train/
        (root / "rgb_anon" / "train").mkdir(exist_ok=True)
        (root / "rgb_anon" / "train" / path.name).write_bytes(path.read_bytes())
    assert len(build_dataset("acdc", root, "train", SUBSET)) == 8 and guess_format(root) == "acdc"
    assert dataset_splits("acdc", root) == ["train", "val", "test"]


# ----------------------------------------------------------------------------------------------
# Dark Zurich


def test_darkzurich_splits_times_of_day_and_the_night_target(darkzurich):
    root, written = darkzurich
    assert dataset_splits("darkzurich", root) == ["train", "val", "test"]  # not val_ref
    fmt = get_format("darkzurich")
    every = build_dataset("darkzurich", root, "train", SUBSET, require_labels=False)
    assert Counter(fmt.condition_of(s) for s in every.samples) == {"day": 1, "twilight": 1, "night": 2}
    night = build_dataset("darkzurich", root, "train:night", SUBSET, require_labels=False)
    assert sorted(s.name for s in night.samples) == sorted(
        n for n, w in written.items() if w.split == "train" and w.condition == "night")
    assert all(s.label is None for s in night.samples) and bool((night[0]["label"] == IGNORE_INDEX).all())
    with pytest.raises(DatasetError,
                       match=r"gt/train/night: Dark Zurich gt/train/<time of day> folder not found.*labels only val"):
        build_dataset("darkzurich", root, "train:night", SUBSET)
    with pytest.raises(DatasetError, match="split 'val' has no day images"):
        build_dataset("darkzurich", root, "val:day", SUBSET)
    with pytest.raises(DatasetError, match=r"unknown Dark Zurich condition\(s\) \['dusk'\]"):
        build_dataset("darkzurich", root, "train:dusk", SUBSET)


@pytest.mark.parametrize("classes", [CITYSCAPES_CLASSES, SUBSET])
def test_darkzurich_val_labels_agree_with_the_label_ids_and_ignore_the_invalid_masks(darkzurich, classes):
    root, written = darkzurich
    for mask in root.glob("gt/val/night/*/*_gt_invIds.png"):
        mask.unlink()  # not needed to read the labels
    dataset = build_dataset("darkzurich", root, "val", classes)
    assert len(dataset) == 2
    for index, sample in enumerate(dataset.samples):
        assert sample.label == root / "gt" / "val" / "night" / sample.image.parent.name / \
            f"{sample.name}_gt_labelTrainIds.png"
        np.testing.assert_array_equal(dataset[index]["label"].numpy(),
                                      expected_from_label_ids(written[sample.name].label, classes))


# ----------------------------------------------------------------------------------------------
# plca prepare


def test_prepare_recognises_both_layouts_and_counts_images_per_condition(acdc, darkzurich, tmp_path, capsys):
    (acdc_root, _), (dz_root, _) = acdc, darkzurich
    write_cityscapes(tmp_path / "cityscapes", splits=("val",), n_per_city=1)
    assert [guess_format(r) for r in (acdc_root, dz_root, tmp_path / "cityscapes")] == [
        "acdc", "darkzurich", "cityscapes"]
    report = check_dataset("acdc", acdc_root, progress=False)
    assert not report.errors and not report.warnings and report.checked == 16
    assert report.conditions == {"train": dict.fromkeys(CONDITIONS, 2), "val": dict.fromkeys(CONDITIONS, 1),
                                 "test": dict.fromkeys(CONDITIONS, 1)}
    assert "images per condition: train: fog 2, night 2, rain 2, snow 2 (8); val: fog 1, night 1, rain 1, snow 1 " \
           "(4); test: fog 1, night 1, rain 1, snow 1 (4)" in format_findings(report)
    report = check_dataset("darkzurich", dz_root, progress=False)
    assert not report.errors and report.conditions["train"] == {"day": 1, "twilight": 1, "night": 2}
    assert main(["prepare", "darkzurich", str(dz_root), "--split", "train:night", "--unlabelled",
                 "--no-progress"]) == 0
    assert "images per condition: train:night: night 2 (2)" in capsys.readouterr().out
    assert main(["prepare", "cityscapes", str(acdc_root), "--no-progress"]) == 2
    assert f"looks like a ACDC dataset (plca prepare acdc {acdc_root})" in capsys.readouterr().out
    assert main(["prepare", "acdc", str(dz_root), "--no-progress"]) == 2
    assert "looks like a Dark Zurich dataset (plca prepare darkzurich" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--split: split 'val:fgo': unknown ACDC condition"):
        check_dataset("acdc", acdc_root, split="val:fgo", progress=False)


# ----------------------------------------------------------------------------------------------
# A tiny run: Cityscapes-like source -> ACDC-like target, validated on ACDC val


@pytest.mark.slow
def test_tiny_plca_run_from_cityscapes_to_acdc(tmp_path):
    from tiny_runs import CLASSES, tiny_source_only_config

    from plca.engine.trainer import train

    write_cityscapes(tmp_path / "cityscapes", splits=("train",), n_per_city=2)
    write_acdc(tmp_path / "acdc", splits={"train": 1, "val": 1, "test": 1})
    config = tiny_source_only_config(tmp_path / "cityscapes", tmp_path / "runs", "cs2acdc", iters=2,
                                     checkpoint_every=2)
    config = dataclasses.replace(config, method="plca", data=dataclasses.replace(
        config.data,
        source=dataclasses.replace(config.data.source, format="cityscapes"),
        target=dataclasses.replace(config.data.source, format="acdc", root=str(tmp_path / "acdc"),
                                   split="train:night+snow"),
        val=dataclasses.replace(config.data.source, format="acdc", root=str(tmp_path / "acdc"), split="val")))
    result = train(config, progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert set(metrics["per_class_IoU"]) == set(CLASSES) and 0 <= metrics["mIoU"] <= 100
    lines = [json.loads(line) for line in (result.run_dir / "scalars.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["loss/total"]) for line in lines)
    # the test split (labels withheld) predicted for the benchmark server, as the README says
    assert main(["predict", "--checkpoint", str(result.run_dir), "--split", "test", "--output",
                 str(tmp_path / "preds"), "--num-workers", "0", "--no-progress"]) == 0
    assert len(list((tmp_path / "preds" / "labels").glob("*.png"))) == 4
