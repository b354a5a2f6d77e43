"""ClassMix masks take half of each source image's own classes (never ignore), and mixing
pastes source pixels, labels and weight 1 onto the target."""

from __future__ import annotations

import pytest
import torch

from plca.methods.addons import class_mix, class_mix_masks, mix


def label_with(classes: list[int], height: int = 4) -> torch.Tensor:
    """One ``(H, W)`` label: a column stripe per value of ``classes``."""
    return torch.tensor(classes).repeat(height, 1)


def chosen_classes(label: torch.Tensor, mask: torch.Tensor) -> set[int]:
    picked = set(label[mask[0] > 0].tolist())
    # whole classes only: every pixel of a picked class is in the mask, none of the others
    for value in set(label.tolist()[0]):
        inside = mask[0][label == value]
        assert bool((inside == inside[0]).all()), value
    return picked


@pytest.mark.parametrize("classes, expected", [([0, 1, 2, 3], 2), ([0, 4, 7], 2), ([5], 1),
                                               ([0, 1, 2, 3, 4], 3), ([1, 2], 1)])
def test_half_the_present_classes_rounded_up(classes, expected):
    label = label_with(classes + [255, 255])
    for seed in range(20):
        mask = class_mix_masks(label.unsqueeze(0), torch.Generator().manual_seed(seed))
        assert mask.shape == (1, 1, *label.shape) and mask.dtype == torch.float32
        picked = chosen_classes(label, mask[0])
        assert len(picked) == expected
        assert 255 not in picked
        assert bool((mask[0, 0][label == 255] == 0).all())


def test_each_class_is_picked_about_half_the_time():
    label = label_with([0, 1, 2, 3]).unsqueeze(0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    draws = 400
    for _ in range(draws):
        mask = class_mix_masks(label, g)
        counts += torch.tensor([float(mask[0, 0][label[0] == c][0]) for c in range(4)])
    assert torch.allclose(counts / draws, torch.full((4,), 0.5), atol=0.08)


def test_classes_come_from_each_image_itself():
    # image 0 holds classes 0, 1; image 1 holds 2, 3: each mask always covers one of its own classes
    labels = torch.stack([label_with([0, 1, 0, 1]), label_with([2, 3, 3, 2])])
    for seed in range(30):
        masks = class_mix_masks(labels, torch.Generator().manual_seed(seed))
        assert len(chosen_classes(labels[0], masks[0])) == 1
        assert len(chosen_classes(labels[1], masks[1])) == 1


def test_unlabelled_image_gives_an_empty_mask():
    labels = torch.full((2, 3, 5), 255)
    labels[1, 0, 0] = 4
    masks = class_mix_masks(labels, torch.Generator().manual_seed(0))
    assert masks[0].sum() == 0
    assert masks[1].sum() == 1


def test_deterministic_given_the_generator():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (2, 8, 8), generator=g)
    first = class_mix_masks(labels, torch.Generator().manual_seed(7))
    second = class_mix_masks(labels, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    others = [class_mix_masks(labels, torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert any(not torch.equal(first, other) for other in others)


def test_mix_images_labels_and_weights():
    g = torch.Generator().manual_seed(0)
    source_images = torch.rand(2, 3, 4, 5, generator=g) * 255
    target_images = torch.rand(2, 3, 4, 5, generator=g) * 255
    source_labels = torch.randint(0, 4, (2, 4, 5), generator=g)
    source_labels[:, 0, 0] = 255
    pseudo = torch.randint(0, 4, (2, 4, 5), generator=g)
    weights = torch.full((2, 4, 5), 0.3)
    images, labels, mixed_weights, masks = class_mix(source_images, source_labels, target_images, pseudo,
                                                     weights, torch.Generator().manual_seed(1))
    take = masks.bool()  # (B, 1, H, W)
    assert take.any() and (~take).any()
    assert torch.equal(images, torch.where(take, source_images, target_images))
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.where(take[:, 0], source_labels, pseudo))
    assert torch.equal(mixed_weights, torch.where(take[:, 0], torch.ones_like(weights), weights))
    assert (mixed_weights[take[:, 0]] == 1).all()
    # the source's ignore pixels are never pasted
    assert (labels[:, 0, 0] == pseudo[:, 0, 0]).all()


def test_mix_formula_with_a_soft_mask():
    mask = torch.tensor([[[[0.25, 1.0]]]])
    source, target = torch.tensor([[[[4.0, 4.0]]]]), torch.tensor([[[[8.0, 8.0]]]])
    assert mix(mask, source, target).tolist() == [[[[7.0, 4.0]]]]
    with pytest.raises(ValueError):
        mix(mask, source, target[..., :1])
    with pytest.raises(ValueError):
        mix(mask[:, 0], source, target)
