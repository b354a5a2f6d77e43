"""Optimisers with backbone / head learning rates, and the poly schedule with an optional linear warmup.

The parameter groups come from the model, not from parameter names: a model that has
``parameter_parts()`` (a :class:`~plca.models.segmentor.Segmentor`) says which parameters are
its backbone's and which its head's; any other module is all backbone.

- ``sgd`` (DeepLab / PLCA reference): momentum, weight decay on every parameter;
  group 0 = backbone (``lr``), group 1 = head (``lr * head_lr_mult``).
- ``adamw`` (DAFormer): the same two parts, each split into parameters with weight decay and
  parameters without, so four groups (backbone decayed, backbone not, head decayed, head not).
  Which are not decayed is the rule ``no_decay`` (``train.no_decay``):

  - ``declared`` (DAFormer's): what the model declares with timm's ``no_weight_decay()``, which
    a :class:`~plca.models.segmentor.Segmentor` gathers from its backbone and head. DAFormer's
    mmcv ``paramwise_cfg`` exempts parameter names containing ``norm`` or ``pos_block``: MiT's
    LayerNorms, which MiT declares; every BatchNorm, bias and convolution is decayed.
  - ``norm_bias_position`` (ours, not DAFormer's): every parameter of a normalisation layer,
    every bias, and what the modules declare (position embeddings / blocks and tokens: timm's
    ``no_weight_decay()`` of a ViT names its ``pos_embed`` and ``cls_token``).

No rule reads parameter names: layers are told by their type, a bias by being a module's
``bias``, the rest by the modules' own declarations.

The learning rate of step ``t`` is ``poly(t) * warmup(t)`` where ``poly(t) = lr * (1 - t / T) ** power``
and, over the first ``W`` steps, ``warmup(t) = 1 - (1 - t / W) * (1 - warmup_ratio)`` (mmcv's
linear warmup, which DAFormer uses), 1 afterwards.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from plca.models.registry import declared_no_weight_decay

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
#: rules for the parameters AdamW does not decay (``train.no_decay``); the first is DAFormer's
NO_DECAY_RULES = ("declared", "norm_bias_position")
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)

Named = list[tuple[str, nn.Parameter]]


def parameter_parts(model: nn.Module) -> tuple[Named, Named]:
    """``(backbone, head)``: the model's trainable named parameters by part.

    From ``model.parameter_parts()`` when it has one (every trainable parameter must be in exactly
    one part), else all of them are backbone.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not hasattr(model, "parameter_parts"):
        return trainable, []
    parts = model.parameter_parts()
    backbone = [(n, p) for n, p in parts.get("backbone", []) if p.requires_grad]
    head = [(n, p) for n, p in parts.get("head", []) if p.requires_grad]
    unknown = set(parts) - {"backbone", "head"}
    placed = [id(p) for _, p in backbone + head]
    if unknown or len(placed) != len(set(placed)) or set(placed) != {id(p) for _, p in trainable}:
        raise ValueError(f"{type(model).__name__}.parameter_parts() must put every trainable parameter in exactly "
                         f"one of 'backbone' and 'head'")
    return backbone, head


def no_decay_names(model: nn.Module, rule: str = "declared") -> set[str]:
    """The names (as ``model.named_parameters()`` gives them) of the parameters AdamW leaves undecayed."""
    if rule == "declared":
        return declared_no_weight_decay(model)
    if rule == "norm_bias_position":
        return _norm_bias_position_names(model)
    raise ValueError(f"unknown no-decay rule {rule!r}; choose one of {', '.join(NO_DECAY_RULES)}")


def _norm_bias_position_names(model: nn.Module) -> set[str]:
    """Parameters of normalisation layers, biases, and what the model declares (position embeddings, tokens)."""
    names = declared_no_weight_decay(model)
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_LAYERS) or param_name == "bias":
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                    head_lr_mult: float = 1.0, kind: str = "sgd",
                    betas: tuple[float, float] = (0.9, 0.999), no_decay: str = "declared") -> torch.optim.Optimizer:
    """The optimiser of ``model``'s trainable parameters; its head's parameters get ``lr * head_lr_mult``.

    Each group carries ``lr_mult`` (used by :func:`set_lr`). ``kind``: ``sgd`` | ``adamw``;
    ``no_decay`` (adamw): one of :data:`NO_DECAY_RULES`.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    backbone, head = parameter_parts(model)
    if kind == "sgd":
        groups = [
            {"params": [p for _, p in backbone], "lr": lr, "lr_mult": 1.0},
            {"params": [p for _, p in head], "lr": lr * head_lr_mult, "lr_mult": head_lr_mult},
        ]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    exempt = no_decay_names(model, no_decay)
    groups = []
    for part, named, mult in (("backbone", backbone, 1.0), ("head", head, head_lr_mult)):
        for decay in (True, False):
            params = [p for n, p in named if (n not in exempt) == decay]
            groups.append({"params": params, "lr": lr * mult, "lr_mult": mult,
                           "weight_decay": weight_decay if decay else 0.0})
        log.debug("adamw %s: %d parameter tensors decayed, %d not (rule %s)", part, len(groups[-2]["params"]),
                  len(groups[-1]["params"]), no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def optimizer_from_config(model: nn.Module, train) -> torch.optim.Optimizer:
    """:func:`build_optimizer` with the values of a :class:`plca.config.TrainConfig`."""
    return build_optimizer(model, train.lr, train.momentum, train.weight_decay, train.head_lr_mult,
                           kind=train.optimizer, betas=tuple(train.betas), no_decay=train.no_decay)


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
