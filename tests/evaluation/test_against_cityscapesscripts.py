"""Our IoUs equal those of the official Cityscapes evaluator (cityscapesscripts) on random images.

Ground truth is written as Cityscapes label ids (``*_gtFine_labelIds.png``, including ids
that are ignored in evaluation) and read back through our label-id -> train-id table;
predictions are written as label-id PNGs for the official evaluator.
"""

import copy
import math

import numpy as np
import pytest
import torch
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from cityscapesscripts.helpers.labels import name2label
from PIL import Image

from plca.data.labels import (
    CITYSCAPES_CLASSES, IGNORE_INDEX, SYNTHIA13_CLASSES, SYNTHIA16_CLASSES, class_remap, cityscapes_id_to_train_id,
)
from plca.evaluation.metrics import ConfusionMatrix, summarize

SIZE = (32, 64)  # (H, W)
LABEL_IDS = np.array([label.id for label in cityscapes_labels if label.id >= 0])
EVAL_LABEL_IDS = np.array([name2label[name].id for name in CITYSCAPES_CLASSES])


def random_images(seed: int, count: int, never_seen: tuple[str, ...], never_predicted: tuple[str, ...]):
    """``count`` pairs ``(H, W) uint8``: (ground-truth Cityscapes label ids, predicted train ids)."""
    rng = np.random.default_rng(seed)
    gt_choices = np.array([i for i in LABEL_IDS if i not in [name2label[n].id for n in never_seen]])
    excluded = never_seen + never_predicted
    pred_choices = np.array([c for c, name in enumerate(CITYSCAPES_CLASSES) if name not in excluded])
    to_train = cityscapes_id_to_train_id()
    pairs = []
    for _ in range(count):
        gt = rng.choice(gt_choices, size=SIZE).astype(np.uint8)
        pred = rng.choice(pred_choices, size=SIZE)
        # copy the ground truth on about half the pixels so the IoUs are far from zero
        copy_mask = (rng.random(SIZE) < 0.5) & (to_train[gt] != IGNORE_INDEX)
        pred[copy_mask] = to_train[gt][copy_mask]
        never_predicted_ids = [CITYSCAPES_CLASSES.index(n) for n in never_predicted]
        pred[np.isin(pred, never_predicted_ids)] = pred_choices[0]
        pairs.append((gt, pred.astype(np.uint8)))
    return pairs


def official_scores(tmp_path, pairs_in_label_ids) -> dict:
    """Run cityscapesscripts' evaluateImgLists on (gt label ids, predicted label ids) written as PNGs."""
    predictions, ground_truths = [], []
    for index, (gt, pred) in enumerate(pairs_in_label_ids):
        stem = f"frankfurt_{index:06d}_000019"
        gt_path = tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png"
        pred_path = tmp_path / "results" / f"{stem}_pred.png"
        for path, array in ((gt_path, gt), (pred_path, pred)):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
        ground_truths.append(str(gt_path))
        predictions.append(str(pred_path))
    args = copy.copy(official.args)
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    return official.evaluateImgLists(predictions, ground_truths, args)


def assert_same_iou(ours: float | None, theirs: float, name: str) -> None:
    if math.isnan(theirs):
        assert ours is None, f"{name}: cityscapesscripts says undefined, we say {ours}"
    else:
        assert ours is not None and ours / 100 == pytest.approx(theirs, abs=1e-6), name


def test_19_class_protocol_matches_cityscapesscripts(tmp_path):
    pairs = random_images(0, 3, never_seen=("train",), never_predicted=("truck",))
    train_to_label_id = EVAL_LABEL_IDS.astype(np.uint8)
    theirs = official_scores(tmp_path, [(gt, train_to_label_id[pred]) for gt, pred in pairs])

    to_train = cityscapes_id_to_train_id()
    confusion = ConfusionMatrix(len(CITYSCAPES_CLASSES))
    for index, (_, pred) in enumerate(pairs):
        gt_path = tmp_path / "gtFine" / "val" / "frankfurt" / f"frankfurt_{index:06d}_000019_gtFine_labelIds.png"
        gt_train = to_train[np.array(Image.open(gt_path))]
        confusion.update(torch.from_numpy(pred).long(), torch.from_numpy(gt_train).long())
    ours = summarize(confusion.matrix, CITYSCAPES_CLASSES)

    assert ours["protocol"] == "mIoU19"
    for name in CITYSCAPES_CLASSES:
        assert_same_iou(ours["per_class_IoU"][name], theirs["classScores"][name], name)
    assert ours["per_class_IoU"]["train"] is None and ours["per_class_IoU"]["truck"] == 0.0
    assert ours["mIoU"] / 100 == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)


def test_synthia_protocols_match_cityscapesscripts_on_the_16_classes(tmp_path):
    # A 16-class model never predicts terrain/truck/train, and their ground truth is ignored:
    # for the official evaluator those pixels are relabelled 'unlabeled' (id 0).
    pairs = random_images(1, 3, never_seen=(), never_predicted=("terrain", "truck", "train"))
    to_train = cityscapes_id_to_train_id()
    to_16 = class_remap(SYNTHIA16_CLASSES)
    label_id_of_16 = np.array([name2label[name].id for name in SYNTHIA16_CLASSES], dtype=np.uint8)
    official_pairs, confusion = [], ConfusionMatrix(16)
    for gt, pred in pairs:
        gt16, pred16 = to_16[to_train[gt]], to_16[pred]
        assert (pred16 != IGNORE_INDEX).all()
        confusion.update(torch.from_numpy(pred16).long(), torch.from_numpy(gt16).long())
        dropped = np.isin(to_train[gt], [CITYSCAPES_CLASSES.index(n) for n in ("terrain", "truck", "train")])
        official_gt = np.where(dropped, np.uint8(0), gt)
        official_pairs.append((official_gt, label_id_of_16[pred16]))
    theirs = official_scores(tmp_path, official_pairs)["classScores"]
    ours = summarize(confusion.matrix, SYNTHIA16_CLASSES)

    for name in SYNTHIA16_CLASSES:
        assert_same_iou(ours["per_class_IoU"][name], theirs[name], name)
    for protocol, classes in (("mIoU16", SYNTHIA16_CLASSES), ("mIoU13", SYNTHIA13_CLASSES)):
        expected = sum(theirs[name] for name in classes) / len(classes)
        assert ours["protocols"][protocol]["mIoU"] / 100 == pytest.approx(expected, abs=1e-6), protocol
    assert ours["mIoU"] == ours["protocols"]["mIoU16"]["mIoU"]
