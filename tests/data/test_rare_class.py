"""Rare Class Sampling: pixel statistics and their cache, the softmax class distribution, the
deterministic sampler and DAFormer's crop retry rule, with absolute thresholds (DAFormer's pixels) and
relative ones (shares of each image and crop), which reproduce DAFormer's decisions on GTA5."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from plca.data.io import DatasetError
from plca.data.rare_class import (ClassStatistics, RareClassSampler, cached_class_statistics, class_pixel_counts,
                                  crop_threshold, crop_with_class, rcs_class_probabilities, retry_until_class)

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


# --------------------------------------------------------------------------- thresholds relative to the image / crop


def labels_of_two_sizes() -> list[np.ndarray]:
    """Four label maps, two of 20 x 30 (600 pixels) and two of 40 x 60 (2400), with ignored pixels."""
    rng = np.random.default_rng(5)
    labels = []
    for (height, width), pixels in [((20, 30), (400, 40, 9, 0)), ((40, 60), (2000, 40, 30, 0)),
                                    ((20, 30), (500, 5, 25, 0)), ((40, 60), (1900, 100, 20, 4))]:
        label = np.full(height * width, 255, dtype=np.uint8)
        start = 0
        for class_index, count in enumerate(pixels):
            label[start:start + count] = class_index
            start += count
        labels.append(rng.permutation(label).reshape(height, width))
    return labels


def eligible_reference(labels, class_index, min_pixels=None, min_pixels_ratio=None):
    """Written out: the images with more pixels of the class than min_pixels, or than the ratio x its H x W."""
    chosen = []
    for position, label in enumerate(labels):
        pixels = int((label == class_index).sum())
        height, width = label.shape
        threshold = min_pixels if min_pixels_ratio is None else min_pixels_ratio * height * width
        if pixels > threshold:
            chosen.append(position)
    return chosen


def test_relative_image_threshold_equals_the_written_out_rule():
    labels = labels_of_two_sizes()
    stats = ClassStatistics.from_label_maps(labels, CLASSES, [f"img{i}" for i in range(4)])
    assert stats.sizes.tolist() == [[20, 30], [40, 60], [20, 30], [40, 60]]
    assert stats.areas.tolist() == [600, 2400, 600, 2400]  # ignored pixels count in the image's size
    relative = RareClassSampler(stats, min_pixels_ratio=0.02)  # more than 12 pixels of 600, 48 of 2400
    absolute = RareClassSampler(stats, min_pixels=20)
    np.testing.assert_allclose(relative.image_thresholds, [12, 48, 12, 48])
    for class_index in range(len(CLASSES)):
        for sampler, kwargs in ((relative, {"min_pixels_ratio": 0.02}), (absolute, {"min_pixels": 20})):
            expected = eligible_reference(labels, class_index, **kwargs)
            got = sampler.images_with_class.get(class_index, np.array([], dtype=np.int64)).tolist()
            assert got == expected, (class_index, kwargs)
    # the two differ: car's 40 pixels pass 12 of the small image but not 48 of the large one
    assert relative.images_with_class[1].tolist() == [0, 3] and absolute.images_with_class[1].tolist() == [0, 1, 3]
    assert relative.images_with_class[2].tolist() == [2] and absolute.images_with_class[2].tolist() == [1, 2]
    assert relative.dropped_classes == (3,) and absolute.dropped_classes == (3,)  # train: 4 pixels, both too few
    assert relative.min_pixels is None and absolute.min_pixels_ratio is None
    assert relative.describe_threshold() == "it on more than 2 % of its pixels"
    assert absolute.describe_threshold("car") == "more than 20 pixels of car"
    for index in range(300):
        class_index, image = relative.sample(index)
        assert (labels[image] == class_index).sum() > 0.02 * labels[image].size


def test_image_threshold_arguments():
    stats = ClassStatistics.from_label_maps(labels_of_two_sizes(), CLASSES)
    with pytest.raises(DatasetError, match="more than 3000 pixels of any class"):
        RareClassSampler(stats)  # neither given: DAFormer's 3000, which no class passes here
    with pytest.raises(ValueError, match="not both"):
        RareClassSampler(stats, min_pixels=10, min_pixels_ratio=0.01)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RareClassSampler(stats, min_pixels_ratio=1.0)
    with pytest.raises(ValueError, match="size"):
        RareClassSampler(ClassStatistics(CLASSES, stats.counts), min_pixels_ratio=0.01)
    with pytest.raises(DatasetError, match="min_pixels_ratio"):
        RareClassSampler(stats, min_pixels_ratio=0.9)
    with pytest.raises(ValueError, match="sizes"):
        ClassStatistics(CLASSES, stats.counts, sizes=[[20, 30]])
    with pytest.raises(ValueError, match="more labelled pixels"):
        ClassStatistics(CLASSES, stats.counts, sizes=[[2, 3]] * 4)


def crop_reference(labels, class_index, threshold_of):
    """Written out: the position of the draw DAFormer's loop keeps (1 + 10 draws at most)."""
    for position, label in enumerate(labels[:11]):
        if (label == class_index).sum() > threshold_of(label):
            return position
    return 10


def test_relative_crop_threshold_equals_the_written_out_rule():
    # crops of two sizes: 60 pixels of class 2 pass 5 % of 20 x 20 (20) but not of 40 x 40 (80)
    sequences = [
        [label_with(60, size=40), label_with(70, size=40), label_with(60, size=20), label_with(90, size=40)],
        [label_with(10, size=20), label_with(81, size=40)],
        [label_with(80, size=40)] * 12,
        [label_with(21, size=20)],
    ]
    sequences = [sequence + [label_with(0, size=20)] * (11 - len(sequence)) for sequence in sequences]
    for sequence in sequences:
        for kwargs, threshold_of in (({"min_crop_pixels_ratio": 0.05}, lambda label: 0.05 * label.size),
                                     ({"min_pixels": 100, "min_crop_ratio": 0.5}, lambda label: 50)):
            drawn = []

            def draw():
                drawn.append(1)
                return len(drawn) - 1, sequence[len(drawn) - 1]

            position, _ = retry_until_class(draw, class_index=2, **kwargs)
            assert position == crop_reference(sequence, 2, threshold_of), (sequence, kwargs)
    # relative and absolute part ways on the first sequence
    assert crop_reference(sequences[0], 2, lambda label: 0.05 * label.size) == 2
    assert crop_reference(sequences[0], 2, lambda label: 50) == 0
    # tensors, a ratio of 0 (no re-draws), and min_crop_ratio without min_pixels
    drawn = []
    retry_until_class(lambda: drawn.append(1) or (None, torch.zeros(8, 8)), 2, min_crop_pixels_ratio=0.0)
    assert len(drawn) == 1
    with pytest.raises(ValueError, match="min_crop_pixels_ratio"):
        retry_until_class(lambda: (None, torch.zeros(8, 8)), 2, min_pixels=None, min_crop_ratio=0.5)
    assert crop_threshold(400, None, None, 0.05) == pytest.approx(20.0)
    assert crop_threshold(400, 3000, 0.5) == 1500.0 and crop_threshold(400, 3000, 0.0) is None


def test_crop_with_class_relative():
    label = np.zeros((60, 80), dtype=np.uint8)
    label[30:60, 40:80] = 5
    image = np.stack([label] * 3, axis=-1)
    _, crop_label = crop_with_class(image, label, (30, 40), 5, np.random.default_rng(3), min_pixels=None,
                                    min_crop_ratio=None, min_crop_pixels_ratio=200 / 1200 + 1e-9)
    rng = np.random.default_rng(3)
    for attempt in range(11):
        top, left = int(rng.integers(0, 31)), int(rng.integers(0, 41))
        window = label[top:top + 30, left:left + 40]
        if (window == 5).sum() > 200:
            break
    assert attempt > 0 and np.array_equal(window, crop_label)


# --------------------------------------------------------------------------- DAFormer on GTA5, as shares

GTA5_HEIGHT, GTA5_WIDTH = 1052, 1914  # the stored label files DAFormer counts (tools/convert_datasets/gta.py)
GTA5_MIN_PIXELS_RATIO = 0.00149  # 3000 / (1914 x 1052) = 0.0014899
DAFORMER_CROP_RATIO = 0.005723  # 1500 / (512 x 512) = 0.0057220


def test_relative_thresholds_reproduce_daformer_on_gta5():
    assert round(3000 / (GTA5_HEIGHT * GTA5_WIDTH), 5) == GTA5_MIN_PIXELS_RATIO
    assert round(3000 * 0.5 / 512 ** 2, 6) == pytest.approx(0.005722)
    # image choice: counts around 3000 and anywhere else, on GTA5-sized labels
    rng = np.random.default_rng(0)
    car = np.concatenate([np.arange(2990, 3011), rng.integers(0, 20_000, 300)])
    counts = np.zeros((car.size, len(CLASSES)), dtype=np.int64)
    counts[:, 1] = car
    counts[:, 0] = GTA5_HEIGHT * GTA5_WIDTH - car
    stats = ClassStatistics(CLASSES, counts, sizes=[[GTA5_HEIGHT, GTA5_WIDTH]] * car.size)
    absolute = RareClassSampler(stats, min_pixels=3000)
    relative = RareClassSampler(stats, min_pixels_ratio=GTA5_MIN_PIXELS_RATIO)
    assert relative.images_with_class[1].tolist() == absolute.images_with_class[1].tolist()
    assert 3000 <= relative.image_thresholds[0] < 3001
    # ... and on real label maps of that size
    labels = []
    for pixels in (3000, 3001):
        label = np.zeros((GTA5_HEIGHT, GTA5_WIDTH), dtype=np.uint8)
        label.reshape(-1)[:pixels] = 1
        labels.append(label)
    stats = ClassStatistics.from_label_maps(labels, CLASSES)
    assert (RareClassSampler(stats, min_pixels_ratio=GTA5_MIN_PIXELS_RATIO).images_with_class[1].tolist()
            == RareClassSampler(stats, min_pixels=3000).images_with_class[1].tolist() == [1])
    # the crop: 512 x 512 crops (of the label resized to 1280 x 704) holding 1400 .. 1600 pixels of the class
    def keeps_the_first(crop, **kwargs) -> bool:
        drawn = []
        retry_until_class(lambda: drawn.append(1) or (None, crop), 2, **kwargs)
        return len(drawn) == 1

    for pixels in range(1400, 1601):
        crop = np.zeros((512, 512), dtype=np.uint8)
        crop.reshape(-1)[:pixels] = 2
        daformer = keeps_the_first(crop, min_pixels=3000, min_crop_ratio=0.5)
        assert daformer == keeps_the_first(crop, min_crop_pixels_ratio=DAFORMER_CROP_RATIO) == (pixels > 1500), pixels
    # three significant digits (0.572 %) part from DAFormer only at exactly 1500 pixels
    for pixels in range(1400, 1601):
        assert (pixels > crop_threshold(512 ** 2, None, None, 0.00572)) == (pixels > 1500) or pixels == 1500


def test_shipped_configs_use_daformer_figures():
    from pathlib import Path

    from plca.config import load_config

    configs = Path(__file__).resolve().parent.parent.parent / "configs"
    for name in ("folder_self_training", "folder_self_training_plca"):
        rcs = load_config(configs / f"{name}.yaml").data.rare_class_sampling
        assert rcs.enabled and (rcs.min_pixels, rcs.min_crop_ratio) == (None, None)
        assert (rcs.min_pixels_ratio, rcs.min_crop_pixels_ratio) == (GTA5_MIN_PIXELS_RATIO, DAFORMER_CROP_RATIO)
    for name in ("gta2cityscapes_self_training", "synthia2cityscapes_self_training_plca",
                 "gta2cityscapes_daformer_mitb5"):
        rcs = load_config(configs / f"{name}.yaml").data.rare_class_sampling
        assert rcs.enabled and (rcs.min_pixels, rcs.min_crop_ratio, rcs.temperature) == (3000, 0.5, 0.01)
        assert rcs.min_pixels_ratio is None and rcs.min_crop_pixels_ratio is None


# --------------------------------------------------------------------------- statistics files: version 1 and 2


def test_statistics_files_store_the_sizes_and_old_ones_still_load(tmp_path):
    labels = labels_of_two_sizes()
    names = tuple(f"img{i}" for i in range(4))
    stats = ClassStatistics.from_label_maps(labels, CLASSES, names)
    path = tmp_path / "stats.json"
    stats.save(path)
    payload = json.loads(path.read_text())
    assert payload["version"] == 2 and payload["sizes"] == [[20, 30], [40, 60], [20, 30], [40, 60]]
    loaded = ClassStatistics.load(path, CLASSES, 4, names)
    assert np.array_equal(loaded.sizes, stats.sizes) and np.array_equal(loaded.counts, stats.counts)
    # a version-1 file (no sizes) loads, and serves absolute thresholds only
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "plca.class_statistics", "version": 1, "classes": list(CLASSES),
                               "names": list(names), "counts": stats.counts.tolist()}))
    loaded = ClassStatistics.load(old, CLASSES, 4, names)
    assert loaded.sizes is None and loaded.areas is None
    assert RareClassSampler(loaded, min_pixels=20).images_with_class[1].tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="size"):
        RareClassSampler(loaded, min_pixels_ratio=0.02)


@pytest.mark.parametrize("sizes, message", [
    ([[20, 30]], "sizes"),  # one size for two images
    ([[20, 0], [20, 30]], "sizes"),
    ([[20, 30.5], [20, 30]], "sizes"),
    ([[20], [20, 30]], "sizes"),
    ("20x30", "sizes"),
    ([[2, 3], [20, 30]], "more labelled pixels"),
])
def test_corrupted_sizes_name_the_file(tmp_path, sizes, message):
    path = tmp_path / "broken.json"
    rows = [[10, 0, 0, 0], [1, 0, 0, 0]]
    path.write_text(json.dumps({"format": "plca.class_statistics", "version": 2, "classes": list(CLASSES),
                                "names": None, "counts": rows, "sizes": sizes}))
    with pytest.raises(DatasetError, match=message) as error:
        ClassStatistics.load(path)
    assert str(path) in str(error.value)
