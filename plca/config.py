"""Run configuration: typed dataclasses filled from YAML files and ``key=value`` overrides by OmegaConf.

One :class:`Config` object describes a run completely; it is saved as ``config.yaml``
in the run directory and nothing reads a global. A config is built from, lowest
precedence first:

1. the dataclass defaults below;
2. the defaults of the chosen method (``Method.config_defaults``, e.g. no Lovasz for
   ``self_training``; and PLCA's weights at 0 for it unless asked, ``Method.plca_section``);
3. the files named by ``_base_`` (a path or a list of paths, relative to the file that
   names them; bases may have bases), merged in order;
4. the file itself;
5. the command-line overrides ``key.path=value`` (values parsed as YAML).

A method's own options live in a section named after it (``self_training:``), typed by
the method's ``Options`` dataclass; the engine hands them to the method untouched. PLCA's
terms have their own section, ``plca:`` (:class:`plca.methods.plca_objective.PLCAOptions`),
present for the methods that add them (``plca``, ``self_training``). Keys renamed since
(:data:`RENAMED_KEYS`, e.g. ``loss.association`` -> ``plca.association``) still load, with one
logged line naming them. Unknown keys and values of the wrong type are a :class:`ConfigError`
that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plca.dataclass_reader import DataclassReadError, read_dataclass
from plca.dataclass_reader import describe_type as _describe_type
from plca.models.hrda import HRDAOptions
from plca.files import atomic_write_text


_LOG = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the problem."""


@dataclass
class DatasetConfig:
    """Where one dataset lives: its on-disk ``format``, ``root`` folder and ``split``."""

    format: str = "folder"  # a registered dataset format (plca prepare --help lists them; plca/data/formats/ has one file each)
    root: str = ""  # the dataset's folder (stored absolute in a run's config.yaml)
    split: str = "train"  # a split of the format: ROOT/SPLIT.txt, a split folder, all; with conditions SPLIT:COND+COND


@dataclass
class RareClassSamplingConfig:
    """DAFormer's Rare Class Sampling of source images (class statistics computed once and cached).

    Two thresholds, each absolute (DAFormer's figures, in pixels) or relative (a share, for any
    image size); each pair takes exactly one, the other null. The image: ``min_pixels`` or
    ``min_pixels_ratio``; the crop: ``min_crop_ratio`` (a multiple of ``min_pixels``) or
    ``min_crop_pixels_ratio``. DAFormer on GTA5: 3000 pixels of the 1914 x 1052 label as stored
    (= 0.00149 of its pixels) and 3000 x 0.5 = 1500 pixels of a 512 x 512 crop (= 0.005723 of it).
    """

    enabled: bool = False  # sample source images by their rare classes (DAFormer's RCS)
    temperature: float = 0.01  # T of softmax((1 - f_c) / T): lower draws rare classes more often
    min_pixels: int | None = 3000  # an image is drawn for class c if it holds more pixels of c (label as stored; DAFormer: 3000); null: min_pixels_ratio
    min_pixels_ratio: float | None = None  # or more than this share of its pixels (label's h x w, ignored ones too); GTA5's 3000 = 0.00149
    min_crop_ratio: float | None = 0.5  # the crop (as rescaled) is re-drawn until it holds > min_pixels x this pixels of c; 0 = never; null: the next
    min_crop_pixels_ratio: float | None = None  # or until c covers > this share of the crop (h x w); DAFormer's 1500 of 512 x 512 = 0.005723; 0 = never
    retries: int = 10  # crop re-draws at most
    stats: str | None = None  # the class statistics file; null = cached under output_dir/.cache


@dataclass
class DataConfig:
    classes: list[str] = field(default_factory=list)  # class names, in class-index order
    source: DatasetConfig = field(default_factory=DatasetConfig)
    target: DatasetConfig | None = None  # unlabelled target images (needed by plca)
    val: DatasetConfig | None = None  # labelled validation set, usually the target's val split
    num_workers: int = 2  # data-loading processes per training process (at most the CPUs it may use)
    on_error: str = "raise"  # a sample that fails to load: raise | skip (skipped samples are counted)
    rare_class_sampling: RareClassSamplingConfig = field(default_factory=RareClassSamplingConfig)
    resize_antialias: bool = False  # resize images as Pillow does (antialiased when downscaling: the PLCA reference) instead of cv2 INTER_LINEAR's sampling (mmseg, DAFormer); training and evaluation alike
    target_label_diagnostics: bool = False  # read the target's training labels for logged diagnostics only (pseudo-label and association accuracy); no loss uses them; false = training never opens a target label file


@dataclass
class ModelConfig:
    backbone: str = "resnet101"  # resnet18 | resnet34 | resnet50 | resnet101 | mit_b0..mit_b5 | efficientnet_lite0 | timm:<name>
    head: str = "deeplabv2"  # deeplabv2 (the PLCA reference's four ASPP branches) | deeplabv2_reduced (DACS / DAFormer's two) | daformer | segformer
    # ResNets: caffe (BGR 0-255 minus mean; the default) | pytorch (v1.5, RGB, ImageNet mean/std);
    # other backbones have one input normalisation (ImageNet RGB) and leave this null
    style: str | None = None  # ResNets: caffe (null) | pytorch | v1c (deep stem, DAFormer's DeepLab-v2); must match the weights; null for other backbones
    pretrained: str | None = None  # ImageNet weights of the backbone: a local file, or package:<name> (weights inside an installed package, e.g. package:efficientnet_lite0); null = from scratch
    drop_pretrained_head: bool = False  # drop a classifier stored with the weights (DeepLab's COCO layer5.*)
    features: str = "backbone_last"  # map of the feature-level association: backbone_last | head_embedding
    head_width: int | None = None  # channels of the DAFormer / SegFormer head's embeddings and fusion; null = the head's own (256); DeepLab-v2 heads have none
    hrda: HRDAOptions = field(default_factory=HRDAOptions)  # HRDA's multi-resolution training and inference (plca.models.hrda)


@dataclass
class LossConfig:
    """The source loss every method shares (PLCA's own terms are the ``plca:`` section)."""

    # Defaults are the PLCA reference's values. Effective weight of Lovasz-softmax against the
    # mean cross-entropy: the reference uses 0.75 multiplied by world_size x ITER_SIZE = 4, i.e. 3.0.
    lovasz_weight: float = 3.0  # Lovasz-softmax on the source, against the mean cross-entropy
    lovasz_reduction: str = "global"  # under DDP: global (the exact loss of the global batch) | reference (the PLCA reference's: global sort, each GPU's mean over its own classes x world size)
    ce_average: str = "labelled"  # source cross-entropy's mean: labelled (over labelled pixels: PyTorch's, the PLCA reference) | all_pixels (over every pixel, ignored ones count 0: mmseg 0.16, DAFormer)


#: Keys (or whole sections) that moved: old dotted key -> its new place. A config that gives an old
#: key loads as if it gave the new one, with one logged line naming the moves; giving both with
#: different values is a ConfigError. For a method without a ``plca:`` section, the old PLCA keys
#: are checked and then ignored, as they always were for it.
RENAMED_KEYS: dict[str, str] = {
    "loss.lsr_weight": "plca.lsr_weight",
    "loss.lsr_threshold": "plca.lsr_threshold",
    "loss.association": "plca.association",
}


@dataclass
class TrainConfig:
    iters: int = 40000  # optimiser updates
    batch_size: int = 2  # images per domain per process per forward
    accumulation: int = 1  # forwards per update (gradient accumulation)
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # [h, w]
    shorter_side: list[int] | None = None  # random shorter side [lo, hi] in pixels before cropping; null = no resize
    scale_range: list[float] | None = None  # or a random ratio [lo, hi] of each image's own size; null = no resize
    target_shorter_side: list[int] | None = None  # the target's own [lo, hi] (DAFormer resizes each domain); null = as the source
    flip: bool = True  # random horizontal flip (p 0.5)
    cat_max_ratio: float = 1.0  # source crops re-drawn (up to 10x) while one class covers this share or more of the labelled pixels (DAFormer 0.75); 1 = off
    target_cat_max_ratio: float = 1.0  # the same for target crops: reads the target's ground truth, so a run with < 1 is NOT unsupervised (DAFormer's early configs did; removed in Jan 2022); 1 = off
    optimizer: str = "sgd"  # sgd (the PLCA reference) | adamw (DAFormer; train.no_decay says which parameters it does not decay)
    lr: float = 2.5e-4  # base learning rate (the backbone's; the head's is lr x head_lr_mult)
    momentum: float = 0.9  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    weight_decay: float = 5e-4  # sgd: on every parameter; adamw: on all but those train.no_decay exempts
    no_decay: str = "declared"  # adamw's undecayed parameters: declared (DAFormer's: what the backbone / head declare, MiT's LayerNorms) | norm_bias_position (ours, not DAFormer's: every norm, bias, position parameter)
    poly_power: float = 0.9  # lr x (1 - step / poly_iters) ** power
    poly_iters: int | None = None  # iterations over which the poly schedule decays; null = iters
    warmup_iters: int = 0  # linear warmup (at most a quarter of train.iters is used)
    warmup_ratio: float = 1e-6  # LR factor at step 0 of the warmup
    head_lr_mult: float = 1.0  # LR multiplier of the head's parameters (DAFormer: 10)
    seed: int = 0  # the run's seed: data order, augmentation, initialisation
    amp: bool = False  # bf16 autocast on CUDA
    channels_last: bool = False  # NHWC memory format (faster convolutions on recent GPUs)
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP (CUDA only)
    deterministic: bool = False  # deterministic kernels (torch.use_deterministic_algorithms; see the README)
    log_every: int = 20  # updates between logged scalars (scalars.jsonl, TensorBoard, train.log)
    eval_every: int = 2000  # 0 = only at the end
    checkpoint_every: int = 1000  # updates between last.pt checkpoints (also at the end and on a signal)
    image_every: int | None = None  # TensorBoard image grids every N updates; null = about 5 per run (at most every 1000); 0 = never
    max_nonfinite_steps: int = 5  # consecutive non-finite losses / gradients before the run stops
    collective_timeout_s: int = 1800  # DDP: a process waiting this long for a dead or stuck peer ends the job


@dataclass
class EvalConfig:
    size: list[int] | None = None  # [h, w] to resize val images to (reference: [730, 1460]); null = as is
    test_time_aggregation: bool | None = None  # null = the method's default (on for plca)
    alpha: float = 0.5  # alpha of the test-time aggregation
    aggregation_max_pixels: int | None = 32768  # test-time aggregation exact up to this many feature pixels, per window above (linear cost); null = exact at any size
    model: str = "student"  # methods with a teacher: student (what papers report) | teacher | both


@dataclass
class Config:
    method: str = "source_only"  # source_only | plca | ... (plca.methods registers them)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # an instance of plca.methods.plca_objective.PLCAOptions for the methods that add PLCA's terms, else None
    plca: Any = None  # PLCA's terms (LSR, feature and classifier association): methods plca (on) and self_training (off unless set)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs"  # each run gets its own directory under it
    run_name: str | None = None  # null = derived from the method, data, backbone and seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # the chosen method's own section (an instance of its Options dataclass), kept under the
    # method's name in YAML; None for methods without options
    method_options: Any = None


_SECTIONS = ("plca", "method_options")  # built by build_config from their owners' dataclasses
_CORE_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in _SECTIONS)


# --------------------------------------------------------------------------- reading YAML


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file '{path}' is not a text file (not UTF-8 at byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"config file '{path}' cannot be read: {error.strerror or error}") from None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {' '.join(str(error).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level, not a {type(data).__name__}")
    return data


def merge_dicts(base: dict, update: dict) -> dict:
    """``update`` merged into a copy of ``base``: mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        value = copy.deepcopy(value)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The plain data of a YAML config with its ``_base_`` files merged in (bases first, in order)."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError(f"config file '{path}': _base_ files include each other ({cycle})")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config file '{path}': _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"config file '{path}': its _base_ '{base}' does not exist ({base_path})")
        merged = merge_dicts(merged, read_config_file(base_path, (*_chain, resolved)))
    return merge_dicts(merged, data)


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.crop_size=[160,160]'`` -> ``(['train', 'crop_size'], [160, 160])`` (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': cannot parse the value ({' '.join(str(error).split())})") from None
    return key.split("."), value


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{'.'.join(path[: depth + 1])}' is not a mapping")
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """A copy of ``data`` with each ``key.path=value`` override set, in order."""
    data = copy.deepcopy(data)
    for override in overrides:
        path, value = parse_override(override)
        _set_path(data, path, value)
    return data


# --------------------------------------------------------------------------- renamed keys


def _flat_leaves(value: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    leaves: dict[str, Any] = {}
    for key, child in value.items():
        leaves.update(_flat_leaves(child, f"{prefix}.{key}"))
    return leaves


def _check_no_conflict(old: str, old_value: Any, new: str, new_value: Any) -> None:
    """ConfigError when a key given under its old name (``old_value``) and its new one differ."""
    old_leaves, new_leaves = _flat_leaves(old_value, old), _flat_leaves(new_value, new)
    for key, value in old_leaves.items():
        moved = new + key[len(old):]
        if moved in new_leaves and new_leaves[moved] != value:
            raise ConfigError(f"{key} ({value!r}) and {moved} ({new_leaves[moved]!r}) are both given: {old} is the "
                              f"old name of {new}; give only {moved}")


def rename_old_keys(data: dict) -> tuple[dict, list[tuple[str, str]]]:
    """A copy of ``data`` with each old key of :data:`RENAMED_KEYS` moved to its new place, and the
    ``(old, new)`` pairs moved. ConfigError when an old key and its new one are given different values."""
    data = copy.deepcopy(data)
    moved = []
    for old, new in RENAMED_KEYS.items():
        *old_parents, old_leaf = old.split(".")
        parent = _lookup(data, old_parents)
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        *new_parents, new_leaf = new.split(".")
        node = data
        for depth, part in enumerate(new_parents):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"config key '{'.'.join(new_parents[:depth + 1])}' must be a mapping, "
                                  f"got {node[part]!r}")
            node = node[part]
        current = node.get(new_leaf)
        if current is not None:
            _check_no_conflict(old, value, new, current)
            value = merge_dicts(value, current) if isinstance(value, dict) and isinstance(current, dict) else current
        node[new_leaf] = value
        moved.append((old, new))
    return data, moved


def rename_old_overrides(overrides: typing.Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``key=value`` overrides with old keys (:data:`RENAMED_KEYS`) renamed, and the ``(old, new)`` pairs
    renamed. ConfigError when an old key and its new one are both overridden with different values."""
    renamed, moved = [], []
    given: dict[str, list] = {}  # new key -> the values given under its new name
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        old = next((old for old in RENAMED_KEYS if key == old or key.startswith(old + ".")), None)
        if old is None:
            given.setdefault(key, []).append(value)
        else:
            new_key = RENAMED_KEYS[old] + key[len(old):]
            moved.append((key, new_key, value))
            text = f"{new_key}={text.split('=', 1)[1]}"
        renamed.append(text)
    for old_key, new_key, value in moved:
        for other in given.get(new_key, []):
            if other != value:
                raise ConfigError(f"overrides {old_key}={value!r} and {new_key}={other!r} are both given: {old_key} "
                                  f"is the old name of {new_key}; give only {new_key}")
    return renamed, [(old_key, new_key) for old_key, new_key, _ in moved]


def _log_renamed(moved: list[tuple[str, str]], method: str, has_section: bool) -> None:
    if not moved:
        return
    pairs = ", ".join(f"{old} -> {new}" for old, new in dict.fromkeys(moved))
    if has_section:
        _LOG.warning("deprecated config keys, read as their new names: %s (write the new keys)", pairs)
    else:
        _LOG.warning("deprecated config keys %s: checked and ignored, method %s has no plca section (it computes "
                     "no PLCA terms)", pairs, method)


def upgrade_config_dict(data: dict) -> dict:
    """A stored config's plain data (e.g. a checkpoint's ``config``) in today's keys, as :func:`to_dict`
    writes it: old keys moved (:data:`RENAMED_KEYS`), and no ``plca`` section for a method without one."""
    data, _ = rename_old_keys(data)
    try:
        has_section = _method_class(data.get("method", Config.method)).plca_section is not None
    except ConfigError:
        return data
    if not has_section:
        data.pop("plca", None)
    return data


# --------------------------------------------------------------------------- typed building


def _method_class(name: Any):
    from plca.methods import get_method, method_names

    if not isinstance(name, str) or name not in method_names():
        raise ConfigError(f"method '{name}' is unknown; choose one of {', '.join(method_names())}")
    return get_method(name)


def _option_sections() -> dict[str, type]:
    """Config sections of the registered methods that have options: ``{method name: Options}``."""
    from plca.methods import get_method, method_names

    return {name: get_method(name).Options for name in method_names() if get_method(name).Options is not None}


def _field_type(schema: type, path: list[str]) -> Any:
    tp: Any = schema
    for part in path:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            tp = next(t for t in typing.get_args(tp) if t is not type(None))
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _check_booleans(schema: type, data: Any, prefix: str) -> None:
    """OmegaConf reads 3 as true; a boolean key must get true or false."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(schema):
        return
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is None:
            continue
        allowed = typing.get_args(tp) or (tp,)
        name = f"{prefix}{key}"
        if bool in allowed and value is not None and not isinstance(value, bool):
            raise ConfigError(f"config key '{name}' must be true or false, got {value!r}")
        for option in allowed:
            if dataclasses.is_dataclass(option):
                _check_booleans(option, value, name + ".")


def _typed(schema: type, data: dict, prefix: str = "") -> Any:
    """An instance of ``schema`` from ``data`` via OmegaConf, errors turned into one named line.

    Without OmegaConf (the core install: ``plca.load_model`` of a stored config) the plain reader of
    :mod:`plca.dataclass_reader` builds the same dataclasses."""
    _check_booleans(schema, data, prefix)
    try:
        from omegaconf import OmegaConf
        from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
    except ModuleNotFoundError:
        try:
            return read_dataclass(schema, data, prefix)
        except DataclassReadError as error:
            raise ConfigError(str(error)) from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        full = f"{prefix}{key}"
        if isinstance(error, ConfigKeyError):
            parent = full.rsplit(".", 1)[0] if "." in full else ""
            node = _field_type(schema, key.split(".")[:-1]) if "." in key else schema
            allowed = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
            where = f"'{parent}'" if parent else "the top level"
            hint = str(error).splitlines()[0]
            suggestion = hint[hint.index("Did you mean"):] if "Did you mean" in hint else ""
            raise ConfigError(f"unknown config key '{full}'; keys allowed at {where}: {', '.join(allowed)}"
                              f"{'. ' + suggestion if suggestion else ''}") from None
        expected = _field_type(schema, key.split("."))
        value = _lookup(data, key.split("."))
        if expected is not None:
            raise ConfigError(f"config key '{full}' must be {_describe_type(expected)}, got {value!r}") from None
        raise ConfigError(f"config key '{full}': {str(error).splitlines()[0]}") from None


def _lookup(data: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def build_config(data: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from plain data (already ``_base_``-merged) plus ``key=value`` overrides.

    Old keys (:data:`RENAMED_KEYS`) in ``data`` or the overrides are read as their new names, with one
    logged line naming them.
    """
    plca_given = "plca" in data or any(parse_override(text)[0][0] == "plca" for text in overrides)
    data, moved = rename_old_keys(data)
    overrides, moved_overrides = rename_old_overrides(overrides)
    moved += moved_overrides
    data = apply_overrides(data, overrides)
    method_cls = _method_class(data.get("method", Config.method))
    data = merge_dicts(method_cls.config_defaults, data)
    sections = _option_sections()
    plca_key = ("plca",) if method_cls.plca_section is not None else ()
    unknown = [k for k in data if k not in _CORE_KEYS and k not in sections and k != "plca"]
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; keys allowed at the top level: "
                          f"{', '.join(_CORE_KEYS + plca_key + tuple(sections))}")
    options = {name: _typed(schema, data.get(name) or {}, f"{name}.") for name, schema in sections.items()
               if name in data or name == method_cls.name}
    _log_renamed(moved, method_cls.name, bool(plca_key))
    plca = _plca_section(data.get("plca"), method_cls, plca_given, moved)
    config = _typed(Config, {k: v for k, v in data.items() if k in _CORE_KEYS})
    config.plca = plca
    config.method_options = options.get(method_cls.name)
    validate(config)
    return config


def _plca_section(given: Any, method_cls: Any, explicit: bool, moved: list[tuple[str, str]]) -> Any:
    """The typed, checked ``plca:`` section (:class:`~plca.methods.plca_objective.PLCAOptions`) of a
    method with one, at its defaults (``Method.plca_section``: "on", the reference's weights; "off",
    weights 0) below ``given``. None for a method without one: there a ``plca:`` key is an error, and
    old keys moved into it are checked (as they were before they moved) and dropped."""
    from plca.methods import get_method, method_names
    from plca.methods import plca_objective

    mode = method_cls.plca_section
    if mode is None and explicit:
        with_section = [name for name in method_names() if get_method(name).plca_section is not None]
        raise ConfigError(f"unknown config key 'plca': method {method_cls.name} has no plca section (it computes "
                          f"no PLCA terms; {', '.join(with_section)} do)")
    if given is None and mode is None:
        return None
    if given is not None and not isinstance(given, dict):
        raise ConfigError(f"config key 'plca' must be a mapping, got {given!r}")
    defaults = {} if mode == "on" else plca_objective.zero_weights()
    try:
        options = _typed(plca_objective.PLCAOptions, merge_dicts(defaults, given or {}), "plca.")
        options.validate()
    except ValueError as error:  # a ConfigError too
        raise ConfigError(_with_old_name(str(error), moved)) from None
    return options if mode is not None else None


def _with_old_name(message: str, moved: list[tuple[str, str]]) -> str:
    """``message`` about a key given under its old name, saying so."""
    for old, new in moved:
        match = re.search(re.escape(new) + r"[\w.]*", message)
        if match:
            return f"{message} (given as {old}{match[0][len(new):]}, its old name)"
    return message


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config file with its bases (or start from defaults when ``path`` is None), apply overrides."""
    data = read_config_file(path) if path is not None else {}
    try:
        return build_config(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None


def to_dict(config: Config) -> dict:
    """The config as plain dicts and lists (YAML/JSON-serialisable); the ``plca`` section only for a method
    with one; method options under the method's name."""
    data = {f.name: dataclasses.asdict(getattr(config, f.name)) if dataclasses.is_dataclass(getattr(config, f.name))
            else getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name != "method_options" and not (f.name == "plca" and config.plca is None)}
    if config.method_options is not None:
        data[config.method] = dataclasses.asdict(config.method_options)
    return data


def save_config(config: Config, path: str | Path) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def replace_model(config: Config, **changes: Any) -> Config:
    """A copy of ``config`` with fields of its model section replaced."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))


# --------------------------------------------------------------------------- checks across keys


def validate(config: Config) -> None:
    """Checks that types alone cannot express: each section's owner checks its own keys (raising
    ``ValueError`` naming the key, turned into :class:`ConfigError` here); the checks across sections are here."""
    from plca.data.config_checks import validate_data_config
    from plca.engine.config_checks import validate_eval_config, validate_train_config
    from plca.models.config_checks import validate_model_config

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    method_cls = _method_class(config.method)
    try:
        validate_data_config(config.data)
        check(not method_cls.uses_target or config.data.target is not None,
              f"method {config.method} needs data.target (the unlabelled target-domain images)")
        validate_model_config(config.model)
        validate_train_config(config.train)
        validate_eval_config(config.eval)
        check(config.eval.model == "student" or method_cls.has_teacher,
              f"eval.model {config.eval.model}: method {config.method} has no teacher; use eval.model=student")
        _check_loss(config, check)
        _check_hrda(config, method_cls, check)
        check(config.device == "auto" or config.device == "cpu" or config.device.split(":")[0] == "cuda",
              f"device '{config.device}' is unknown; use auto, cpu, cuda or cuda:N")
        if config.method_options is not None and hasattr(config.method_options, "validate"):
            config.method_options.validate(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_hrda(config: Config, method_cls, check) -> None:
    """``model.hrda`` against the evaluation (a detail crop larger than the training crop is refused at the
    first step, naming both keys: the data checks shrink crops by override)."""
    hrda = config.model.hrda
    if not hrda.enabled:
        return
    tta = config.eval.test_time_aggregation
    check(not (method_cls.test_time_aggregation if tta is None else tta),
          "eval.test_time_aggregation: PLCA's test-time aggregation is not defined for HRDA's fused sliding-window "
          "prediction; set eval.test_time_aggregation=false with model.hrda.enabled")


def _check_loss(config: Config, check) -> None:
    """The ``loss`` section's checks."""
    from plca.methods.base import CE_AVERAGES

    loss = config.loss
    check(loss.lovasz_weight >= 0, f"loss.lovasz_weight must be >= 0, got {loss.lovasz_weight}")
    check(loss.ce_average in CE_AVERAGES, f"loss.ce_average must be one of {', '.join(CE_AVERAGES)}, got {loss.ce_average!r}")
    check(loss.lovasz_reduction in ("global", "reference"),
          f"loss.lovasz_reduction must be global or reference, got {loss.lovasz_reduction!r}")
    # the plca: section is checked by its owner as build_config builds it (PLCAOptions.validate)


# --------------------------------------------------------------------------- documentation of the keys


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: the comment on its line}`` of a dataclass, read from its source."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+): [^#]*?#\s*(.+)$", line)
        if match:
            comments[match[1]] = match[2].strip()
    return comments


def key_comments(config: Config) -> dict[str, str]:
    """Every dotted key of ``config`` (including its plca and method sections) with the comment that documents it."""
    result: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        comments = _field_comments(cls)
        for name, tp in typing.get_type_hints(cls).items():
            if name == "method_options":
                continue
            key = f"{prefix}{name}"
            if name in comments:
                result[key] = comments[name]
            options = [t for t in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(t)]
            if options:
                walk(options[0], key + ".")

    walk(Config, "")
    if config.plca is not None:
        walk(type(config.plca), "plca.")
    if config.method_options is not None:
        walk(type(config.method_options), f"{config.method}.")
    return result


def annotated_yaml(config: Config) -> str:
    """The resolved config as YAML, each key followed by the comment that documents it."""
    import yaml

    comments = key_comments(config)
    lines = []

    def emit(data: dict, prefix: str, indent: int) -> None:
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            note = f"  # {comments[dotted]}" if dotted in comments else ""
            pad = "  " * indent
            if isinstance(value, dict) and value:
                lines.append(f"{pad}{key}:{note}")
                emit(value, dotted + ".", indent + 1)
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
                text = text[:-4].rstrip() if text.endswith("\n...") else text.removesuffix("...").strip()
                lines.append(f"{pad}{key}: {text}{note}")

    emit(to_dict(config), "", 0)
    return "\n".join(lines) + "\n"
