"""Run configuration: typed dataclasses filled from YAML files and ``key=value`` overrides by OmegaConf.

One :class:`Config` object describes a run completely; it is saved as ``config.yaml``
in the run directory and nothing reads a global. A config is built from, lowest
precedence first:

1. the dataclass defaults below;
2. the defaults of the chosen method (``Method.config_defaults``, e.g. no association
   for ``self_training`` unless asked);
3. the files named by ``_base_`` (a path or a list of paths, relative to the file that
   names them; bases may have bases), merged in order;
4. the file itself;
5. the command-line overrides ``key.path=value`` (values parsed as YAML).

A method's own options live in a section named after it (``self_training:``), typed by
the method's ``Options`` dataclass; the engine hands them to the method untouched.
Unknown keys and values of the wrong type are a :class:`ConfigError` that names the key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


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


@dataclass
class AssociationConfig:
    feature_weight: float = 0.1  # cos association on the model's features (model.features)
    classifier_weight: float = 0.1  # kl association on class probabilities
    aggregate: bool = True  # spatial aggregation of the target map before associating
    alpha: float = 0.5  # (1 - alpha) x + alpha A(x) in the spatial aggregation
    impl: str = "efficient"  # efficient | dense
    reduction: str = "pooled"  # pooled: one mean over the positives of the whole batch (the reference) | pairs
    similarity_dtype: str = "float32"  # float32 products even under AMP (bf16 flips top-1 cycles) | autocast


@dataclass
class LossConfig:
    # Defaults are the PLCA reference's values. Effective weight of Lovasz-softmax against the
    # mean cross-entropy: the reference uses 0.75 multiplied by world_size x ITER_SIZE = 4, i.e. 3.0.
    lovasz_weight: float = 3.0  # Lovasz-softmax on the source, against the mean cross-entropy
    lovasz_reduction: str = "global"  # under DDP: global (the exact loss of the global batch) | reference (the PLCA reference's: global sort, each GPU's mean over its own classes x world size)
    lsr_weight: float = 0.01  # LSR on source and target log-softmax (plca)
    lsr_threshold: float = 10.0  # LSR keeps -mean_c log p_c near this value
    ce_average: str = "labelled"  # source cross-entropy's mean: labelled (over labelled pixels: PyTorch's, the PLCA reference) | all_pixels (over every pixel, ignored ones count 0: mmseg 0.16, DAFormer)
    association: AssociationConfig = field(default_factory=AssociationConfig)


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
    model: str = "student"  # methods with a teacher: student (what papers report) | teacher | both


@dataclass
class Config:
    method: str = "source_only"  # source_only | plca | ... (plca.methods registers them)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs"  # each run gets its own directory under it
    run_name: str | None = None  # null = derived from the method, data, backbone and seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # the chosen method's own section (an instance of its Options dataclass), kept under the
    # method's name in YAML; None for methods without options
    method_options: Any = None


_CORE_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "method_options")


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


def _describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [_describe_type(t) for t in typing.get_args(tp) if t is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return f"a list of {_describe_type(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


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
    """An instance of ``schema`` from ``data`` via OmegaConf, errors turned into one named line."""
    _check_booleans(schema, data, prefix)
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
    """A validated :class:`Config` from plain data (already ``_base_``-merged) plus ``key=value`` overrides."""
    data = apply_overrides(data, overrides)
    method_cls = _method_class(data.get("method", Config.method))
    data = merge_dicts(method_cls.config_defaults, data)
    sections = _option_sections()
    unknown = [k for k in data if k not in _CORE_KEYS and k not in sections]
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; keys allowed at the top level: "
                          f"{', '.join(_CORE_KEYS + tuple(sections))}")
    options = {name: _typed(schema, data.get(name) or {}, f"{name}.") for name, schema in sections.items()
               if name in data or name == method_cls.name}
    config = _typed(Config, {k: v for k, v in data.items() if k in _CORE_KEYS})
    config.method_options = options.get(method_cls.name)
    validate(config)
    return config


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config file with its bases (or start from defaults when ``path`` is None), apply overrides."""
    data = read_config_file(path) if path is not None else {}
    try:
        return build_config(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None


def to_dict(config: Config) -> dict:
    """The config as plain dicts and lists (YAML/JSON-serialisable); method options under the method's name."""
    data = {f.name: dataclasses.asdict(getattr(config, f.name)) if dataclasses.is_dataclass(getattr(config, f.name))
            else getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "method_options"}
    if config.method_options is not None:
        data[config.method] = dataclasses.asdict(config.method_options)
    return data


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def replace_model(config: Config, **changes: Any) -> Config:
    """A copy of ``config`` with fields of its model section replaced."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))


# --------------------------------------------------------------------------- checks across keys


def _check_rare_class_thresholds(rcs: RareClassSamplingConfig, check) -> None:
    """Each of RCS's two thresholds is given once: absolute (DAFormer's pixels) or relative (a share)."""
    key = "data.rare_class_sampling."
    for absolute, relative, what in (("min_pixels", "min_pixels_ratio", "the image threshold"),
                                     ("min_crop_ratio", "min_crop_pixels_ratio", "the crop threshold")):
        given = [name for name in (absolute, relative) if getattr(rcs, name) is not None]
        check(len(given) < 2, f"{key}{absolute} and {key}{relative} are both set: two ways to give {what}; "
                              f"set one of them null")
        check(len(given) > 0, f"{key}{absolute} and {key}{relative} are both null: give {what} with one of them")
    check(rcs.min_pixels is None or rcs.min_pixels >= 0, f"{key}min_pixels must be >= 0")
    check(rcs.min_pixels_ratio is None or 0 <= rcs.min_pixels_ratio < 1,
          f"{key}min_pixels_ratio must be in [0, 1) (a share of each image's pixels)")
    check(rcs.min_crop_pixels_ratio is None or 0 <= rcs.min_crop_pixels_ratio < 1,
          f"{key}min_crop_pixels_ratio must be in [0, 1) (a share of the crop's pixels; 0 = no re-draws)")
    check(rcs.min_crop_ratio is None or rcs.min_pixels is not None,
          f"{key}min_crop_ratio multiplies {key}min_pixels, which is null (min_pixels_ratio is set): give the crop "
          f"threshold as {key}min_crop_pixels_ratio (DAFormer on GTA5: 0.005723) and set min_crop_ratio null")


def validate(config: Config) -> None:
    """Checks that types alone cannot express."""
    from plca.data.datasets import DATASET_FORMATS
    from plca.engine.optim import NO_DECAY_RULES, OPTIMIZERS
    from plca.methods.base import CE_AVERAGES
    from plca.models.packaged import is_packaged, packaged_entry
    from plca.models.registry import backbone_names, head_names, is_known_backbone
    from plca.models.resnet import STYLES as RESNET_STYLES
    from plca.models.segmentor import FEATURE_SOURCES

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    method_cls = _method_class(config.method)
    data = config.data
    check(len(data.classes) > 0, "data.classes must list the class names, in class-index order")
    check(all(isinstance(c, str) and c.strip() for c in data.classes), "data.classes has an empty name")
    check(len(set(data.classes)) == len(data.classes), "data.classes has duplicate names")
    check(len(data.classes) < 255, "data.classes: at most 254 classes (255 is the ignore label)")
    for name in ("source", "target", "val"):
        spec = getattr(data, name)
        if spec is None:
            continue
        check(spec.format in DATASET_FORMATS,
              f"data.{name}.format '{spec.format}' is unknown; choose one of {', '.join(DATASET_FORMATS)}")
        check(bool(spec.root), f"data.{name}.root is empty: give the dataset's folder")
    check(not method_cls.uses_target or data.target is not None,
          f"method {config.method} needs data.target (the unlabelled target-domain images)")
    check(data.on_error in ("raise", "skip"), "data.on_error must be 'raise' or 'skip'")
    check(data.num_workers >= 0, "data.num_workers must be >= 0")
    rcs = data.rare_class_sampling
    check(rcs.temperature > 0 and rcs.retries >= 0, "data.rare_class_sampling: temperature must be > 0, retries >= 0")
    _check_rare_class_thresholds(rcs, check)

    model = config.model
    check(is_known_backbone(model.backbone),
          f"model.backbone '{model.backbone}' is unknown; choose one of {', '.join(backbone_names())}")
    check(model.head in head_names(), f"model.head '{model.head}' is unknown; choose one of {', '.join(head_names())}")
    check(model.style is None or model.style in RESNET_STYLES,
          f"model.style must be {', '.join(repr(style) for style in RESNET_STYLES)} or null")
    # the other backbones take RGB with the ImageNet mean / std, which is what "pytorch" means
    check(model.style in (None, "pytorch") or model.backbone.startswith("resnet"),
          f"model.style {model.style} is for the ResNet backbones only; {model.backbone} has its own input "
          f"normalisation (leave model.style null)")
    check(model.features in FEATURE_SOURCES, f"model.features must be one of {', '.join(FEATURE_SOURCES)}")
    check(model.head_width is None or model.head_width > 0, f"model.head_width must be > 0 or null, got {model.head_width}")
    check(model.head_width is None or not model.head.startswith("deeplabv2"),
          f"model.head_width: the {model.head} head has no width (its output is the class count); leave it null")
    if is_packaged(model.pretrained):
        try:
            packaged_entry(model.pretrained)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if model.backbone.startswith("timm:"):
        from plca.models.timm_backbone import check_model_name, import_timm

        try:
            import_timm()
            check_model_name(model.backbone.partition(":")[2])
        except (ImportError, ValueError) as error:
            raise ConfigError(f"model.backbone '{model.backbone}': {error}") from None

    train = config.train
    check(train.iters > 0, "train.iters must be > 0")
    check(train.batch_size > 0 and train.accumulation > 0, "train.batch_size and train.accumulation must be > 0")
    check(len(train.crop_size) == 2 and min(train.crop_size) > 0, "train.crop_size must be [h, w] > 0")
    check(train.shorter_side is None or (len(train.shorter_side) == 2 and 0 < train.shorter_side[0] <= train.shorter_side[1]),
          "train.shorter_side must be null or [lo, hi] with 0 < lo <= hi")
    check(train.scale_range is None or (len(train.scale_range) == 2 and 0 < train.scale_range[0] <= train.scale_range[1]),
          "train.scale_range must be null or [lo, hi] with 0 < lo <= hi")
    check(train.target_shorter_side is None or (len(train.target_shorter_side) == 2
                                                and 0 < train.target_shorter_side[0] <= train.target_shorter_side[1]),
          "train.target_shorter_side must be null or [lo, hi] with 0 < lo <= hi")
    for key in ("cat_max_ratio", "target_cat_max_ratio"):
        check(0.0 < getattr(train, key) <= 1.0, f"train.{key} must be in (0, 1] (1 = off)")
    check(train.target_shorter_side is None or train.scale_range is None,
          "train.target_shorter_side goes with train.shorter_side, not with train.scale_range")
    check(train.scale_range is None or train.shorter_side is None,
          "train.scale_range and train.shorter_side are two ways to resize: set one of them (the other null)")
    check(train.lr > 0, "train.lr must be > 0")
    check(train.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {train.optimizer!r}")
    check(train.no_decay in NO_DECAY_RULES,
          f"train.no_decay must be one of {', '.join(NO_DECAY_RULES)}, got {train.no_decay!r}")
    check(len(train.betas) == 2 and all(0 <= b < 1 for b in train.betas), "train.betas must be [b1, b2] in [0, 1)")
    check(train.warmup_iters >= 0 and 0 < train.warmup_ratio <= 1,
          "train.warmup_iters must be >= 0 and train.warmup_ratio in (0, 1]")
    check(train.collective_timeout_s > 0, "train.collective_timeout_s must be > 0")
    check(0.0 <= train.momentum < 1.0, f"train.momentum must be in [0, 1), got {train.momentum}")
    check(train.weight_decay >= 0, f"train.weight_decay must be >= 0, got {train.weight_decay}")
    check(train.poly_power >= 0, f"train.poly_power must be >= 0, got {train.poly_power}")
    check(train.head_lr_mult > 0, f"train.head_lr_mult must be > 0, got {train.head_lr_mult}")
    check(train.seed >= 0, f"train.seed must be >= 0, got {train.seed}")
    check(train.max_nonfinite_steps > 0, "train.max_nonfinite_steps must be > 0")
    check(train.poly_iters is None or train.poly_iters >= train.iters,
          "train.poly_iters must be >= train.iters (the poly schedule may not end before training)")
    check(train.checkpoint_every > 0 and train.log_every > 0 and train.eval_every >= 0 and (train.image_every or 0) >= 0,
          "train.checkpoint_every and train.log_every must be > 0, train.eval_every and train.image_every >= 0")
    check(config.eval.size is None or (len(config.eval.size) == 2 and min(config.eval.size) > 0),
          "eval.size must be null or [h, w] > 0")
    check(0.0 <= config.eval.alpha <= 1.0, "eval.alpha must be in [0, 1]")
    check(config.eval.model in ("student", "teacher", "both"), "eval.model must be student, teacher or both")
    check(config.eval.model == "student" or method_cls.has_teacher,
          f"eval.model {config.eval.model}: method {config.method} has no teacher; use eval.model=student")

    loss = config.loss
    for key in ("lovasz_weight", "lsr_weight"):
        check(getattr(loss, key) >= 0, f"loss.{key} must be >= 0, got {getattr(loss, key)}")
    check(loss.lsr_threshold > 0, "loss.lsr_threshold must be > 0")
    check(loss.ce_average in CE_AVERAGES, f"loss.ce_average must be one of {', '.join(CE_AVERAGES)}, got {loss.ce_average!r}")
    check(loss.lovasz_reduction in ("global", "reference"),
          f"loss.lovasz_reduction must be global or reference, got {loss.lovasz_reduction!r}")
    for key in ("feature_weight", "classifier_weight"):
        value = getattr(loss.association, key)
        check(value >= 0, f"loss.association.{key} must be >= 0, got {value}")
    check(0.0 <= loss.association.alpha <= 1.0, "loss.association.alpha must be in [0, 1]")
    check(loss.association.impl in ("efficient", "dense"), "loss.association.impl must be efficient or dense")
    check(loss.association.reduction in ("pooled", "pairs"), "loss.association.reduction must be pooled or pairs")
    check(loss.association.similarity_dtype in ("float32", "autocast", "bfloat16"),
          "loss.association.similarity_dtype must be float32, autocast or bfloat16")
    check(config.device == "auto" or config.device == "cpu" or config.device.split(":")[0] == "cuda",
          f"device '{config.device}' is unknown; use auto, cpu, cuda or cuda:N")
    if config.method_options is not None and hasattr(config.method_options, "validate"):
        try:
            config.method_options.validate(config)
        except ValueError as error:
            raise ConfigError(str(error)) from None


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
    """Every dotted key of ``config`` (including its method's section) with the comment that documents it."""
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
    if config.method_options is not None:
        walk(type(config.method_options), f"{config.method}.")
    return result


def annotated_yaml(config: Config) -> str:
    """The resolved config as YAML, each key followed by the comment that documents it."""
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
