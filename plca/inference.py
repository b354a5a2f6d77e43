"""A trained model and the config to use it with, from a model file alone or with a config for the data.

``plca evaluate``, ``plca predict`` and ``plca export`` all start here. The model is what
the file describes (backbone, head, style, classes); a config given by the user supplies
the data and evaluation settings, and any model setting it gives that disagrees with the
file is an error naming both, never a silent reinterpretation of the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from plca.config import Config, ConfigError, build_config, load_config
from plca.models.registry import resolved_style
from plca.models.segmentor import Segmentor
from plca.models.trained import (ModelFile, describe_model, inspect_model_file, load_model_file, refuse_unfinished,
                                 resolve_model_path)


def description_from_config(config: Config) -> dict:
    """The segmentor description (:meth:`Segmentor.describe`, without normalisation) ``config`` asks for."""
    return {"backbone": config.model.backbone, "head": config.model.head,
            "style": resolved_style(config.model.backbone, config.model.style),
            "num_classes": len(config.data.classes), "features": config.model.features,
            "head_width": config.model.head_width}


def check_config_matches(file: ModelFile, config: Config) -> None:
    """Raise :class:`ConfigError` when ``config`` asks for another network or class list than ``file`` holds."""
    if file.description is None:
        return
    have = file.description
    want = description_from_config(config)
    differs = [key for key in ("backbone", "head", "style", "head_width") if have.get(key) != want[key]]
    classes = list(file.classes or [])
    if differs or len(classes) != len(config.data.classes):
        asked = describe_model(want, config.data.classes)
        raise ConfigError(
            f"this checkpoint ('{file.path}') is {describe_model(have, classes)}; the config asks for {asked}. "
            f"Leave the config out to use the checkpoint's own model (give the data as overrides), or fix "
            f"{', '.join('model.' + key for key in differs) or 'data.classes'}")
    if classes != list(config.data.classes):
        raise ConfigError(
            f"this checkpoint ('{file.path}') predicts the classes {classes} in this order; the config's "
            f"data.classes is {list(config.data.classes)}. Scores would be relabelled: leave data.classes out or "
            f"give the checkpoint's list")


def load_for_inference(source: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = (),
                       which: str = "final", allow_unfinished: bool = True) -> tuple[Segmentor, Config, ModelFile]:
    """The model of ``source`` (a model file or a run directory; CPU, eval mode), the config to use, the file.

    Without ``config_path`` the config is the one stored in the file, with ``overrides`` applied
    (e.g. ``data.val.root=/x``); a file that stores none (the PLCA authors' release) needs one.
    With ``allow_unfinished=False`` a model of a run that did not reach its end is refused
    (:func:`plca.models.trained.refuse_unfinished`) before its weights are read.
    """
    path = resolve_model_path(source, which)
    file = inspect_model_file(path)
    refuse_unfinished(file, allow_unfinished)
    if config_path is not None:
        config = load_config(config_path, list(overrides))
        check_config_matches(file, config)
    elif file.config is not None:
        try:
            config = build_config(file.config, list(overrides))
        except ConfigError as error:
            raise ConfigError(f"the config stored in '{path}': {error}") from None
        check_config_matches(file, config)
    else:
        raise ConfigError(f"'{path}' ({file.kind}) carries no config: give CONFIG.yaml (for the model and the data)")
    # the authors' release describes nothing: the config says which network
    model = load_model_file(file, file.description or description_from_config(config), config.data.classes)
    return model, config, file
