"""Confusion matrix, IoU, protocols, JSON output and the printed tables."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plca.data.labels import CITYSCAPES_CLASSES, SYNTHIA13_CLASSES, SYNTHIA16_CLASSES
from plca.evaluation.metrics import (
    ConfusionMatrix, Protocol, confusion_matrix, format_markdown_table, format_table, iou_per_class,
    pixel_accuracy, protocols_for, summarize,
)

IGNORE = 255


def loop_confusion(pred, label, num_classes):
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for p, g in zip(pred.flatten().tolist(), label.flatten().tolist()):
        if g != IGNORE:
            matrix[g][p] += 1
    return torch.tensor(matrix)


def loop_iou(matrix, c):
    """TP / (TP + FP + FN) read off the matrix entry by entry."""
    k = len(matrix)
    tp = matrix[c][c]
    fp = sum(matrix[g][c] for g in range(k) if g != c)
    fn = sum(matrix[c][p] for p in range(k) if p != c)
    return math.nan if tp + fp + fn == 0 else tp / (tp + fp + fn)


def random_pair(seed, shape=(2, 7, 9), num_classes=5):
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(num_classes, shape, generator=generator)
    label[torch.rand(shape, generator=generator) < 0.2] = IGNORE
    pred = torch.randint(num_classes, shape, generator=generator)
    return pred, label


@pytest.mark.parametrize("seed", range(3))
def test_confusion_matrix_matches_python_loop(seed):
    pred, label = random_pair(seed)
    matrix = confusion_matrix(pred, label, 5)
    assert matrix.dtype == torch.int64 and matrix.shape == (5, 5)
    assert torch.equal(matrix, loop_confusion(pred, label, 5))


def test_predictions_on_ignored_pixels_are_not_checked_or_counted():
    label = torch.tensor([0, 1, IGNORE, IGNORE])
    pred = torch.tensor([0, 0, 9, -3])
    assert torch.equal(confusion_matrix(pred, label, 2), torch.tensor([[1, 0], [1, 0]]))


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match=r"label values \[3, 7\]"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 3, 7, IGNORE]), 3)
    with pytest.raises(ValueError, match=r"predicted values \[5\]"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="argmax"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 3)


def test_accumulator_sums_batches_and_resets():
    confusion = ConfusionMatrix(5)
    pairs = [random_pair(seed) for seed in range(3)]
    for pred, label in pairs:
        confusion.update(pred, label)
    expected = sum(loop_confusion(pred, label, 5) for pred, label in pairs)
    assert torch.equal(confusion.reduce_().matrix, expected)  # no process group: unchanged
    confusion.reset()
    assert confusion.matrix.sum() == 0


def test_iou_and_pixel_accuracy_on_a_hand_made_example():
    # ground truth: 0 0 0 1 1 2 | prediction: 0 0 1 1 2 2 (3 classes, plus class 3 never seen)
    # class 0: TP 2, FP 0, FN 1 -> 2/3;  class 1: TP 1, FP 1, FN 1 -> 1/3
    # class 2: TP 1, FP 1, FN 0 -> 1/2;  class 3: no ground truth, no prediction -> undefined (NaN)
    # pixel accuracy 4/6; mean over the defined classes (2/3 + 1/3 + 1/2) / 3 = 1/2
    label = torch.tensor([0, 0, 0, 1, 1, 2, IGNORE])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    matrix = confusion_matrix(pred, label, 4)
    iou = iou_per_class(matrix)
    assert iou.dtype == torch.float64
    assert iou[:3].tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 2], abs=1e-15) and math.isnan(iou[3])
    assert pixel_accuracy(matrix) == pytest.approx(4 / 6)
    metrics = summarize(matrix, ["a", "b", "c", "d"])
    assert metrics["mIoU"] == pytest.approx(50.0)
    assert metrics["per_class_IoU"]["d"] is None
    assert metrics["protocols"]["mIoU4"]["undefined"] == ["d"]
    assert metrics["pixel_accuracy"] == pytest.approx(400 / 6)


def test_missed_or_hallucinated_class_scores_zero_not_nan():
    # class 1 is in the ground truth but never predicted; class 2 is predicted but absent from it
    matrix = confusion_matrix(torch.tensor([0, 0, 2]), torch.tensor([0, 1, 0]), 3)
    assert iou_per_class(matrix).tolist() == pytest.approx([1 / 3, 0.0, 0.0])


def test_iou_matches_entrywise_formula_on_random_matrices():
    for seed in range(3):
        pred, label = random_pair(seed, num_classes=6)
        matrix = confusion_matrix(pred, label, 6)
        listed = matrix.tolist()
        expected = [loop_iou(listed, c) for c in range(6)]
        assert iou_per_class(matrix).tolist() == pytest.approx(expected, abs=1e-15, nan_ok=True)


def test_protocols_for_each_class_list():
    assert protocols_for(CITYSCAPES_CLASSES) == [Protocol("mIoU19", CITYSCAPES_CLASSES)]
    assert protocols_for(list(SYNTHIA16_CLASSES)) == [Protocol("mIoU16", SYNTHIA16_CLASSES),
                                                      Protocol("mIoU13", SYNTHIA13_CLASSES)]
    assert len(SYNTHIA16_CLASSES) == 16 and len(SYNTHIA13_CLASSES) == 13
    assert set(SYNTHIA16_CLASSES) - set(SYNTHIA13_CLASSES) == {"wall", "fence", "pole"}
    assert protocols_for(["road", "car", "sky"]) == [Protocol("mIoU3", ("road", "car", "sky"))]


def synthia16_summary(seed=0, absent="bus"):
    """summarize() of a random 16-class matrix in which one class is never seen nor predicted."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randint(0, 50, (16, 16), generator=generator)
    gone = SYNTHIA16_CLASSES.index(absent)
    matrix[gone, :] = 0
    matrix[:, gone] = 0
    return matrix, summarize(matrix, SYNTHIA16_CLASSES)


def test_summarize_synthia_reports_both_protocols_without_undefined_classes():
    matrix, metrics = synthia16_summary()
    listed = matrix.tolist()
    iou = {name: loop_iou(listed, c) for c, name in enumerate(SYNTHIA16_CLASSES)}
    defined16 = [100 * iou[n] for n in SYNTHIA16_CLASSES if n != "bus"]
    defined13 = [100 * iou[n] for n in SYNTHIA13_CLASSES if n != "bus"]
    assert metrics["protocol"] == "mIoU16"
    assert metrics["mIoU"] == pytest.approx(sum(defined16) / 15)
    assert metrics["protocols"]["mIoU16"]["mIoU"] == pytest.approx(sum(defined16) / 15)
    assert metrics["protocols"]["mIoU13"]["mIoU"] == pytest.approx(sum(defined13) / 12)
    assert metrics["protocols"]["mIoU13"]["classes"] == list(SYNTHIA13_CLASSES)
    assert metrics["protocols"]["mIoU13"]["undefined"] == ["bus"]
    assert metrics["per_class_IoU"]["road"] == pytest.approx(100 * iou["road"])
    assert metrics["pixel_accuracy"] == pytest.approx(100 * sum(listed[c][c] for c in range(16)) / matrix.sum().item())


def test_summary_is_strict_json():
    _, metrics = synthia16_summary()
    text = json.dumps(metrics, allow_nan=False)
    assert json.loads(text)["per_class_IoU"]["bus"] is None


def test_summary_of_an_empty_matrix_is_zero_not_nan():
    metrics = summarize(torch.zeros(3, 3, dtype=torch.long), ["a", "b", "c"])
    json.dumps(metrics, allow_nan=False)
    assert metrics["mIoU"] == 0.0 and metrics["pixel_accuracy"] == 0.0
    assert metrics["protocols"]["mIoU3"]["undefined"] == ["a", "b", "c"]


def test_summarize_rejects_a_mismatched_class_list():
    with pytest.raises(ValueError, match="does not match"):
        summarize(torch.zeros(3, 3, dtype=torch.long), ["a", "b"])


def test_plain_table_lists_every_class_protocol_and_run():
    _, with_gap = synthia16_summary(0)
    _, other = synthia16_summary(1, absent="road")
    text = format_table({"source-only": with_gap, "PLCA": other}, SYNTHIA16_CLASSES)
    lines = text.splitlines()
    assert "source-only" in lines[0] and "PLCA" in lines[0]
    for name in SYNTHIA16_CLASSES:
        row = next(line for line in lines if line.startswith(name + " "))
        expected = [f"{v:.1f}" if v is not None else "-" for v in
                    (with_gap["per_class_IoU"][name], other["per_class_IoU"][name])]
        assert row.split()[-2:] == expected
    mIoU16 = next(line for line in lines if line.startswith("mIoU16"))
    assert mIoU16.split()[-2:] == [f"{with_gap['mIoU']:.1f}*", f"{other['mIoU']:.1f}*"]
    assert any(line.startswith("mIoU13") for line in lines)
    assert "* source-only: bus left out of mIoU16, mIoU13 (no ground-truth and no predicted pixel)" in lines
    widths = {len(line) for line in lines if not line.startswith("*")}
    assert len(widths) == 1  # aligned columns


def test_markdown_table_has_one_row_per_run_and_a_column_per_class_and_protocol():
    _, first = synthia16_summary(0)
    _, second = synthia16_summary(2, absent="sky")
    text = format_markdown_table({"a": first, "b": second}, SYNTHIA16_CLASSES)
    lines = text.splitlines()
    assert len(lines) == 4
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["run", *SYNTHIA16_CLASSES, "mIoU16", "mIoU13"]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    row_b = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert row_b[0] == "b" and row_b[1 + SYNTHIA16_CLASSES.index("sky")] == "-"
    assert row_b[1] == f"{second['per_class_IoU']['road']:.1f}"


def _reduce_worker(rank: int, world_size: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        confusion = ConfusionMatrix(3)
        confusion.update(torch.tensor([rank, 0]), torch.tensor([rank, 2]))
        queue.put((rank, confusion.reduce_().matrix.tolist()))
    finally:
        dist.destroy_process_group()


def test_reduce_sums_the_matrices_of_all_processes(tmp_path):
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(_reduce_worker, args=(2, str(tmp_path / "init"), queue), nprocs=2, start_method="spawn")
    results = dict(queue.get(timeout=60) for _ in range(2))
    expected = [[1, 0, 0], [0, 1, 0], [2, 0, 0]]  # rank 0: (0,0), (2,0); rank 1: (1,1), (2,0)
    assert results[0] == results[1] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matrix_matches_cpu():
    pred, label = random_pair(0, shape=(2, 64, 64), num_classes=19)
    confusion = ConfusionMatrix(19, device="cuda")
    confusion.update(pred.cuda(), label.cuda())
    assert confusion.matrix.device.type == "cuda"
    assert torch.equal(confusion.matrix.cpu(), confusion_matrix(pred, label, 19))
