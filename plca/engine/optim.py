"""SGD with separate backbone / head learning rates and the poly schedule of DeepLab."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                    head_lr_mult: float = 1.0) -> torch.optim.SGD:
    """SGD over all parameters: group 0 = backbone (``lr``), group 1 = classifier (``lr * head_lr_mult``)."""
    head = [p for name, p in model.named_parameters() if name.startswith("classifier.") and p.requires_grad]
    head_ids = {id(p) for p in head}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [
        {"params": rest, "lr": lr, "lr_mult": 1.0},
        {"params": head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """``base_lr * (1 - step / total_steps) ** power`` (0 at and after ``total_steps``)."""
    return base_lr * max(0.0, 1.0 - step / total_steps) ** power


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0)
