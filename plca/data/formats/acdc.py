"""ACDC (Adverse Conditions Dataset with Correspondences): Cityscapes' 19 classes in fog, night, rain and snow.

Layout, as extracted from ``rgb_anon_trainvaltest.zip`` and ``gt_trainval.zip``::

    rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png
    gt/<condition>/<split>/<sequence>/<name>_gt_labelTrainIds.png   (also _gt_labelIds.png, _gt_labelColor.png,
                                                                      _gt_invIds.png)

conditions ``fog``, ``night``, ``rain``, ``snow``; splits ``train`` (1,600 images, 400 per condition),
``val`` (406, labelled) and ``test`` (labels withheld: scored by the benchmark server only). The
split ``train`` is every condition it has on disk; ``train:night`` or ``train:fog+snow`` selects
conditions (each must be there). Sample names are the file names without ``_rgb_anon.png``.

Labels are read from ``*_gt_labelTrainIds.png`` (train ids 0..18, 255 = ignore), mapped to
``data.classes`` by name. ``*_gt_invIds.png`` (the pixels marked invalid: their content cannot be
told from the adverse image alone) is not read: HRDA and MIC, whose numbers the configs are
compared with, evaluate on the train ids as they are, invalid pixels included, and so do we; the
invalid masks serve ACDC's uncertainty-aware metric, which plca does not compute.

Verified against HRDA / MIC (github.com/lhoyer/MIC at 2f932a9, github.com/lhoyer/HRDA at c370b5b;
the two files agree): ``seg/mmseg/datasets/acdc.py`` (``ACDCDataset``: ``img_suffix='_rgb_anon.png'``,
``seg_map_suffix='_gt_labelTrainIds.png'``, a ``CityscapesDataset``, so the 19 Cityscapes classes;
``valid_mask_size [1080, 1920]``: the images are 1920 x 1080); ``seg/README.md`` (the folders are
``<condition>/<split>/<sequence>/``: its rsync commands ``rgb_anon/*/train/*/*`` and
``gt/*/train/*/*_labelTrainIds.png`` flatten them into ``rgb_anon/train/`` and ``gt/train/``, copying only the
train-id labels); ``seg/mmseg/datasets/custom.py`` (``load_annotations``: the label path is the image path
relative to ``img_dir`` with the suffix replaced, so ``gt/`` mirrors ``rgb_anon/``); no file of either
repository reads ``_gt_invIds.png``. The counts (1,600 / 400 per condition / 406 / test withheld) are
ACDC's published figures, not in those repositories. MIC's flattened copies (``rgb_anon/train/``, no
condition) are not read: the reader lists only the condition folders, so nothing is counted twice.
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


class ACDC(DatasetFormat):
    name = "acdc"
    title = "ACDC"
    image_folder = "rgb_anon"
    layout = ("rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png and "
              "gt/<condition>/<split>/<sequence>/*_gt_labelTrainIds.png, conditions fog, night, rain, snow")
    target_without_labels = True
    submission = SubmissionLayout(
        ids="train", path="labelTrainIds/{name}_rgb_anon.png",
        source=SUBMISSION_SOURCE,
        how=("zip labelTrainIds/ (plca predict writes submission.zip) and upload it to "
             "ACDC's benchmark server (acdc.vision.ee.ethz.ch, semantic segmentation task)"))
    conditions = ("fog", "night", "rain", "snow")

    def label_map(self, classes: Sequence[str]) -> LabelMap:
        return train_id_label_map(classes, self.name)

    def list_split(self, root: Path, split: str, classes: Sequence[str], require_labels: bool,
                   issues: Issues) -> Listing:
        reader = self.label_map(classes)
        try:
            chosen = self.parse_split(split)
        except ValueError as error:
            issues.fatal(f"ACDC: {error}")
        require_root(self, root, issues)
        images_root = require_images(self, root, issues)
        flattened = (f"; {images_root / chosen.split} (MIC's flattened copy) is not read: ACDC's own "
                     f"<condition>/<split>/ folders are" if (images_root / chosen.split).is_dir() else "")
        if not self.recognise(root):
            issues.fatal(wrong_layout(self, root, f"{images_root}: no fog/, night/, rain/ or snow/ folder")
                         + flattened)
        present = [condition for condition in self.conditions if (images_root / condition / chosen.split).is_dir()]
        if not present:
            found = ", ".join(self.splits(root)) or "none"
            issues.fatal(f"{images_root}: no ACDC condition has the split '{chosen.split}' (rgb_anon/<condition>/"
                         f"{chosen.split}/ not found; splits there: {found}){flattened}")
        wanted = chosen.conditions or tuple(present)
        for condition in wanted:
            if condition not in present:
                issues.fatal(f"{images_root / condition / chosen.split}: ACDC condition '{condition}' of split "
                             f"'{split}' not found (conditions there: {', '.join(present)}); complete the download "
                             f"or select the conditions there ({chosen.split}:COND+COND)")
        label_dirs = {condition: root / "gt" / condition / chosen.split for condition in wanted}
        has_labels = condition_label_folders(self, label_dirs, root / "gt" / braced(wanted) / chosen.split,
                                             f"ACDC gt/<condition>/{chosen.split}",
                                             "the labels come from gt_trainval.zip, extracted next to rgb_anon/ "
                                             "(test labels are withheld)", require_labels, issues)
        samples: list[Sample] = []
        for condition in wanted:
            samples += pair_sequences(self, images_root / condition / chosen.split, label_dirs[condition],
                                      IMAGE_SUFFIX, LABEL_SUFFIX, has_labels[condition], require_labels,
                                      f"ACDC {condition} split '{chosen.split}' in {root}", issues)
        duplicates = duplicate_names([sample.name for sample in samples])
        if duplicates:
            issues.error(f"{images_root}: several images of split '{split}' share one name", duplicates,
                         todo="keep one")
        return Listing(samples, reader)

    def splits(self, root: Path) -> list[str]:
        """``train``, ``val``, ``test``: those some condition has (the ``*_ref`` reference folders are not splits)."""
        return [split for split in SPLITS
                if any((root / "rgb_anon" / condition / split).is_dir() for condition in self.conditions)]

    def unpaired_labels(self, root: Path, splits: Sequence[str]) -> list[Path]:
        """The ``*_gt_labelTrainIds.png`` of ``splits`` without their ``*_rgb_anon.png``."""
        found = []
        for split in splits:
            if self.check_split(split) is None:
                chosen = self.parse_split(split)
                for condition in chosen.conditions or self.conditions:
                    found += labels_of_sequences_without_image(
                        root / "rgb_anon" / condition / chosen.split, root / "gt" / condition / chosen.split,
                        IMAGE_SUFFIX, LABEL_SUFFIX)
        return found

    def recognise(self, root: Path) -> int:
        """``rgb_anon/<condition>/`` for one of ACDC's conditions."""
        return 2 if any((root / "rgb_anon" / condition).is_dir() for condition in self.conditions) else 0

    def condition_of(self, sample: Sample) -> str:
        """``rgb_anon/<condition>/<split>/<sequence>/<file>``: the condition folder."""
        return sample.image.parents[2].name


register_format(ACDC())
