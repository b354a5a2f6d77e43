"""Run a segmentation model over a labelled dataset and accumulate the confusion matrix.

Predictions are made at the (optionally resized) input size, upsampled
bilinearly to the full label resolution and scored there. Under DDP each
process scores every ``world_size``-th image and the matrices are summed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from plca.evaluation.metrics import ConfusionMatrix
from plca.losses.association import spatial_aggregate


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: Tensor, test_time_aggregation: bool = False,
                          alpha: float = 0.5, amp: bool = False) -> Tensor:
    """Class probabilities ``(B, K, h, w)`` at the model's output stride for images ``(B, 3, H, W)``.

    With test-time aggregation (the reference's evaluation of PLCA): features are spatially
    aggregated (cos) before the classifier, then the probabilities are aggregated (kl).
    """
    autocast = (torch.autocast(device_type=images.device.type, dtype=torch.bfloat16)
                if amp and images.device.type == "cuda" else contextlib.nullcontext())
    with autocast:
        if test_time_aggregation:
            features = spatial_aggregate(model.extract_features(images), "cos", alpha)
            probs = model.classify(features).float().softmax(dim=1)
            return spatial_aggregate(probs, "kl", alpha)
        return model(images)["logits"].float().softmax(dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, num_classes: int, device: torch.device, *,
             test_time_aggregation: bool = False, alpha: float = 0.5, amp: bool = False,
             rank: int = 0, world_size: int = 1, num_workers: int = 0, progress: bool = True) -> ConfusionMatrix:
    """Confusion matrix of ``model`` on ``dataset`` (summed over processes when distributed)."""
    was_training = model.training
    model.eval()
    shard = Subset(dataset, list(range(rank, len(dataset), world_size)))
    loader = DataLoader(shard, batch_size=1, num_workers=num_workers)
    confusion = ConfusionMatrix(num_classes, device=device)
    for batch in tqdm(loader, desc="evaluate", disable=not progress or rank != 0, leave=False, dynamic_ncols=True):
        images = batch["image"].to(device, non_blocking=True).float()
        labels = batch["label"].to(device, non_blocking=True)
        probs = predict_probabilities(model, images, test_time_aggregation, alpha, amp)
        probs = F.interpolate(probs, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        confusion.update(probs.argmax(dim=1), labels)
    confusion.reduce_()
    model.train(was_training)
    return confusion
