"""The Python inference API: ``plca.load_model(path)`` and ``plca.segment(model, image)``.

::

    import plca

    model = plca.load_model("runs/<run_name>")   # a run dir, a checkpoint, an export or a model folder
    labels = plca.segment(model, image)           # (H, W) class ids, model.classes[i] names id i
    labels, probs = plca.segment(model, [a, b], probabilities=True)   # lists give lists

Both are the commands' own code (:mod:`plca.inference` loads, :func:`plca.prediction.predict_full`
segments), so a model segments here exactly as ``plca predict`` segments it. Importing this module
loads nothing beyond torch and numpy.

The core install (torch, numpy, safetensors) loads model folders and ``.safetensors`` exports, and run
directories and ``.pt`` checkpoints too: their stored config is read without OmegaConf
(:mod:`plca.dataclass_reader`, the same dataclasses) and segmenting needs neither pillow nor tqdm. The
``[train]`` extra is needed for exports written before their config was stored as JSON as well (the YAML
reader), and pillow for PIL images (installed anyway when one is given). A missing package of the extra
is a one-line ``ModuleNotFoundError`` naming it and the extra.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from plca.config import Config
    from plca.prediction import InferenceOptions

#: The packages of the [train] extra (plca.console.EXTRA_OF_MODULE's; a test checks they agree).
TRAIN_EXTRA_MODULES = ("yaml", "omegaconf", "tqdm", "tensorboard", "PIL")


@dataclass
class SegmentationModel:
    """A trained segmentor with what using it needs.

    ``network``: the :class:`~plca.models.segmentor.Segmentor` (eval mode) taking RGB 0-255 images
    ``(B, 3, H, W)``; ``classes``: the name of each output channel; ``normalization``: the mean / std
    (0-255 units) the network applies to its input itself; ``options``: the test-time settings
    (size, test-time aggregation, its alpha); ``window``: the sliding window ``segment`` uses when
    asked for one (the training crop); ``config``: the run's config; ``source``: the file read.
    """

    network: nn.Module
    classes: list[str]
    normalization: dict
    options: InferenceOptions
    window: tuple[int, int] | None
    config: Config
    source: Path

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device: str | torch.device) -> SegmentationModel:
        """Move the network to ``device`` (``"cuda"``, ``"cpu"``...); returns ``self``."""
        self.network.to(device)
        return self


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> SegmentationModel:
    """The model of ``path``: a run directory (its final model), a plca checkpoint (``.pt``), a
    single-file export (``.safetensors``) or a model folder (``config.json`` + ``model.safetensors``).

    Raises :class:`~plca.models.weights.WeightsError` or :class:`~plca.config.ConfigError` naming the
    file and the problem, ``ModuleNotFoundError`` naming the ``[train]`` extra for a file that needs it.
    """
    try:
        return _load_model(path, device)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise  # no extra installs it: a bug
        raise ModuleNotFoundError(f"plca.load_model('{path}'): this file needs the [train] extra (module "
                                  f"'{error.name}' is not installed): pip install 'plca[train]'",
                                  name=error.name) from None


def _load_model(path: str | Path, device: str | torch.device) -> SegmentationModel:
    from plca.inference import load_for_inference
    from plca.plugins import load_plugins
    from plca.prediction import options_from_config

    load_plugins()  # the user's own backbones and heads, which the file may name
    network, config, file = load_for_inference(path)
    options = options_from_config(config)
    window = tuple(config.train.crop_size)
    folder = Path(path)
    from plca.models.trained import is_model_folder

    if is_model_folder(folder):
        options, window = _folder_settings(folder, options)
    description = network.describe()
    return SegmentationModel(network=network.to(device).eval(), classes=list(config.data.classes),
                             normalization=description["normalization"], options=options,
                             window=tuple(window) if window else None, config=config, source=file.path)


def _folder_settings(folder: Path, options: InferenceOptions) -> tuple[InferenceOptions, list[int] | None]:
    """The test-time settings of a model folder's ``config.json`` (what a user edits there applies)."""
    from dataclasses import replace

    from plca.tools.model_folder import read_folder_config

    settings = read_folder_config(folder)["inference"]
    size = settings.get("size")
    options = replace(options, size=tuple(size) if size else None,
                      test_time_aggregation=bool(settings.get("test_time_aggregation", options.test_time_aggregation)),
                      alpha=float(settings.get("alpha", options.alpha)))
    return options, settings.get("window")


def _as_batch(image: Any) -> tuple[Tensor, str]:
    """``(1 or B, 3, H, W)`` RGB 0-255 of one input, and how to return it: ``"numpy"`` or ``"tensor"``
    (``"batch"`` for a 4-d tensor)."""
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(image, pil.Image):
        image = np.array(image.convert("RGB"))  # a writable copy
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"plca.segment: a numpy image must be (H, W, 3) uint8 RGB, got {image.shape} "
                             f"{image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], "numpy"
    if isinstance(image, Tensor):
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"plca.segment: a tensor image must be (3, H, W) or (B, 3, H, W) RGB 0-255, got "
                             f"{tuple(image.shape)}")
        return (image[None], "tensor") if image.ndim == 3 else (image, "batch")
    raise TypeError(f"plca.segment: an image must be a PIL image, a numpy (H, W, 3) uint8 array or a tensor "
                    f"(3, H, W), or a list of them; got {type(image).__name__}")


def _window(model: SegmentationModel, sliding_window: bool | Sequence[int] | None) -> tuple[int, int] | None:
    if sliding_window is None:
        return model.options.window
    if sliding_window is False:
        return None
    if sliding_window is True:
        if model.window is None:
            raise ValueError("plca.segment: this model records no training crop; give sliding_window=(h, w)")
        return tuple(model.window)
    window = tuple(int(side) for side in sliding_window)
    if len(window) != 2 or min(window) <= 0:
        raise ValueError(f"plca.segment: sliding_window must be True, False or (h, w) > 0, got {sliding_window}")
    return window


def segment(model: SegmentationModel, image: Any, *, probabilities: bool = False,
            sliding_window: bool | Sequence[int] | None = None) -> Any:
    """Class ids of ``image`` at its full resolution (and, with ``probabilities``, the class probabilities).

    ``image``: a PIL image, a numpy ``(H, W, 3)`` uint8 RGB array, a tensor ``(3, H, W)`` or ``(B, 3, H, W)``
    RGB 0-255, or a list of these. Returns what it was given: numpy ids ``(H, W)`` int64 (probabilities
    ``(K, H, W)`` float32) for PIL and numpy inputs, tensors ``(H, W)`` / ``(B, H, W)`` (``(K, H, W)`` /
    ``(B, K, H, W)``) for tensors, a list for a list; ``(ids, probabilities)`` with ``probabilities``.
    ``sliding_window``: None = the model's test-time setting (whole image), True = windows of the
    training crop, ``(h, w)`` = windows of that size, False = whole image.
    """
    if isinstance(image, (list, tuple)):
        return [segment(model, item, probabilities=probabilities, sliding_window=sliding_window) for item in image]
    from dataclasses import replace

    from plca.prediction import predict_full

    batch, kind = _as_batch(image)
    options = replace(model.options, window=_window(model, sliding_window), stride=None)
    probs = predict_full(model.network.eval(), batch.to(model.device), options).float()
    ids = probs.argmax(dim=1)
    if kind == "numpy":
        ids, probs = ids[0].cpu().numpy(), probs[0].cpu().numpy()
    elif kind == "tensor":
        ids, probs = ids[0], probs[0]
    return (ids, probs) if probabilities else ids
