"""Run by tests/losses/test_lovasz_ddp.py under torchrun (CPU processes, gloo).

Four images of a seeded batch are split between the processes (rank r takes a consecutive share);
a tiny 1x1-convolution model, wrapped in DistributedDataParallel, turns them into probabilities and
each process back-propagates :func:`lovasz_softmax_global` of its share. Every process also computes,
with a plain copy of the model, :func:`lovasz_softmax` of all four images (the one-process reference).
Then each process back-propagates :func:`lovasz_softmax_reference_ddp` of its share, and, through the
same DDP model, :func:`authors_multigpu_lovasz`: a plain transcription of the PLCA authors'
``solver/lov_softmax_multigpu.py`` (loops over classes, broadcasts as theirs).
Writes OUT_DIR/rank<k>.json: per scenario the value, the DDP-averaged gradient and the reference's.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from plca.data.labels import IGNORE_INDEX
from plca.losses.lovasz import lovasz_softmax, lovasz_softmax_global, lovasz_softmax_reference_ddp

IMAGES, CHANNELS, CLASSES, HEIGHT, WIDTH = 4, 3, 4, 5, 6


def batch(scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images ``(4, 3, 5, 6)`` and labels ``(4, 5, 6)``; class 3 only in the first two images.

    ``uneven``: the last two images keep a third as many valid pixels as the first two;
    ``empty_share``: the last two images have no valid pixel.
    """
    g = torch.Generator().manual_seed(0)
    images = torch.randn(IMAGES, CHANNELS, HEIGHT, WIDTH, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES - 1, (IMAGES, HEIGHT, WIDTH), generator=g)
    labels[:2][torch.rand(2, HEIGHT, WIDTH, generator=g) < 0.3] = CLASSES - 1
    ignored = torch.rand(IMAGES, HEIGHT, WIDTH, generator=g) < torch.tensor([0.1, 0.2, 0.7, 0.8])[:, None, None]
    labels[ignored] = IGNORE_INDEX
    if scenario == "empty_share":
        labels[2:] = IGNORE_INDEX
    return images, labels


def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Conv2d(CHANNELS, CLASSES, 1).double()


def authors_multigpu_lovasz(probs: torch.Tensor, labels: torch.Tensor, classes: str) -> torch.Tensor:
    """The authors' multi-GPU Lovasz-softmax, step by step: every GPU's (equally shaped) probabilities
    and labels are broadcast to all; for each class found in the gathered valid labels (or every class
    for ``"all"``) the gathered errors are sorted and each pixel gets its Jaccard increment back in
    gathered order; each GPU then sums, for each class found in its *own* valid labels, its own errors
    times its own slice of those increments; the result is the mean of those sums times the GPU count."""
    gpus, me = dist.get_world_size(), dist.get_rank()
    flat_probs = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
    flat_labels = labels.reshape(-1)
    all_probs = [torch.zeros_like(flat_probs) for _ in range(gpus)]
    all_labels = [torch.zeros_like(flat_labels) for _ in range(gpus)]
    all_probs[me], all_labels[me] = flat_probs.detach().clone(), flat_labels.clone()
    for source in range(gpus):
        dist.broadcast(all_probs[source], src=source)
        dist.broadcast(all_labels[source], src=source)
    counts = [int((lab != IGNORE_INDEX).sum()) for lab in all_labels]
    start, end = sum(counts[:me]), sum(counts[:me + 1])
    gathered_labels = torch.cat(all_labels)
    keep = gathered_labels != IGNORE_INDEX
    gathered_labels, gathered_probs = gathered_labels[keep], torch.cat(all_probs)[keep]
    increments = {}
    for c in range(probs.shape[1]):
        fg = (gathered_labels == c).double()
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - gathered_probs[:, c]).abs()
        order = torch.sort(errors, descending=True).indices
        fg_sorted = fg[order]
        union = fg_sorted.sum() + (1 - fg_sorted).cumsum(0)
        jaccard = 1 - (fg_sorted.sum() - fg_sorted.cumsum(0)) / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
        increments[c] = torch.zeros_like(jaccard).scatter(0, order, jaccard)
    own = flat_labels != IGNORE_INDEX
    own_labels, own_probs = flat_labels[own], flat_probs[own]
    if own_labels.numel() == 0:
        return probs.sum() * 0.0  # theirs returns the float 0.0: no gradient either way
    sums = []
    for c in range(probs.shape[1]):
        fg = (own_labels == c).double()
        if classes == "present" and fg.sum() == 0:
            continue
        sums.append(torch.dot((fg - own_probs[:, c]).abs(), increments[c][start:end]))
    return sum(sums) / len(sums) * gpus


def gradients(module: torch.nn.Module) -> list[float]:
    return torch.cat([p.grad.flatten() for p in module.parameters()]).tolist()


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share = slice(rank * IMAGES // world, (rank + 1) * IMAGES // world)
    ddp = DistributedDataParallel(model())
    reference = model()
    results = {}
    for scenario in ("uneven", "empty_share"):
        for classes in ("present", "all"):
            images, labels = batch(scenario)
            ddp.zero_grad()
            loss = lovasz_softmax_global(ddp(images[share]).softmax(dim=1), labels[share], classes=classes)
            loss.backward()
            reference.zero_grad()
            want = lovasz_softmax(reference(images).softmax(dim=1), labels, classes=classes)
            want.backward()
            results[f"{scenario}/{classes}"] = {
                "value": loss.item(), "grad": gradients(ddp.module),
                "reference_value": want.item(), "reference_grad": gradients(reference),
                "local_valid": int((labels[share] != IGNORE_INDEX).sum()),
            }
            ddp.zero_grad()
            ours = lovasz_softmax_reference_ddp(ddp(images[share]).softmax(dim=1), labels[share], classes=classes)
            ours.backward()
            ours_grad = gradients(ddp.module)
            ddp.zero_grad()
            theirs = authors_multigpu_lovasz(ddp(images[share]).softmax(dim=1), labels[share], classes)
            theirs.backward()
            results[f"authors_multigpu/{scenario}/{classes}"] = {
                "value": ours.item(), "grad": ours_grad,
                "reference_value": theirs.item(), "reference_grad": gradients(ddp.module),
                "global_grad": results[f"{scenario}/{classes}"]["grad"],
                "local_valid": int((labels[share] != IGNORE_INDEX).sum()),
            }
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"world_size": world, "results": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
