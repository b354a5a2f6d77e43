"""The parts of a run that come straight from its config: the method, the checkpoint header, seeds, data roots."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from plca.config import Config, to_dict
from plca.methods import Method, MethodContext, build_method
from plca.models import build_segmentor


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def absolute_roots(config: Config) -> Config:
    """``config`` with its dataset roots as absolute paths (the saved config then works from anywhere)."""
    data = config.data
    changes = {name: replace(spec, root=str(Path(spec.root).expanduser().absolute()))
               for name in ("source", "target", "val") if (spec := getattr(data, name)) is not None and spec.root}
    return replace(config, data=replace(data, **changes))


def build_training_method(config: Config, device: torch.device) -> Method:
    """The config's method around a freshly built segmentor, on ``device``."""
    segmentor = build_segmentor(config.model, len(config.data.classes))
    context = MethodContext(loss=config.loss, options=config.method_options, plca=config.plca,
                            classes=tuple(config.data.classes),
                            model=config.model, iters=config.train.iters, seed=config.train.seed,
                            eval_model=config.eval.model)
    method = build_method(config.method, segmentor, context).to(device)
    if config.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method


def checkpoint_header(config: Config, method: Method, run_id: str | None = None) -> dict:
    """What every checkpoint and model file says about itself: the network, classes, config, and
    which run it belongs to (``run``: ``{"id", "method", "data"}``; see :mod:`plca.engine.run_identity`)."""
    from plca.engine.run_identity import describe_data

    return {"segmentor": method.inference_model().describe(), "classes": list(config.data.classes),
            "config": to_dict(config), "run": {"id": run_id, "method": config.method, "data": describe_data(config)}}
