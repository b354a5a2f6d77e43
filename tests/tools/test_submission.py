"""Test-set predictions for the benchmark servers: the layouts, the id mapping, and the shipped Cityscapes ->
ACDC / Dark Zurich configs trained for 2 updates on trees in the real layouts, evaluated on the labelled val and
predicted on the withheld-label test split as the servers take it."""

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from dataset_writers import write_acdc, write_cityscapes, write_darkzurich
from PIL import Image

from plca.cli import main
from plca.config import ConfigError, load_config
from plca.data.datasets import build_dataset
from plca.data.labels import CITYSCAPES_CLASSES, SYNTHIA16_CLASSES
from plca.tools.submission import class_to_submission_ids, submission_layout, train_id_to_label_id

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["model.backbone=resnet18", "model.style=pytorch", "model.pretrained=null", "train.iters=2",
        "train.batch_size=1", "train.crop_size=[32,32]", "train.shorter_side=[32,32]",
        "train.target_shorter_side=[32,32]", "eval.size=[32,64]", "train.eval_every=0", "train.checkpoint_every=2",
        "train.log_every=1", "train.image_every=0", "data.num_workers=0", "device=cpu"]


def reference_label_ids(classes) -> list[int]:
    """cityscapesscripts' label id of each class name: the table a server decodes label-id files with."""
    by_name = {label.name: label.id for label in cityscapes_labels}
    return [by_name[name] for name in classes]


def test_class_indices_become_the_servers_ids():
    assert class_to_submission_ids(CITYSCAPES_CLASSES, "train").tolist() == list(range(19))
    assert class_to_submission_ids(CITYSCAPES_CLASSES, "label").tolist() == reference_label_ids(CITYSCAPES_CLASSES)
    # a 16-class (SYNTHIA) model: index k is the k-th of its own classes, not train id k
    assert class_to_submission_ids(SYNTHIA16_CLASSES, "train").tolist() == [
        CITYSCAPES_CLASSES.index(name) for name in SYNTHIA16_CLASSES]
    assert class_to_submission_ids(SYNTHIA16_CLASSES, "label").tolist() == reference_label_ids(SYNTHIA16_CLASSES)
    assert train_id_to_label_id()[255] == 255
    with pytest.raises(ConfigError, match=r"\['lane marking'\], which are not Cityscapes classes"):
        class_to_submission_ids(["road", "lane marking"], "train")


def test_layouts_of_the_three_servers():
    name = "GOPR0475_frame_000041"
    assert submission_layout("acdc").file_of(name) == f"labelTrainIds/{name}_rgb_anon.png"
    assert submission_layout("darkzurich").ids == submission_layout("acdc").ids == "train"
    city = submission_layout("cityscapes")
    assert city.ids == "label" and city.file_of("berlin_000000_000019") == "berlin_000000_000019_leftImg8bit.png"
    with pytest.raises(ConfigError, match="the 'gta5' format .* has no benchmark server.*formats with one: "
                                          "cityscapes, acdc, darkzurich"):
        submission_layout("gta5")


def _train(tmp_path: Path, config_name: str, target_root: Path, cityscapes_root: Path, extra=()):
    from plca.engine.trainer import train

    roots = [f"data.source.root={cityscapes_root}", f"data.target.root={target_root}", f"data.val.root={target_root}"]
    config = load_config(CONFIGS / config_name, [*roots, *TINY, *extra, f"output_dir={tmp_path / 'runs'}"])
    return train(config, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("target, config_name, extra", [
    # the frozen ImageNet model of the feature distance needs real weights: off at this toy size
    ("darkzurich", "cityscapes2darkzurich_self_training_plca.yaml",
     ["self_training.feature_distance.enabled=false", "data.rare_class_sampling.min_pixels=10"]),
    ("acdc", "cityscapes2acdc_plca.yaml", [])])
def test_shipped_config_trains_evaluates_on_val_and_writes_the_test_submission(tmp_path, target, config_name, extra):
    cityscapes = tmp_path / "cityscapes"
    write_cityscapes(cityscapes, splits=("train",), n_per_city=2)
    root = tmp_path / target
    if target == "acdc":
        written = write_acdc(root, splits={"train": 1, "val": 1, "test": 1})
    else:
        written = write_darkzurich(root, splits={"train": {"day": 1, "night": 2}, "val": {"night": 2},
                                                 "test": {"night": 2}})
    result = _train(tmp_path, config_name, root, cityscapes, extra)
    assert result.step == 2
    lines = [json.loads(line) for line in (result.run_dir / "scalars.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["loss/total"]) for line in lines)
    assert any(key.startswith("loss/assoc") for key in lines[-1])  # PLCA's association term ran

    # evaluated on the labelled val split (the final validation) and again through plca evaluate
    final = json.loads((result.run_dir / "metrics.json").read_text())
    assert set(final["per_class_IoU"]) == set(CITYSCAPES_CLASSES) and 0 <= final["mIoU"] <= 100
    assert main(["evaluate", "--checkpoint", str(result.run_dir), "--no-progress",
                 "--output", str(tmp_path / "val.json")]) == 0
    assert json.loads((tmp_path / "val.json").read_text())["mIoU"] == pytest.approx(final["mIoU"])

    # the test split: labels withheld; predictions for the server, plus the plain predictions to compare with
    common = ["--checkpoint", str(result.run_dir), "--split", "test", "--num-workers", "0", "--no-progress"]
    assert main(["predict", *common, "--output", str(tmp_path / "plain")]) == 0
    assert main(["predict", *common, "--output", str(tmp_path / "server"), "--submission"]) == 0
    test_names = sorted(name for name, sample in written.items() if sample.split == "test")
    expected = sorted(f"labelTrainIds/{name}_rgb_anon.png" for name in test_names)
    folder = tmp_path / "server" / "submission"
    assert sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.png")) == expected
    with zipfile.ZipFile(tmp_path / "server" / "submission.zip") as bundle:
        assert sorted(bundle.namelist()) == expected
    assert not (tmp_path / "server" / "labels").exists()  # only the server's files
    for name in test_names:
        plain = np.array(Image.open(tmp_path / "plain" / "labels" / f"{name}.png"))  # indices of data.classes
        server = np.array(Image.open(folder / "labelTrainIds" / f"{name}_rgb_anon.png"))
        assert server.shape == plain.shape == written[name].image.shape[:2]
        train_ids = np.array([CITYSCAPES_CLASSES.index(c) for c in CITYSCAPES_CLASSES])
        np.testing.assert_array_equal(server, train_ids[plain])


@pytest.mark.slow
def test_cityscapes_submission_is_scored_by_cityscapesscripts_as_plca_evaluate_scores_it(tmp_path):
    """The label-id files, named as written, found and scored by the official evaluator: the same mIoU as ours."""
    import copy

    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    from plca.engine.trainer import train
    from tiny_runs import tiny_source_only_config

    root = tmp_path / "cityscapes"
    write_cityscapes(root, splits=("train", "val"), n_per_city=1)
    config = tiny_source_only_config(root, tmp_path / "runs", "cs", iters=2, checkpoint_every=2)
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, classes=list(CITYSCAPES_CLASSES),
        source=dataclasses.replace(config.data.source, format="cityscapes"),
        val=dataclasses.replace(config.data.source, format="cityscapes", split="val")))
    result = train(config, progress=False)
    assert main(["predict", "--checkpoint", str(result.run_dir), "--split", "val", "--submission", "--output",
                 str(tmp_path / "server"), "--num-workers", "0", "--no-progress"]) == 0
    assert main(["evaluate", "--checkpoint", str(result.run_dir), "--no-progress",
                 "--output", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())

    samples = build_dataset("cityscapes", root, "val", CITYSCAPES_CLASSES).samples
    args = copy.copy(official.args)
    args.evalInstLevelScore = args.evalPixelAccuracy = args.JSONOutput = False
    args.quiet = True
    args.predictionPath, args.predictionWalk = str(tmp_path / "server" / "submission"), None
    predictions = [official.getPrediction(args, str(sample.label)) for sample in samples]
    assert all(Path(path).is_file() for path in predictions)
    theirs = official.evaluateImgLists(predictions, [str(sample.label) for sample in samples], args)
    assert ours["mIoU"] / 100 == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)
