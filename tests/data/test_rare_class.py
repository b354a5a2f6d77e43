"""Rare Class Sampling: pixel statistics and their cache, the softmax class distribution, the
deterministic sampler and DAFormer's crop retry rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from plca.data.io import DatasetError
from plca.data.rare_class import (ClassStatistics, RareClassSampler, cached_class_statistics, class_pixel_counts,
                                  crop_with_class, rcs_class_probabilities, retry_until_class)

CLASSES = ("road", "car", "bus", "train")


def test_pixel_counts():
    first = np.array([[0, 0, 255], [1, 3, 3]], dtype=np.uint8)
    second = torch.tensor([[255, 255], [2, 2]])
    counts = class_pixel_counts([first, second], num_classes=4)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[2, 1, 0, 2], [0, 0, 2, 0]]
    assert class_pixel_counts([], 4).shape == (0, 4)
    with pytest.raises(ValueError, match="label map 0"):
        class_pixel_counts([np.array([[7]])], num_classes=4)


def test_frequencies_and_probabilities():
    stats = ClassStatistics(CLASSES, np.array([[60, 10, 0, 0], [20, 5, 5, 0]]))
    np.testing.assert_allclose(stats.frequencies, [0.8, 0.15, 0.05, 0.0])
    frequencies = [0.5, 0.3, 0.15, 0.05]
    for temperature in (0.01, 0.2, 1.0):
        expected = np.array([math.exp((1 - f) / temperature) for f in frequencies])
        np.testing.assert_allclose(rcs_class_probabilities(frequencies, temperature), expected / expected.sum(),
                                   rtol=1e-12)
    # rarer classes are drawn more often; a low temperature is close to always the rarest
    probabilities = rcs_class_probabilities(frequencies, 0.01)
    assert list(np.argsort(probabilities)) == [0, 1, 2, 3]
    assert probabilities[3] > 0.99
    with pytest.raises(ValueError):
        rcs_class_probabilities(frequencies, 0.0)


def statistics(seed: int = 0, images: int = 40) -> ClassStatistics:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6000, size=(images, len(CLASSES)))
    counts[:, 0] += 50_000  # road is everywhere
    return ClassStatistics(CLASSES, counts, tuple(f"img{i}" for i in range(images)))


def test_save_load_round_trip(tmp_path):
    stats = statistics()
    path = tmp_path / "stats.json"
    stats.save(path)
    loaded = ClassStatistics.load(path, CLASSES, stats.num_images, stats.names)
    assert loaded.classes == stats.classes and loaded.names == stats.names
    assert np.array_equal(loaded.counts, stats.counts)
    assert not (tmp_path / "stats.json.tmp").exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read"),
    (json.dumps({"format": "other"}), "not a class-statistics cache"),
    (json.dumps({"format": "plca.class_statistics", "version": 99}), "version"),
    (json.dumps({"format": "plca.class_statistics", "version": 1, "classes": ["a"], "names": None,
                 "counts": [[-1]]}), "non-negative"),
    (json.dumps({"format": "plca.class_statistics", "version": 1, "classes": ["a"], "names": None,
                 "counts": [[1, 2]]}), "non-negative"),
    (json.dumps({"format": "plca.class_statistics", "version": 1, "classes": ["a"], "names": ["x", "y"],
                 "counts": [[1]]}), "names"),
])
def test_corrupted_cache_names_the_file(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as error:
        ClassStatistics.load(path)
    assert str(path) in str(error.value)


def test_mismatched_cache_names_the_file(tmp_path):
    stats = statistics()
    path = tmp_path / "stats.json"
    stats.save(path)
    for kwargs, message in [({"classes": CLASSES[:3]}, "classes"), ({"num_images": 41}, "41"),
                            ({"names": ("other",) + stats.names[1:]}, "position 0")]:
        with pytest.raises(DatasetError, match=message) as error:
            ClassStatistics.load(path, **kwargs)
        assert str(path) in str(error.value)
    ClassStatistics(CLASSES, stats.counts).save(path)
    with pytest.raises(DatasetError, match="no sample names"):
        ClassStatistics.load(path, names=stats.names)


def test_cached_statistics_computes_once(tmp_path):
    path = tmp_path / "cache.json"
    labels = [np.array([[0, 1], [1, 255]]), np.array([[3, 3], [3, 3]])]
    calls = []

    def label_maps():
        calls.append(1)
        return iter(labels)

    first = cached_class_statistics(path, CLASSES, ("a", "b"), label_maps)
    assert first.counts.tolist() == [[1, 2, 0, 0], [0, 0, 0, 4]]

    def fail():
        raise AssertionError("the cache should have been used")

    second = cached_class_statistics(path, CLASSES, ("a", "b"), fail)
    assert np.array_equal(second.counts, first.counts) and len(calls) == 1
    with pytest.raises(DatasetError, match="cached for 2 images"):
        cached_class_statistics(path, CLASSES, ("a", "b", "c"), label_maps)


def test_sampled_classes_follow_the_softmax():
    # frequencies 0.26 / 0.25 / 0.25 / 0.24 at T = 0.01: probabilities about .07 / .19 / .19 / .53
    counts = np.array([[2600, 2500, 2500, 2400]] * 5)
    sampler = RareClassSampler(ClassStatistics(CLASSES, counts), temperature=0.01, min_pixels=100, seed=3)
    expected = rcs_class_probabilities([0.26, 0.25, 0.25, 0.24], 0.01)
    np.testing.assert_allclose(sampler.probabilities, expected, rtol=1e-9)
    draws = 4000
    observed = np.bincount([sampler.sample(i)[0] for i in range(draws)], minlength=4)
    chi_square = float(((observed - draws * expected) ** 2 / (draws * expected)).sum())
    assert chi_square < 20.0  # 3 degrees of freedom: P(chi2 > 16.3) = 0.001


def test_determinism_per_index():
    stats = statistics()
    sampler = RareClassSampler(stats, temperature=0.05, min_pixels=3000, seed=7)
    again = RareClassSampler(stats, temperature=0.05, min_pixels=3000, seed=7)
    forward = [sampler.sample(i) for i in range(50)]
    backward = [again.sample(i) for i in reversed(range(50))][::-1]
    assert forward == backward
    other = RareClassSampler(stats, temperature=0.05, min_pixels=3000, seed=8)
    assert forward != [other.sample(i) for i in range(50)]
    with pytest.raises(ValueError):
        sampler.sample(-1)


def test_images_without_enough_pixels_are_never_drawn():
    counts = np.array([
        [9000, 3001, 0, 0],
        [9000, 3000, 5000, 0],  # exactly min_pixels of car: not eligible for car
        [9000, 5000, 10, 0],
        [9000, 0, 2999, 0],
    ])
    stats = ClassStatistics(CLASSES, counts)
    sampler = RareClassSampler(stats, temperature=1.0, min_pixels=3000, seed=0)
    assert sampler.classes.tolist() == [0, 1, 2]  # train has no pixel at all
    assert sampler.dropped_classes == ()
    assert sampler.images_with_class[1].tolist() == [0, 2]
    assert sampler.images_with_class[2].tolist() == [1]
    seen = set()
    for index in range(600):
        class_index, image = sampler.sample(index)
        assert counts[image, class_index] > 3000
        seen.add((class_index, image))
    assert seen == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (2, 1)}


def test_classes_without_an_eligible_image_are_dropped():
    counts = np.array([[9000, 100, 4000, 0], [9000, 200, 4000, 0]])
    sampler = RareClassSampler(ClassStatistics(CLASSES, counts), temperature=0.01, min_pixels=3000)
    assert sampler.classes.tolist() == [0, 2]
    assert sampler.dropped_classes == (1,)
    frequencies = counts.sum(0) / counts.sum()
    np.testing.assert_allclose(sampler.probabilities, rcs_class_probabilities(frequencies[[0, 2]], 0.01))
    assert {sampler.sample(i)[0] for i in range(200)} <= {0, 2}
    with pytest.raises(DatasetError, match="no class"):
        RareClassSampler(ClassStatistics(CLASSES, counts), min_pixels=10_000)


def label_with(pixels: int, class_index: int = 2, size: int = 100) -> np.ndarray:
    label = np.zeros((size, size), dtype=np.uint8)
    label.reshape(-1)[:pixels] = class_index
    return label


def test_retry_rule_is_strictly_more_than_min_pixels_times_ratio():
    sequence = [label_with(1500), label_with(1501), label_with(5000)]
    drawn = []

    def draw():
        drawn.append(1)
        return None, sequence[len(drawn) - 1]

    _, label = retry_until_class(draw, class_index=2, min_pixels=3000, min_crop_ratio=0.5)
    assert (label == 2).sum() == 1501 and len(drawn) == 2


def test_retry_gives_up_after_ten_redraws_and_keeps_the_last():
    drawn = []

    def draw():
        drawn.append(len(drawn))
        return len(drawn), label_with(10)

    image, _ = retry_until_class(draw, class_index=2, min_pixels=3000, min_crop_ratio=0.5, retries=10)
    assert len(drawn) == 11 and image == 11
    drawn.clear()
    image, _ = retry_until_class(draw, class_index=2, min_pixels=3000, min_crop_ratio=0.0)
    assert len(drawn) == 1  # no check at all without a crop ratio
    drawn.clear()
    retry_until_class(lambda: (None, torch.from_numpy(label_with(2000))), class_index=2)  # tensors count too


def test_crop_with_class():
    label = np.zeros((60, 80), dtype=np.uint8)
    label[30:60, 40:80] = 5  # class 5 fills the bottom-right quarter
    image = np.stack([label] * 3, axis=-1) * 10
    crop_rng = np.random.default_rng(3)
    crop_image, crop_label = crop_with_class(image, label, (30, 40), 5, crop_rng, min_pixels=400,
                                             min_crop_ratio=0.5)
    assert crop_label.shape == (30, 40) and crop_image.shape == (30, 40, 3)
    assert (crop_label == 5).sum() > 200
    assert np.array_equal(crop_image[..., 0], crop_label * 10)  # image and label cropped alike

    # the same windows as a hand-rolled loop over the same random stream
    rng = np.random.default_rng(3)
    for attempt in range(11):
        top, left = int(rng.integers(0, 31)), int(rng.integers(0, 41))
        window = label[top:top + 30, left:left + 40]
        if (window == 5).sum() > 200:
            break
    assert attempt > 0  # the first window was rejected
    assert np.array_equal(window, crop_label)
    again = crop_with_class(image, label, (30, 40), 5, np.random.default_rng(3), min_pixels=400)
    assert np.array_equal(again[1], crop_label)
    with pytest.raises(ValueError):
        crop_with_class(image, label, (61, 10), 5, np.random.default_rng(3))
