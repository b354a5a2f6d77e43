"""Dark Zurich: Zurich street scenes by day, twilight and night, labelled with Cityscapes' 19 classes.

Layout, as extracted from ``Dark_Zurich_train_anon.zip`` and ``Dark_Zurich_val_anon.zip``::

    rgb_anon/<split>/<day|twilight|night>/<sequence>/<name>_rgb_anon.png
    gt/val/night/<sequence>/<name>_gt_labelTrainIds.png   (also _gt_labelIds.png, _gt_labelColor.png,
                                                           _gt_invIds.png)

The night training images (``train:night``, 2,416) are the adaptation target; ``val`` holds 50
labelled night images; ``test`` (night) labels are withheld (benchmark server only). The split
``train`` is every time of day it has on disk (day, twilight and night: select ``train:night`` for
the target); ``SPLIT:COND+COND`` selects times of day (each must be there). The ``*_ref`` folders
(day-time reference images of val / test) are not splits. Sample names are the file names without
``_rgb_anon.png``.

Labels are read from ``*_gt_labelTrainIds.png`` (train ids 0..18, 255 = ignore), mapped to
``data.classes`` by name. ``*_gt_invIds.png`` (the invalid pixels) is not read: HRDA and MIC
evaluate on the train ids as they are, and so do we; the invalid masks serve Dark Zurich's
uncertainty-aware metric (UIoU), which plca does not compute.

Verified against HRDA / MIC (github.com/lhoyer/MIC at 2f932a9, github.com/lhoyer/HRDA at c370b5b;
the two files agree): ``seg/mmseg/datasets/dark_zurich.py`` (``DarkZurichDataset``:
``img_suffix='_rgb_anon.png'``, ``seg_map_suffix='_gt_labelTrainIds.png'``, a ``CityscapesDataset``;
``valid_mask_size [1080, 1920]``); ``seg/configs/_base_/datasets/uda_cityscapes_to_darkzurich_512x512.py``
(target ``img_dir='rgb_anon/train/night/'``, val ``img_dir='rgb_anon/val'``, ``ann_dir='gt/val'``);
``seg/mmseg/datasets/custom.py`` (images found recursively, the label path is the image path relative
to ``img_dir`` with the suffix replaced, so ``gt/val/`` mirrors ``rgb_anon/val/``); ``seg/README.md``
(the two zips extracted to ``data/dark_zurich``, no restructuring); no file of either repository
reads ``_gt_invIds.png``. The counts (2,416 night training images, 50 val) are Dark Zurich's
published figures, not in those repositories.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from plca.data.formats.base import (
    DatasetFormat, Issues, SubmissionLayout, LabelMap, Listing, Sample, braced, condition_label_folders,
    labels_of_sequences_without_image, pair_sequences, require_images, require_root, train_id_label_map,
    wrong_layout,
)
from plca.data.formats.registry import register_format
from plca.data.io import duplicate_names

IMAGE_SUFFIX = "_rgb_anon.png"
LABEL_SUFFIX = "_gt_labelTrainIds.png"
SPLITS = ("train", "val", "test")
SUBMISSION_SOURCE = ("MIC's seg/README.md (github.com/lhoyer/MIC): its test-set command (tools.test --format-only "
                     "imgfile_prefix=labelTrainIds to_label_id=False) writes one train-id PNG per image, named as the "
                     "image, into labelTrainIds/ (mmseg's CityscapesDataset.results2img)")


class DarkZurich(DatasetFormat):
    name = "darkzurich"
    title = "Dark Zurich"
    image_folder = "rgb_anon"
    layout = ("rgb_anon/<split>/<day|twilight|night>/<sequence>/*_rgb_anon.png and "
              "gt/<split>/<time of day>/<sequence>/*_gt_labelTrainIds.png (val only)")
    target_without_labels = True
    submission = SubmissionLayout(
        ids="train", path="labelTrainIds/{name}_rgb_anon.png",
        source=SUBMISSION_SOURCE,
        how=("zip labelTrainIds/ (plca predict writes submission.zip) and upload it to "
             "Dark Zurich's benchmark server (its CodaLab competition, semantic segmentation)"))
    conditions = ("day", "twilight", "night")

    def label_map(self, classes: Sequence[str]) -> LabelMap:
        return train_id_label_map(classes, self.name)

    def list_split(self, root: Path, split: str, classes: Sequence[str], require_labels: bool,
                   issues: Issues) -> Listing:
        reader = self.label_map(classes)
        try:
            chosen = self.parse_split(split)
        except ValueError as error:
            issues.fatal(f"Dark Zurich: {error}")
        require_root(self, root, issues)
        images_root = require_images(self, root, issues)
        split_dir = images_root / chosen.split
        if not self.recognise(root):
            issues.fatal(wrong_layout(self, root, f"{images_root}: no <train|val|test>/<day|twilight|night>/ "
                                                  f"folders"))
        if not split_dir.is_dir():
            found = ", ".join(self.splits(root)) or "none"
            issues.fatal(f"{split_dir}: Dark Zurich split '{chosen.split}' not found (splits there: {found})")
        present = [condition for condition in self.conditions if (split_dir / condition).is_dir()]
        if not present:
            issues.fatal(f"{split_dir}: no day/, twilight/ or night/ folder; check the dataset root")
        wanted = chosen.conditions or tuple(present)
        for condition in wanted:
            if condition not in present:
                issues.fatal(f"{split_dir / condition}: Dark Zurich split '{chosen.split}' has no {condition} "
                             f"images (times of day there: {', '.join(present)})")
        label_dirs = {condition: root / "gt" / chosen.split / condition for condition in wanted}
        has_labels = condition_label_folders(self, label_dirs, root / "gt" / chosen.split / braced(wanted),
                                             f"Dark Zurich gt/{chosen.split}/<time of day>",
                                             "Dark Zurich labels only val (gt/val/night/, from "
                                             "Dark_Zurich_val_anon.zip); train and test are unlabelled",
                                             require_labels, issues)
        samples: list[Sample] = []
        for condition in wanted:
            samples += pair_sequences(self, split_dir / condition, label_dirs[condition], IMAGE_SUFFIX, LABEL_SUFFIX,
                                      has_labels[condition], require_labels,
                                      f"Dark Zurich {condition} split '{chosen.split}' in {root}", issues)
        duplicates = duplicate_names([sample.name for sample in samples])
        if duplicates:
            issues.error(f"{split_dir}: several images share one name", duplicates, todo="keep one")
        return Listing(samples, reader)

    def splits(self, root: Path) -> list[str]:
        """``train``, ``val``, ``test``: those ``rgb_anon/`` has (``val_ref`` / ``test_ref`` are not splits)."""
        return [split for split in SPLITS if (root / "rgb_anon" / split).is_dir()]

    def unpaired_labels(self, root: Path, splits: Sequence[str]) -> list[Path]:
        """The ``*_gt_labelTrainIds.png`` of ``splits`` without their ``*_rgb_anon.png``."""
        found = []
        for split in splits:
            if self.check_split(split) is None:
                chosen = self.parse_split(split)
                for condition in chosen.conditions or self.conditions:
                    found += labels_of_sequences_without_image(
                        root / "rgb_anon" / chosen.split / condition, root / "gt" / chosen.split / condition,
                        IMAGE_SUFFIX, LABEL_SUFFIX)
        return found

    def recognise(self, root: Path) -> int:
        """``rgb_anon/<train|val|test>/<day|twilight|night>/``."""
        return 2 if any((root / "rgb_anon" / split / condition).is_dir()
                        for split in SPLITS for condition in self.conditions) else 0

    def condition_of(self, sample: Sample) -> str:
        """``rgb_anon/<split>/<time of day>/<sequence>/<file>``: the time-of-day folder."""
        return sample.image.parents[1].name


register_format(DarkZurich())
