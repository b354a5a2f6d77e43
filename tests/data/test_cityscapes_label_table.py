"""Our Cityscapes label table (plca.data.labels) equals cityscapesscripts' own, where that is installed."""

from __future__ import annotations

import numpy as np
import pytest

from plca.data.labels import (CITYSCAPES_CLASSES, CITYSCAPES_MAX_ID, CITYSCAPES_TRAIN_LABELS, CLASS_COLORS,
                              IGNORE_INDEX, cityscapes_id_to_train_id, cityscapes_known_ids)

cityscapes_labels = pytest.importorskip("cityscapesscripts.helpers.labels")


def _official_train_labels():
    """cityscapesscripts' labels with a train id (0..18), in train-id order."""
    return sorted((label for label in cityscapes_labels.labels if 0 <= label.trainId < IGNORE_INDEX),
                  key=lambda label: label.trainId)


def test_the_19_rows_are_cityscapesscripts_names_ids_and_colours_in_train_id_order():
    official = _official_train_labels()
    assert [label.trainId for label in official] == list(range(19))
    assert [(label.name, label.id, tuple(label.color)) for label in official] == list(CITYSCAPES_TRAIN_LABELS)
    assert CITYSCAPES_CLASSES == tuple(label.name for label in official)
    assert CLASS_COLORS == {label.name: tuple(label.color) for label in official}


def test_the_id_to_train_id_table_is_cityscapesscripts_mapping():
    expected = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in cityscapes_labels.labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < IGNORE_INDEX:
            expected[label.id] = label.trainId
    np.testing.assert_array_equal(cityscapes_id_to_train_id(), expected)


def test_the_known_ids_are_cityscapesscripts_label_ids():
    official = {label.id for label in cityscapes_labels.labels if label.id >= 0}
    assert max(official) == CITYSCAPES_MAX_ID
    assert set(np.flatnonzero(cityscapes_known_ids()).tolist()) == official
