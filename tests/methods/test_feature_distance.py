"""Thing-class ImageNet feature distance: DAFormer's label down-scaling, only thing pixels count,
checked against brute-force loops."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from plca.data.labels import CITYSCAPES_CLASSES, SYNTHIA16_CLASSES
from plca.methods.addons import THING_CLASSES, downscale_labels, feature_distance_loss, thing_class_indices

IGNORE = 255


def test_thing_classes_by_name():
    assert thing_class_indices(CITYSCAPES_CLASSES) == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    synthia = thing_class_indices(SYNTHIA16_CLASSES)
    assert [SYNTHIA16_CLASSES[i] for i in synthia] == [n for n in THING_CLASSES if n not in ("truck", "train")]
    assert "pole" not in THING_CLASSES
    assert thing_class_indices(("road", "sky")) == []


def cell_bounds(index: int, cells: int, length: int) -> tuple[int, int]:
    """Adaptive pooling's cell: [floor(i L / n), ceil((i + 1) L / n))."""
    return index * length // cells, -(-(index + 1) * length // cells)


def reference_downscale(labels: torch.Tensor, size, min_ratio: float, num_classes: int) -> torch.Tensor:
    height, width = size
    out = torch.full((labels.shape[0], height, width), IGNORE, dtype=torch.int64)
    for b in range(labels.shape[0]):
        for i in range(height):
            for j in range(width):
                y0, y1 = cell_bounds(i, height, labels.shape[1])
                x0, x1 = cell_bounds(j, width, labels.shape[2])
                values = labels[b, y0:y1, x0:x1].reshape(-1).tolist()
                counts = Counter(num_classes if v == IGNORE else v for v in values)
                best = max(counts.values())
                label = min(v for v, n in counts.items() if n == best)
                if label != num_classes and best / len(values) >= min_ratio:
                    out[b, i, j] = label
    return out


def test_downscale_hand_made_cells():
    labels = torch.full((1, 4, 8), IGNORE)
    labels[0, :, 0:4] = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1]])  # 3/4 -> class 1
    labels[0, :, 4:8] = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])  # 1/2 -> ignore
    assert downscale_labels(labels, (1, 2), 0.75).tolist() == [[[1, 255]]]
    assert downscale_labels(labels, (1, 2), 0.5).tolist() == [[[1, 1]]]  # tie -> smaller index
    majority_ignore = torch.full((1, 2, 2), IGNORE)
    majority_ignore[0, 0, 0] = 3
    assert downscale_labels(majority_ignore, (1, 1), 0.0).tolist() == [[[255]]]


@pytest.mark.parametrize("label_size, size", [((16, 24), (4, 6)), ((17, 23), (4, 6)), ((12, 12), (5, 5))])
def test_downscale_against_brute_force(label_size, size):
    g = torch.Generator().manual_seed(0)
    # blocky labels so that many cells are pure, plus noise and ignore
    coarse = torch.randint(0, 4, (2, 3, 4), generator=g)
    labels = torch.nn.functional.interpolate(coarse[:, None].float(), size=label_size, mode="nearest")[:, 0].long()
    noise = torch.rand(labels.shape, generator=g)
    labels[noise < 0.1] = IGNORE
    labels[(noise > 0.1) & (noise < 0.2)] = 5
    for min_ratio in (0.0, 0.75):
        expected = reference_downscale(labels, size, min_ratio, num_classes=6)
        assert torch.equal(downscale_labels(labels, size, min_ratio, num_classes=6), expected)
        assert torch.equal(downscale_labels(labels, size, min_ratio), expected)


def reference_loss(student, imagenet, labels, things, min_ratio=0.75):
    num_classes = int(labels[labels != IGNORE].max()) + 1
    scaled = reference_downscale(labels, student.shape[-2:], min_ratio, num_classes)
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for y in range(student.shape[2]):
            for x in range(student.shape[3]):
                if int(scaled[b, y, x]) in things:
                    total += math.sqrt(sum((float(student[b, c, y, x]) - float(imagenet[b, c, y, x])) ** 2
                                           for c in range(student.shape[1])))
                    count += 1
    return total / count, scaled


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    imagenet = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    coarse = torch.randint(0, 6, (2, 3, 4), generator=g)
    labels = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    labels[0, 0, 0] = IGNORE  # 15 / 16 of a cell: still its class
    labels[1, :2, :2] = IGNORE  # 12 / 16: still >= 0.75
    labels[1, 4:8, 4:8] = torch.tensor([[0, 0, 1, 1]] * 4)  # 1/2 -> ignore
    return student, imagenet, labels


def test_loss_against_brute_force():
    student, imagenet, labels = make_inputs()
    things = [1, 3, 4]
    expected, scaled = reference_loss(student, imagenet, labels, things)
    assert 0 < sum(int(v) in things for v in scaled.reshape(-1)) < scaled.numel()
    loss = feature_distance_loss(student, imagenet, labels, things)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_only_thing_pixels_contribute():
    student, imagenet, labels = make_inputs(1)
    things = [1, 3, 4]
    _, scaled = reference_loss(student, imagenet, labels, things)
    is_thing = torch.isin(scaled, torch.tensor(things))
    assert is_thing.any() and (~is_thing).any()
    base = feature_distance_loss(student, imagenet, labels, things)
    changed = student.clone()
    changed.permute(0, 2, 3, 1)[~is_thing] += 100.0
    assert feature_distance_loss(changed, imagenet, labels, things).item() == pytest.approx(base.item(), rel=1e-12)
    changed = student.clone()
    changed.permute(0, 2, 3, 1)[is_thing] += 100.0
    assert feature_distance_loss(changed, imagenet, labels, things).item() > base.item() + 10

    student = student.clone().requires_grad_(True)
    imagenet = imagenet.clone().requires_grad_(True)
    feature_distance_loss(student, imagenet, labels, things).backward()
    assert (student.grad.permute(0, 2, 3, 1)[~is_thing] == 0).all()
    assert (student.grad.permute(0, 2, 3, 1)[is_thing] != 0).any()
    assert imagenet.grad is None  # the ImageNet features are detached


def test_no_thing_pixel_gives_zero_with_zero_gradient():
    student, imagenet, labels = make_inputs()
    student.requires_grad_(True)
    loss = feature_distance_loss(student, imagenet, labels, thing_classes=[17])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_identical_features_give_a_finite_zero_gradient():
    student, _, labels = make_inputs()
    student.requires_grad_(True)
    loss = feature_distance_loss(student, student.detach().clone(), labels, thing_classes=[1, 3, 4])
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


def test_bad_shapes():
    student, imagenet, labels = make_inputs()
    with pytest.raises(ValueError):
        feature_distance_loss(student, imagenet[:, :3], labels, [1])
    with pytest.raises(ValueError):
        feature_distance_loss(student, imagenet, labels[:1], [1])
    with pytest.raises(ValueError):
        downscale_labels(labels, (3, 4), num_classes=2)
