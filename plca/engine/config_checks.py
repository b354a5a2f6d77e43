"""Checks of the config's ``train`` and ``eval`` sections that types alone cannot express
(:func:`plca.config.validate` calls :func:`validate_train_config` and :func:`validate_eval_config`;
the sections are :class:`plca.config.TrainConfig` and :class:`~plca.config.EvalConfig`, not imported: the
config sits above the engine's checks).

The choice lists come from the modules that act on them (:data:`plca.engine.optim.OPTIMIZERS`,
:data:`~plca.engine.optim.NO_DECAY_RULES`) or are defined here (:data:`EVAL_MODELS`).
"""

from __future__ import annotations

from typing import Any

from plca.engine.optim import NO_DECAY_RULES, OPTIMIZERS

#: ``eval.model``: which network of a method with a teacher is evaluated
EVAL_MODELS: tuple[str, ...] = ("student", "teacher", "both")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_range(pair: list) -> bool:
    return len(pair) == 2 and 0 < pair[0] <= pair[1]


def validate_train_config(train: Any) -> None:
    """Raise ``ValueError`` naming the key when ``train`` cannot describe a run."""
    _check(train.iters > 0, "train.iters must be > 0")
    _check(train.batch_size > 0 and train.accumulation > 0, "train.batch_size and train.accumulation must be > 0")
    _check(len(train.crop_size) == 2 and min(train.crop_size) > 0, "train.crop_size must be [h, w] > 0")
    for key in ("shorter_side", "scale_range", "target_shorter_side"):
        _check(getattr(train, key) is None or _is_range(getattr(train, key)),
               f"train.{key} must be null or [lo, hi] with 0 < lo <= hi")
    for key in ("cat_max_ratio", "target_cat_max_ratio"):
        _check(0.0 < getattr(train, key) <= 1.0, f"train.{key} must be in (0, 1] (1 = off)")
    _check(train.target_shorter_side is None or train.scale_range is None,
           "train.target_shorter_side goes with train.shorter_side, not with train.scale_range")
    _check(train.scale_range is None or train.shorter_side is None,
           "train.scale_range and train.shorter_side are two ways to resize: set one of them (the other null)")
    _check(train.lr > 0, "train.lr must be > 0")
    _check(train.optimizer in OPTIMIZERS,
           f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {train.optimizer!r}")
    _check(train.no_decay in NO_DECAY_RULES,
           f"train.no_decay must be one of {', '.join(NO_DECAY_RULES)}, got {train.no_decay!r}")
    _check(len(train.betas) == 2 and all(0 <= b < 1 for b in train.betas), "train.betas must be [b1, b2] in [0, 1)")
    _check(train.warmup_iters >= 0 and 0 < train.warmup_ratio <= 1,
           "train.warmup_iters must be >= 0 and train.warmup_ratio in (0, 1]")
    _check(train.collective_timeout_s > 0, "train.collective_timeout_s must be > 0")
    _check(0.0 <= train.momentum < 1.0, f"train.momentum must be in [0, 1), got {train.momentum}")
    _check(train.weight_decay >= 0, f"train.weight_decay must be >= 0, got {train.weight_decay}")
    _check(train.poly_power >= 0, f"train.poly_power must be >= 0, got {train.poly_power}")
    _check(train.head_lr_mult > 0, f"train.head_lr_mult must be > 0, got {train.head_lr_mult}")
    _check(train.seed >= 0, f"train.seed must be >= 0, got {train.seed}")
    _check(train.max_nonfinite_steps > 0, "train.max_nonfinite_steps must be > 0")
    _check(train.poly_iters is None or train.poly_iters >= train.iters,
           "train.poly_iters must be >= train.iters (the poly schedule may not end before training)")
    _check(train.checkpoint_every > 0 and train.log_every > 0 and train.eval_every >= 0
           and (train.image_every or 0) >= 0,
           "train.checkpoint_every and train.log_every must be > 0, train.eval_every and train.image_every >= 0")


def validate_eval_config(evaluation: Any) -> None:
    """Raise ``ValueError`` naming the key when ``evaluation`` (the ``eval`` section) cannot be right."""
    _check(evaluation.size is None or (len(evaluation.size) == 2 and min(evaluation.size) > 0),
           "eval.size must be null or [h, w] > 0")
    _check(0.0 <= evaluation.alpha <= 1.0, "eval.alpha must be in [0, 1]")
    bound = evaluation.aggregation_max_pixels
    _check(bound is None or (isinstance(bound, int) and not isinstance(bound, bool) and bound > 0),
           f"eval.aggregation_max_pixels must be null or a positive number of feature pixels, got {bound!r}")
    _check(evaluation.model in EVAL_MODELS,
           f"eval.model must be {', '.join(EVAL_MODELS[:-1])} or {EVAL_MODELS[-1]}")
