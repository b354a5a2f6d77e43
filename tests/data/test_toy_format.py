"""A new dataset format is one file: a toy format defined here alone is registered, built from a config,
recognised and checked by ``plca prepare``, named by the command line, and unregistered after."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from plca.cli import build_parser, main
from plca.config import build_config
from plca.data.build import build_run_datasets
from plca.data.datasets import DATASET_FORMATS, build_dataset
from plca.data.formats import DatasetFormat, LabelMap, Listing, format_names, guess_format, register_format, \
    unregister_format
from plca.data.formats.base import Issues, label_folder, pair, require_images, require_root
from plca.data.io import read_label
from plca.data.labels import IGNORE_INDEX

TOY_CLASSES = ("road", "car", "sky")
TOY_IDS = {10: "road", 20: "car", 30: "sky"}  # 0 = void


class ToyFormat(DatasetFormat):
    """``pictures/NAME.png`` and ``masks/NAME_mask.png`` holding ids 10 (road), 20 (car), 30 (sky), 0 (void);
    one split, ``all``."""

    name = "toy"
    title = "Toy"
    image_folder = "pictures"
    layout = "pictures/NAME.png and masks/NAME_mask.png"
    class_names = TOY_CLASSES

    def label_map(self, classes: Sequence[str]) -> LabelMap:
        table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        known = np.zeros(256, dtype=bool)
        known[0] = True
        for raw, name in TOY_IDS.items():
            known[raw] = True
            if name in classes:
                table[raw] = list(classes).index(name)
        return LabelMap(read_label, table, known, "toy ids 0, 10, 20, 30")

    def list_split(self, root: Path, split: str, classes: Sequence[str], require_labels: bool,
                   issues: Issues) -> Listing:
        require_root(self, root, issues)
        images = require_images(self, root, issues)
        if split != "all":
            issues.fatal(f"the toy format has one split, all (asked for '{split}')")
        has_labels = label_folder(self, root / "masks", "toy masks", "masks/ sits next to pictures/",
                                  require_labels, issues)
        names = sorted(path.stem for path in images.glob("*.png"))
        samples = pair(names, lambda n: images / f"{n}.png",
                       (lambda n: root / "masks" / f"{n}_mask.png") if has_labels else None, require_labels,
                       f"toy split '{split}' in {root}", images, root / "masks", issues)
        return Listing(samples, self.label_map(classes))

    def splits(self, root: Path) -> list[str]:
        return ["all"]

    def recognise(self, root: Path) -> int:
        return 2 if (root / "pictures").is_dir() and (root / "masks").is_dir() else 0


@pytest.fixture
def toy_format():
    fmt = register_format(ToyFormat())
    yield fmt
    unregister_format(fmt.name)


def write_toy(root: Path, n: int = 4, size: tuple[int, int] = (32, 32)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    (root / "pictures").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = {}
    for index in range(n):
        name = f"shot{index}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "pictures" / f"{name}.png")
        masks[name] = rng.choice(np.array([0, 10, 20, 30], np.uint8), size=size)
        Image.fromarray(masks[name]).save(root / "masks" / f"{name}_mask.png")
    return masks


def test_registered_format_is_known_everywhere_and_gone_after(toy_format, tmp_path):
    assert "toy" in format_names() and "toy" in DATASET_FORMATS and "toy" in format_names(prepare=True)
    commands = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert "toy" in next(a for a in commands["prepare"]._actions if a.dest == "format").choices
    with pytest.raises(ValueError, match="registered already"):
        register_format(ToyFormat())
    unregister_format("toy")
    assert "toy" not in DATASET_FORMATS and "toy" not in format_names()
    register_format(toy_format)  # for the fixture to unregister


def test_dataset_built_from_a_config(toy_format, tmp_path):
    masks = write_toy(tmp_path / "toy")
    config = build_config({
        "method": "source_only",
        "data": {"classes": ["sky", "road"], "num_workers": 0,
                 "source": {"format": "toy", "root": str(tmp_path / "toy"), "split": "all"}},
        "model": {"backbone": "resnet18", "style": "pytorch"},
        "train": {"iters": 1, "batch_size": 2, "crop_size": [32, 32]},
        "output_dir": str(tmp_path / "runs"), "device": "cpu",
    })
    source = build_run_datasets(config.data, config.train, None, uses_target=False).source
    assert [sample.name for sample in source.samples] == ["shot0", "shot1", "shot2", "shot3"]
    raw = build_dataset("toy", tmp_path / "toy", "all", ["sky", "road"])[1]["label"].numpy()
    expected = np.select([masks["shot1"] == 30, masks["shot1"] == 10], [0, 1], IGNORE_INDEX)
    np.testing.assert_array_equal(raw, expected)


def test_prepare_recognises_and_checks_the_format(toy_format, tmp_path, capsys):
    write_toy(tmp_path / "toy")
    assert guess_format(tmp_path / "toy") == "toy"
    assert main(["prepare", "toy", str(tmp_path / "toy"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "toy dataset at" in out and "checked 4 sample(s)" in out and "Result: OK" in out
    assert main(["prepare", "cityscapes", str(tmp_path / "toy"), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert "does not look like a Cityscapes dataset" in out
    assert f"looks like a Toy dataset (plca prepare toy {tmp_path / 'toy'})" in out
    (tmp_path / "toy" / "masks" / "shot2_mask.png").unlink()
    assert main(["prepare", "toy", str(tmp_path / "toy"), "--no-progress"]) == 2
    assert "shot2_mask.png" in capsys.readouterr().out
