"""Run by tests/losses/test_lovasz_ddp.py under torchrun (CPU processes, gloo).

Four images of a seeded batch are split between the processes (rank r takes a consecutive share);
a tiny 1x1-convolution model, wrapped in DistributedDataParallel, turns them into probabilities and
each process back-propagates :func:`lovasz_softmax_global` of its share. Every process also computes,
with a plain copy of the model, :func:`lovasz_softmax` of all four images (the one-process reference).
Writes OUT_DIR/rank<k>.json: per scenario the value, the DDP-averaged gradient and the reference's.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from plca.data.labels import IGNORE_INDEX
from plca.losses.lovasz import lovasz_softmax, lovasz_softmax_global

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
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"world_size": world, "results": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
