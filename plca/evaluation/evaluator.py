"""Run a segmentation model over a labelled dataset and accumulate the confusion matrix.

The model runs on the (optionally resized) input; its logits are upsampled bilinearly
(align_corners False) to the full label resolution and their argmax is scored there, as
mmsegmentation and the PLCA reference do (the argmax of upsampled logits is not that of
upsampled probabilities where classes compete). With test-time aggregation the reference
upsamples its aggregated probabilities instead, and so do we. Under DDP each process scores
every ``world_size``-th image and the matrices are summed.

Per-image scores (:class:`PerImageScores`, optional) come from the same pass: each
image's own confusion matrix gives its mean IoU over the classes present in its label
or its prediction (on labelled pixels) and its pixel accuracy. Per-image mIoU ranks
the images: pixel accuracy is dominated by road, building and sky, so an image where
every person and pole is missed can still score 95 %, while its mIoU drops. Only the
``keep`` lowest and ``keep`` highest images keep their prediction map (label
resolution, uint8), so memory stays bounded whatever the size of the dataset.
"""

from __future__ import annotations

import contextlib
import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from plca.evaluation.aggregation import DEFAULT_MAX_PIXELS, aggregated_probabilities
from plca.evaluation.metrics import ConfusionMatrix, confusion_matrix, iou_per_class, pixel_accuracy


@torch.no_grad()
def predict_scores(model: nn.Module, images: Tensor, test_time_aggregation: bool = False,
                   alpha: float = 0.5, amp: bool = False, aggregation_max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   progress: bool = False) -> Tensor:
    """Class scores ``(B, K, h, w)`` (float32) at the model's output stride for images ``(B, 3, H, W)``.

    The logits; with test-time aggregation (the reference's evaluation of PLCA) class
    probabilities: features spatially aggregated (cos) before the classifier, softmax, then
    the probabilities aggregated (kl). Either is what the reference upsamples to the label
    (:func:`upsampled_probabilities`). The aggregation is exact on maps of at most
    ``aggregation_max_pixels`` feature pixels (None: any), per window above
    (:mod:`plca.evaluation.aggregation`); ``progress``: a bar over those windows.
    """
    autocast = (torch.autocast(device_type=images.device.type, dtype=torch.bfloat16)
                if amp and images.device.type == "cuda" else contextlib.nullcontext())
    with autocast:
        if test_time_aggregation:
            return aggregated_probabilities(model, images, alpha, aggregation_max_pixels, progress)
        return model(images)["logits"].float()


def upsample_scores(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, K, h, w)`` scores resized bilinearly (align_corners False) to ``size = (H, W)``."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)


def upsampled_probabilities(scores: Tensor, size: tuple[int, int], test_time_aggregation: bool) -> Tensor:
    """Class probabilities ``(B, K, H, W)`` at ``size`` from :func:`predict_scores`' output.

    Logits are upsampled, then the softmax is taken (mmsegmentation, the PLCA reference);
    the test-time-aggregated probabilities are upsampled as they are (the reference).
    """
    upsampled = upsample_scores(scores, size)
    return upsampled if test_time_aggregation else upsampled.softmax(dim=1)


@dataclass(frozen=True)
class ImageScore:
    """The score of one validation image (percentages; None when it has no labelled pixel)."""

    index: int  # position in the dataset
    name: str
    mIoU: float | None  # mean IoU over the classes present in the label or the prediction
    pixel_accuracy: float | None
    classes: int  # how many classes that mean is over

    def as_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "mIoU": self.mIoU, "pixel_accuracy": self.pixel_accuracy,
                "classes": self.classes}


@dataclass(frozen=True)
class KeptImage:
    """An image among the lowest or highest: its score and its prediction ``(H, W) uint8`` at label resolution."""

    score: ImageScore
    prediction: np.ndarray


def image_score(index: int, name: str, matrix: Tensor) -> ImageScore:
    """The :class:`ImageScore` of an image from its own ``(K, K)`` confusion matrix (rows: ground truth)."""
    iou = iou_per_class(matrix.cpu())
    present = iou[~torch.isnan(iou)]
    accuracy = pixel_accuracy(matrix.cpu())
    return ImageScore(index, name, 100.0 * float(present.mean()) if len(present) else None,
                      None if math.isnan(accuracy) else 100.0 * accuracy, int(len(present)))


class PerImageScores:
    """Collects an :class:`ImageScore` per image and keeps the ``keep`` lowest and highest with their predictions.

    Ties are broken by dataset index (the earlier image first), so the choice is deterministic.
    Images without a labelled pixel are scored (None) but never kept.
    """

    def __init__(self, keep: int = 0) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.keep = keep
        self.scores: list[ImageScore] = []
        # heaps whose root is the entry that leaves first: the highest of the lowest, the lowest of the highest
        self._lowest: list[tuple[float, int, KeptImage]] = []
        self._highest: list[tuple[float, int, KeptImage]] = []

    def add(self, index: int, name: str, matrix: Tensor, prediction: Tensor) -> ImageScore:
        """Score one image from its ``(K, K)`` matrix; keep ``prediction`` ``(H, W)`` if it is among the extremes."""
        score = image_score(index, name, matrix)
        self.scores.append(score)
        if score.mIoU is not None and self._wanted(score):
            self._offer(KeptImage(score, _as_uint8(prediction)))
        return score

    def _keys(self, score: ImageScore) -> tuple[tuple[float, int], tuple[float, int]]:
        """The image's keys in the lowest and the highest heap: a larger key stays, the root leaves first."""
        return (-score.mIoU, -score.index), (score.mIoU, -score.index)

    def _wanted(self, score: ImageScore) -> bool:
        return self.keep > 0 and any(len(heap) < self.keep or key > heap[0][:2]
                   for heap, key in zip((self._lowest, self._highest), self._keys(score)))

    def _offer(self, kept: KeptImage) -> None:
        if self.keep == 0:
            return
        for heap, key in zip((self._lowest, self._highest), self._keys(kept.score)):
            if len(heap) < self.keep:
                heapq.heappush(heap, (*key, kept))
            elif key > heap[0][:2]:
                heapq.heapreplace(heap, (*key, kept))

    def merge(self, other: PerImageScores) -> None:
        """Add the scores and the kept images of ``other`` (another process's shard)."""
        known = {score.index for score in self.scores}
        self.scores += [score for score in other.scores if score.index not in known]
        theirs = {entry[2].score.index: entry[2] for entry in other._lowest + other._highest}
        for index, kept in theirs.items():
            if index not in known:
                self._offer(kept)

    def gather_(self) -> PerImageScores:
        """Merge the collections of all processes into each one (a no-op unless torch.distributed is initialised).

        Every process must call it (it is a collective); only the scores and the kept images travel.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, self)
            for rank, other in enumerate(everyone):
                if rank != dist.get_rank():
                    self.merge(other)
        return self

    def sorted_scores(self) -> list[ImageScore]:
        """Every image's score, in dataset order."""
        return sorted(self.scores, key=lambda score: score.index)

    def lowest(self) -> list[KeptImage]:
        """Up to ``keep`` images with the lowest mIoU, lowest first."""
        return [entry[2] for entry in sorted(self._lowest, key=lambda e: (-e[0], -e[1]))]

    def highest(self) -> list[KeptImage]:
        """Up to ``keep`` images with the highest mIoU, highest first."""
        return [entry[2] for entry in sorted(self._highest, key=lambda e: (-e[0], e[1]))]


def _as_uint8(prediction: Tensor) -> np.ndarray:
    return prediction.detach().to("cpu", torch.uint8).numpy().copy()


@torch.no_grad()
def evaluate(model: nn.Module, dataset, num_classes: int, device: torch.device, *,
             test_time_aggregation: bool = False, alpha: float = 0.5, amp: bool = False,
             rank: int = 0, world_size: int = 1, num_workers: int = 0, progress: bool = True,
             image_scores: PerImageScores | None = None,
             aggregation_max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ConfusionMatrix:
    """Confusion matrix of ``model`` on ``dataset`` (summed over processes when distributed).

    With ``image_scores``, each image's score is added to it in the same pass (gathered from
    all processes when distributed); the dataset's items need a ``"name"`` (else ``#index``).
    ``aggregation_max_pixels``: the bound of the test-time aggregation (:func:`predict_scores`).
    """
    if image_scores is not None and image_scores.keep and num_classes > 255:
        raise ValueError(f"kept predictions are uint8: at most 255 classes, got {num_classes}")
    was_training = model.training
    model.eval()
    indices = list(range(rank, len(dataset), world_size))
    # its own generator: a DataLoader draws its workers' base seed from torch's global one otherwise, and a
    # validation during training would shift the dropout masks of every later step (a resume would differ)
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    confusion = ConfusionMatrix(num_classes, device=device)
    from tqdm import tqdm  # here: this module's inference functions serve plca.segment on the core install

    for position, batch in enumerate(tqdm(loader, desc="evaluate", disable=not progress or rank != 0, leave=False,
                                          dynamic_ncols=True)):
        images = batch["image"].to(device, non_blocking=True).float()
        labels = batch["label"].to(device, non_blocking=True)
        scores = predict_scores(model, images, test_time_aggregation, alpha, amp, aggregation_max_pixels,
                                progress and rank == 0)
        # the softmax after upsampling (upsampled_probabilities) would not change the argmax
        predictions = upsample_scores(scores, labels.shape[-2:]).argmax(dim=1)
        if image_scores is None:
            confusion.update(predictions, labels)
            continue
        matrix = confusion_matrix(predictions, labels, num_classes, confusion.ignore_index)
        confusion.matrix += matrix.to(confusion.matrix.device)
        index = int(batch["index"][0]) if "index" in batch else indices[position]
        name = batch["name"][0] if "name" in batch else f"#{index}"
        image_scores.add(index, str(name), matrix, predictions[0])
    confusion.reduce_()
    if image_scores is not None:
        image_scores.gather_()
    model.train(was_training)
    return confusion
