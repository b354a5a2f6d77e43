"""Optimisers with backbone / head learning rates, and the poly schedule with an optional linear warmup.

- ``sgd`` (DeepLab / PLCA reference): momentum, weight decay on every parameter;
  group 0 = backbone (``lr``), group 1 = head (``lr * head_lr_mult``).
- ``adamw`` (DAFormer): the same two parts, each split into parameters with weight decay
  and parameters without (normalisation layers, biases, position embeddings), so four groups.

The learning rate of step ``t`` is ``poly(t) * warmup(t)`` where ``poly(t) = lr * (1 - t / T) ** power``
and, over the first ``W`` steps, ``warmup(t) = 1 - (1 - t / W) * (1 - warmup_ratio)`` (mmcv's
linear warmup, which DAFormer uses), 1 afterwards.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _is_head(name: str) -> bool:
    return name.startswith(("head.", "classifier."))


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters of normalisation layers, biases, and position embeddings / blocks."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, _NORM_LAYERS) or param_name == "bias" or any(
                    marker in full for marker in ("pos_embed", "pos_block", "cls_token", "register_tokens")):
                names.add(full)
    return names


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                    head_lr_mult: float = 1.0, kind: str = "sgd",
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """The optimiser of ``model``'s trainable parameters; ``head.*`` parameters get ``lr * head_lr_mult``.

    Each group carries ``lr_mult`` (used by :func:`set_lr`). ``kind``: ``sgd`` | ``adamw``.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if kind == "sgd":
        groups = [
            {"params": [p for n, p in named if not _is_head(n)], "lr": lr, "lr_mult": 1.0},
            {"params": [p for n, p in named if _is_head(n)], "lr": lr * head_lr_mult, "lr_mult": head_lr_mult},
        ]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    no_decay = _no_decay_names(model)
    groups = []
    for head, mult in ((False, 1.0), (True, head_lr_mult)):
        for decay in (True, False):
            params = [p for n, p in named if _is_head(n) == head and (n not in no_decay) == decay]
            groups.append({"params": params, "lr": lr * mult, "lr_mult": mult,
                           "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def optimizer_from_config(model: nn.Module, train) -> torch.optim.Optimizer:
    """:func:`build_optimizer` with the values of a :class:`plca.config.TrainConfig`."""
    return build_optimizer(model, train.lr, train.momentum, train.weight_decay, train.head_lr_mult,
                           kind=train.optimizer, betas=tuple(train.betas))


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """``base_lr * (1 - step / total_steps) ** power`` (0 at and after ``total_steps``)."""
    return base_lr * max(0.0, 1.0 - step / total_steps) ** power


def warmup_factor(step: int, warmup_steps: int, ratio: float = 1e-6) -> float:
    """mmcv's linear warmup: from ``ratio`` at step 0 up to 1 at ``warmup_steps`` (1 afterwards)."""
    if step >= warmup_steps or warmup_steps <= 0:
        return 1.0
    return 1.0 - (1.0 - step / warmup_steps) * (1.0 - ratio)


def effective_warmup(warmup_steps: int, iters: int) -> int:
    """The warmup length of a run of ``iters`` updates: at most a quarter of the run."""
    return min(warmup_steps, iters // 4)


def scheduled_lr(train, step: int) -> float:
    """The base learning rate of ``step`` for a :class:`plca.config.TrainConfig`."""
    total = train.poly_iters or train.iters
    warmup = effective_warmup(train.warmup_iters, train.iters)
    return poly_lr(train.lr, step, total, train.poly_power) * warmup_factor(step, warmup, train.warmup_ratio)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0)
