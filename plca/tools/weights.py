"""``plca weights``: name what a weights file is, and rewrite a backbone's weights in this project's layout.

:func:`inspect_weights` reads a file's tensor names and shapes (never running anything: pickles
are read with ``weights_only=True``, tensors memory-mapped where possible) and matches them
against :func:`known_layouts`, one entry per published layout, each a recogniser over names and
shapes plus what it maps to: the architecture, the registered ``model.backbone`` and ``model.style``
that load it, or, for a trained segmentor, how to evaluate it. The layouts of backbone weights are
those the registered backbones declare in their contracts (:func:`plca.models.registry.weight_layouts`);
the plca files and the PLCA authors' checkpoints are recognised here. The configs in ``configs/`` whose
model fits are listed by reading them, so the list never goes stale.

:func:`convert_weights` builds the backbone a file fits from the registry, loads the file with the
backbone's own strict loader, and saves the backbone's state dict as ``.safetensors`` (metadata
``format: plca-backbone`` with the backbone, style and source), written under a temporary name
next to the output and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from plca.models.deeplab import (PLCA_AUTHORS_CLASS_ORDER, PLCA_AUTHORS_SYNTHIA_CLASS_ORDER,
                                 is_authors_checkpoint)
from plca.models.packaged import is_packaged, resolve_weights
from plca.models.registry import WeightsIdentity, backbone_names, identify_weights, is_known_backbone, resolved_style
from plca.models.registry import weight_layouts as backbone_weight_layouts
from plca.models.trained import ModelFile, inspect_model_file
from plca.models.weights import WeightsError, unwrap_state_dict
from plca.serialization import UnreadableFileError, load_torch_file

#: ``format`` metadata of the files :func:`convert_weights` writes.
BACKBONE_FORMAT = "plca-backbone"

_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_AUTHORS_CONTAINER = "{'weights': state dict}"
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


# --------------------------------------------------------------------------- what a file holds


@dataclass
class WeightsListing:
    """A weights file's tensors as meta tensors (names, shapes, dtypes; no data) and what wraps them."""

    path: Path
    tensors: dict[str, Tensor]
    container: str  # how the file stores them, in words
    metadata: dict[str, str] = field(default_factory=dict)  # .safetensors string metadata
    model_file: ModelFile | None = None  # a plca checkpoint or export


#: What a recogniser names: the network, and what in this project loads it.
Identity = WeightsIdentity
Recogniser = Callable[[WeightsListing], Identity | None]


@dataclass(frozen=True)
class Layout:
    """One published key layout: its name, what it looks like, and its recogniser."""

    name: str
    title: str
    recognise: Recogniser


# --------------------------------------------------------------------------- trained segmentors


def _authors(listing: WeightsListing) -> Identity | None:
    heads = sorted(k for k in listing.tensors if re.fullmatch(r"classifier\.0\.convs\.\d+\.0\.weight", k))
    if listing.container != _AUTHORS_CONTAINER or not heads:
        return None
    backbone = {k[len("backbone."):]: v for k, v in listing.tensors.items() if k.startswith("backbone.")}
    found = identify_weights(backbone)
    net = found[1].architecture if found is not None else "an unrecognised backbone"
    name = found[1].backbone if found is not None else None
    classes = int(listing.tensors[heads[0]].shape[0])
    tasks = {len(PLCA_AUTHORS_CLASS_ORDER): ("GTA5 -> Cityscapes", "gta5"),
             len(PLCA_AUTHORS_SYNTHIA_CLASS_ORDER): ("SYNTHIA -> Cityscapes", "synthia")}
    task, source = tasks.get(classes, (None, None))  # the source dataset picks the config to suggest
    architecture = (f"DeepLab-v2 (ASPP, {len(heads)} branches) on {net}, Caffe style, {classes} classes"
                    + (f": the {task} model, classes in the authors' order" if task else ""))
    if task is None or name is None:
        return Identity(architecture, trained=True, notes=(
            "not a model this project loads: the authors' released models are DeepLab-v2 ResNet-101 with 19 "
            "(GTA5) or 16 (SYNTHIA) classes",))
    configs = _configs(backbone=name, style="caffe", head="deeplabv2", classes=classes, method="plca",
                       source=source)
    config = configs[0] if configs else "CONFIG.yaml"
    return Identity(
        architecture, backbone=name, style="caffe", trained=True,
        use=f"plca evaluate {config} --checkpoint FILE (or plca export FILE --config {config} "
            f"--output MODEL.safetensors)",
        notes=("the output channels are permuted to the config's class order when loaded",))


def _plca_segmentor(listing: WeightsListing) -> Identity | None:
    file = listing.model_file
    if file is None:
        return None
    if file.description is None:
        return Identity(f"a {file.kind} that does not say which network it holds", trained=True,
                        use="plca evaluate CONFIG.yaml --checkpoint FILE (the run's config)")
    description = file.description
    details = [f"classes: {', '.join(file.classes)}" if file.classes else ""]
    if file.step is not None:
        details.append(f"trained for {file.step} updates")
    return Identity(
        f"{file.summary()} (a {file.kind})",
        backbone=description.get("backbone"), style=description.get("style"), trained=True,
        use="plca evaluate --checkpoint FILE; plca predict --checkpoint FILE --input IMAGES --output OUT",
        notes=tuple(d for d in details if d))


def _plca_backbone(listing: WeightsListing) -> Identity | None:
    if listing.metadata.get("format") != BACKBONE_FORMAT:
        return None
    backbone, style = listing.metadata.get("backbone") or None, listing.metadata.get("style") or None
    found = next((identity for layout in known_layouts() if layout.name not in _PLCA_LAYOUTS
                  if (identity := layout.recognise(listing)) is not None), None)
    architecture = found.architecture if found is not None else str(backbone)
    source = listing.metadata.get("source")
    notes = (f"converted by plca weights convert from {source}",) if source else ()
    return Identity(architecture, backbone=backbone, style=style, notes=notes)


# --------------------------------------------------------------------------- the table

#: The layouts recognised here: plca's own files and the PLCA authors' checkpoints.
_OWN_LAYOUTS: tuple[Layout, ...] = (
    Layout("plca-segmentor", "a plca checkpoint or export (a trained segmentor that describes itself)",
           _plca_segmentor),
    Layout("plca-backbone", f"backbone weights written by plca weights convert (format {BACKBONE_FORMAT})",
           _plca_backbone),
    Layout("plca-authors", "the PLCA authors' released checkpoint ({'weights': ...}: backbone.<ResNet key>, "
                           "classifier.0.convs.{0,1,2,3}.0.weight)",
           _authors),
)


def known_layouts() -> tuple[Layout, ...]:
    """Every layout ``plca weights inspect`` names, most specific first (the first that recognises a file wins):
    plca's own files, the authors' checkpoints, then the layouts the registered backbones load."""
    return _OWN_LAYOUTS + tuple(Layout(layout.name, layout.title, _by_tensors(layout.identify))
                                for layout in backbone_weight_layouts())


def _by_tensors(identify: Callable[[Mapping[str, Tensor]], Identity | None]) -> Recogniser:
    """A recogniser of listings from one of tensors' names and shapes."""
    return lambda listing: identify(listing.tensors)


_PLCA_LAYOUTS = ("plca-segmentor", "plca-backbone")


# --------------------------------------------------------------------------- reading


def _meta(value: Tensor) -> Tensor:
    return torch.empty(value.shape, dtype=value.dtype, device="meta")


def read_listing(path: str | Path) -> WeightsListing:
    """The names, shapes and dtypes of a weights file's tensors, and how the file holds them.

    ``path`` may name packaged weights (``package:<name>``). Raises :class:`WeightsError` naming the
    file when it is missing, unreadable, refused for safety or holds no tensors.
    """
    path = resolve_weights(path)
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        raw = load_torch_file(path, "weights file", mmap=True)
    except UnreadableFileError as error:
        raise WeightsError(str(error)) from None
    if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping) and (
            "segmentor" in raw or "config" in raw):
        file = inspect_model_file(path)
        return WeightsListing(path, {k: _meta(v) for k, v in raw["model"].items() if isinstance(v, Tensor)},
                              "a plca checkpoint", model_file=file)
    if is_authors_checkpoint(raw):
        tensors, container = unwrap_state_dict(raw["weights"], path), _AUTHORS_CONTAINER
    else:
        tensors = unwrap_state_dict(raw, path)
        wrapper = None if _is_tensor_map(raw) else next(key for key in ("state_dict", "model", "weights")
                                                        if _is_tensor_map(raw.get(key)))
        container = f"{{'{wrapper}': state dict}}" if wrapper else "a state dict"
    return WeightsListing(path, {k: _meta(v) for k, v in tensors.items()}, container)


def _is_tensor_map(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(value, Tensor) for value in obj.values())


def _read_safetensors(path: Path) -> WeightsListing:
    from safetensors import safe_open

    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {}
            for key in handle.keys():
                part = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32)
                tensors[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(f"weights file '{path}' is not a readable .safetensors file: {detail}") from None
    model_file = None
    if metadata.get("format", "").startswith("plca-") and metadata["format"] != BACKBONE_FORMAT:
        model_file = inspect_model_file(path)  # a plca export (it checks the format)
    if not tensors:
        raise WeightsError(f"weights file '{path}' holds no tensors")
    return WeightsListing(path, tensors, "safetensors", metadata, model_file)


def sha256_of(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the report


@dataclass
class WeightsReport:
    """What :func:`inspect_weights` found: the layout, the identity and the file's numbers."""

    path: Path
    layout: Layout
    identity: Identity
    container: str
    pretrained: str  # what model.pretrained names it by: the path, or package:<name>
    tensors: int
    parameters: int
    dtypes: list[str]
    sha256: str
    size_bytes: int

    @property
    def usable(self) -> bool:
        """Whether something in this installation uses the file as it is."""
        if self.identity.trained:
            return bool(self.identity.use)
        return self.identity.backbone is not None and is_known_backbone(self.identity.backbone)

    def lines(self) -> list[str]:
        """The report as ``label  value`` lines."""
        identity = self.identity
        rows = [("file", f"{self.path} ({self.size_bytes / 1e6:.1f} MB, {self.container})"),
                ("sha256", self.sha256 + _hash_remark(self.path.name, self.sha256)),
                ("layout", f"{self.layout.name}: {self.layout.title}"),
                ("architecture", identity.architecture)]
        if identity.backbone is not None:
            rows.append(("style", identity.style or "none (leave model.style unset)"))
        rows.append(("tensors", f"{self.tensors} ({self.parameters:,} parameters, BatchNorm statistics aside; "
                                f"{', '.join(self.dtypes)})"))
        if identity.trained:
            rows.append(("use", identity.use or "nothing in this project loads it"))
        elif identity.backbone is None:
            rows.append(("fits", "no backbone of this project"))
        else:
            fits = f"model.backbone={identity.backbone}"
            if identity.style:
                fits += f" model.style={identity.style}"
            fits += f" model.pretrained={self.pretrained}"
            if identity.drop_head:
                fits += " model.drop_pretrained_head=true"
            if not is_known_backbone(identity.backbone):
                fits += f" (backbone '{identity.backbone}' is not registered in this installation)"
            rows.append(("fits", fits))
            rows.append(("configs", _configs_text(identity.backbone, identity.style)))
        rows += [("note", note) for note in identity.notes]
        width = max(len(label) for label, _ in rows)
        return [f"{label.ljust(width)}  {value}" for label, value in rows]


def _hash_remark(name: str, digest: str) -> str:
    # torch.hub / torchvision file names end in the first hex digits of the file's sha256 (name-<hash>.pth)
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", name)
    if match is None:
        return ""
    prefix = match[1]
    if digest.startswith(prefix):
        return f" (begins with {prefix}, the hash in its name)"
    return (f" (does NOT begin with {prefix}, the suffix of its name: where that suffix is a sha256 prefix, as in "
            f"torchvision's file names, this is another file or a damaged copy)")


def inspect_weights(path: str | Path) -> WeightsReport:
    """Name what a weights file (or ``package:<name>``) is, see the module's docstring; :class:`WeightsError`
    when no layout fits."""
    listing = read_listing(path)
    layouts = known_layouts()
    for layout in layouts:
        identity = layout.recognise(listing)
        if identity is not None:
            break
    else:
        shown = ", ".join(list(listing.tensors)[:5])
        raise WeightsError(
            f"'{listing.path}' is in no weights layout known here ({len(listing.tensors)} tensors, first: {shown}); "
            f"known: {', '.join(layout.name for layout in layouts)}")
    values = [v for k, v in listing.tensors.items() if not k.endswith(_STATISTICS)]
    return WeightsReport(
        path=listing.path, layout=layout, identity=identity, container=listing.container,
        pretrained=str(path) if is_packaged(path) else str(listing.path),
        tensors=len(listing.tensors), parameters=sum(v.numel() for v in values),
        dtypes=sorted({str(v.dtype).removeprefix("torch.") for v in listing.tensors.values()}),
        sha256=sha256_of(listing.path), size_bytes=listing.path.stat().st_size)


# --------------------------------------------------------------------------- configs that fit


def _configs(backbone: str, style: str | None, head: str | None = None, classes: int | None = None,
             method: str | None = None, source: str | None = None) -> list[str]:
    """The shipped configs whose model is ``backbone`` / ``style`` (and head, class count, method, source
    dataset format when given)."""
    from plca.config import ConfigError, read_config_file

    if not _REPO_CONFIGS.is_dir():
        return []
    found = []
    for path in sorted(_REPO_CONFIGS.glob("*.yaml")):
        try:
            data = read_config_file(path)
        except ConfigError:
            continue
        model = data.get("model") or {}
        name = model.get("backbone", "resnet101")
        their_style = resolved_style(str(name), model.get("style") or None)
        if name != backbone or their_style != style:
            continue
        if head is not None and model.get("head", "deeplabv2") != head:
            continue
        if classes is not None and len((data.get("data") or {}).get("classes") or []) != classes:
            continue
        if method is not None and data.get("method") != method:
            continue
        if source is not None and ((data.get("data") or {}).get("source") or {}).get("format") != source:
            continue
        found.append(f"configs/{path.name}")
    return found


def _configs_text(backbone: str, style: str | None) -> str:
    from plca.config import ConfigError, read_config_file

    configs = _configs(backbone, style)
    if configs:
        return ", ".join(path.removeprefix("configs/") for path in configs)
    pieces = []
    models = _REPO_CONFIGS / "_base_" / "models"
    for path in sorted(models.glob("*.yaml")) if models.is_dir() else []:
        try:
            model = read_config_file(path).get("model") or {}
        except ConfigError:
            continue
        their_style = resolved_style(str(model.get("backbone", "")), model.get("style") or None)
        if model.get("backbone") == backbone and their_style == style:
            pieces.append(f"configs/_base_/models/{path.name}")
    if pieces:
        return f"no shipped config; the model piece {', '.join(pieces)} (as a _base_, or its keys as overrides)"
    return "no shipped config uses it; set the model.* keys above on any config"


# --------------------------------------------------------------------------- convert


def convert_weights(path: str | Path, output: str | Path) -> tuple[WeightsReport, Path]:
    """Write the backbone weights of ``path`` in this project's layout to ``output`` (.safetensors).

    The backbone the file fits is built from the registry and loads the file strictly; its state dict
    is written next to ``output`` under a temporary name and renamed into place, so ``output`` is
    either complete or untouched. Raises :class:`WeightsError` (one line) for an unknown file, a trained
    segmentor, a backbone not registered here, an output that is the input, or a load that does not fit.
    """
    from plca.models.segmentor import build_backbone
    from plca.models.weights import save_safetensors

    path, output = resolve_weights(path), Path(output)
    if output.suffix != ".safetensors":
        raise WeightsError(f"output '{output}' must end in .safetensors")
    if output.resolve() == path.resolve() or (output.exists() and os.path.samefile(output, path)):
        raise WeightsError(f"output '{output}' is the input file; write the converted weights to another file")
    if not output.parent.is_dir():
        raise WeightsError(f"output folder '{output.parent}' does not exist")
    report = inspect_weights(path)
    identity = report.identity
    if identity.trained:
        raise WeightsError(f"'{path}' is a trained segmentor ({identity.architecture}), not backbone weights: "
                           f"{identity.use or 'nothing in this project loads it'}")
    if identity.backbone is None:
        reason = "; ".join(identity.notes) or "no backbone of this project has its shapes"
        raise WeightsError(f"'{path}' holds {identity.architecture}, which no backbone of this project loads: {reason}")
    if not is_known_backbone(identity.backbone):
        raise WeightsError(
            f"'{path}' holds {identity.architecture} ({report.layout.name} layout) for the backbone "
            f"'{identity.backbone}', which is not registered in this installation (registered: "
            f"{', '.join(backbone_names())})")
    backbone, _ = build_backbone(identity.backbone, identity.style, pretrained=path, drop_head=identity.drop_head)
    metadata = {"format": BACKBONE_FORMAT, "backbone": identity.backbone, "style": identity.style or "",
                "source": path.name, "source_layout": report.layout.name, "source_sha256": report.sha256}
    save_safetensors(backbone, output, metadata)
    return report, output
