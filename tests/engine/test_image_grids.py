"""TensorBoard image grids: titled columns input | prediction | label, a colour legend, no empty label column."""

import numpy as np
import torch

from plca.data.labels import palette
from plca.engine.image_grids import _TITLE_HEIGHT, colour_legend, log_image_grid, make_image_grid

CLASSES = ["road", "car", "sky", "my class"]


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_image(self, tag, image, step, dataformats):
        self.calls.append((tag, image, step, dataformats))


def test_image_grid_rows_are_input_prediction_label_under_titles():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(3, 3, 16, 24), dtype=np.uint8))
    predictions = torch.from_numpy(rng.integers(0, 4, size=(3, 2, 3)))  # at 1/8 resolution
    labels = torch.from_numpy(rng.integers(0, 4, size=(3, 16, 24)))
    labels[0, 0, 0] = 255
    grid = make_image_grid(images, predictions, labels, CLASSES, max_images=2, legend=False)
    assert grid.shape == (_TITLE_HEIGHT + 2 * 16, 3 * 24, 3) and grid.dtype == np.uint8
    body = grid[_TITLE_HEIGHT:]
    colors = palette(CLASSES)
    for row in range(2):
        block = body[row * 16:(row + 1) * 16]
        assert np.array_equal(block[:, :24], images[row].permute(1, 2, 0).numpy())
        upsampled = predictions[row].numpy().repeat(8, axis=0).repeat(8, axis=1)
        assert np.array_equal(block[:, 24:48], colors[upsampled])
        assert np.array_equal(block[:, 48:], colors[labels[row].numpy()])
    assert np.array_equal(body[0, 48], [0, 0, 0])  # ignore is black
    header = grid[:_TITLE_HEIGHT]
    assert (header < 128).any() and (header == 255).mean() > 0.5  # dark title text on white


def test_unlabelled_images_get_no_label_column_and_the_legend_shows_every_colour():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 16, 24), dtype=np.uint8))
    predictions = torch.from_numpy(rng.integers(0, 4, size=(2, 16, 24)))
    unlabelled = torch.full((2, 16, 24), 255)
    assert make_image_grid(images, predictions, unlabelled, CLASSES, legend=False).shape[1] == 2 * 24
    assert make_image_grid(images, predictions, None, CLASSES, legend=False).shape[1] == 2 * 24
    legend = colour_legend(CLASSES, width=300)
    pixels = {tuple(p) for p in legend.reshape(-1, 3)}
    assert all(tuple(int(c) for c in palette(CLASSES)[k]) in pixels for k in range(len(CLASSES)))
    full = make_image_grid(images, predictions, None, CLASSES)
    assert full.shape[0] > _TITLE_HEIGHT + 2 * 16  # the legend sits below the panels


def test_log_image_grid_writes_one_hwc_image():
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    maps = torch.zeros(1, 8, 8, dtype=torch.int64)
    writer = FakeWriter()
    log_image_grid(writer, "images/source", images, maps, maps, CLASSES, step=5)
    (tag, grid, step, fmt), = writer.calls
    assert (tag, step, fmt) == ("images/source", 5, "HWC") and grid.ndim == 3
    log_image_grid(None, "x", images, maps, maps, CLASSES, step=0)  # no writer: nothing happens
