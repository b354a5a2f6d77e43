"""Run configuration: typed dataclasses, built from a YAML file plus ``key=value`` overrides.

One :class:`Config` object describes a run completely; it is saved as
``config.yaml`` in the run directory and nothing reads a global. Unknown keys
and values of the wrong type are rejected with a :class:`ConfigError` that
names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the problem."""


@dataclass
class DatasetConfig:
    """Where one dataset lives: its on-disk ``format``, ``root`` folder and ``split``."""

    format: str = "folder"  # folder | gta5 | synthia | cityscapes | synthetic
    root: str = ""
    split: str = "train"


@dataclass
class DataConfig:
    classes: list[str] = field(default_factory=list)  # class names, in class-index order
    source: DatasetConfig = field(default_factory=DatasetConfig)
    target: DatasetConfig | None = None  # unlabelled target images (needed by plca)
    val: DatasetConfig | None = None  # labelled validation set, usually the target's val split
    num_workers: int = 2
    on_error: str = "raise"  # a sample that fails to load: raise | skip (skipped samples are counted)


@dataclass
class ModelConfig:
    backbone: str = "resnet101"  # resnet18 | resnet34 | resnet50 | resnet101
    style: str = "caffe"  # caffe (BGR 0-255 minus mean) | pytorch (v1.5, RGB, ImageNet mean/std)
    pretrained: str | None = None  # ImageNet weights (torchvision key layout); null = from scratch


@dataclass
class AssociationConfig:
    feature_weight: float = 0.1  # cos association on backbone features
    classifier_weight: float = 0.1  # kl association on class probabilities
    aggregate: bool = True  # spatial aggregation of the target map before associating
    alpha: float = 0.5
    impl: str = "efficient"  # efficient | dense


@dataclass
class LossConfig:
    # Defaults are the PLCA reference's values. Effective weight of Lovasz-softmax against the
    # mean cross-entropy: the reference uses 0.75 multiplied by world_size x ITER_SIZE = 4, i.e. 3.0.
    lovasz_weight: float = 3.0
    lsr_weight: float = 0.01  # LSR on source and target log-softmax (plca only)
    lsr_threshold: float = 10.0
    association: AssociationConfig = field(default_factory=AssociationConfig)


@dataclass
class TrainConfig:
    iters: int = 40000  # optimiser updates
    batch_size: int = 2  # images per domain per process per forward
    accumulation: int = 1  # forwards per update (gradient accumulation)
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # [h, w]
    shorter_side: list[int] | None = None  # random shorter side [lo, hi] before cropping; null = no resize
    flip: bool = True
    lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    poly_iters: int | None = None  # iterations over which the poly schedule decays; null = iters
    head_lr_mult: float = 1.0
    seed: int = 0
    amp: bool = False  # bf16 autocast on CUDA
    channels_last: bool = False
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP (CUDA only)
    deterministic: bool = False
    log_every: int = 20
    eval_every: int = 2000  # 0 = only at the end
    checkpoint_every: int = 1000
    image_every: int = 1000  # TensorBoard grids of inputs, predictions and labels; 0 = never
    max_nonfinite_steps: int = 5  # consecutive non-finite losses / gradients before the run stops


@dataclass
class EvalConfig:
    size: list[int] | None = None  # [h, w] to resize val images to (reference: [730, 1460]); null = as is
    test_time_aggregation: bool | None = None  # null = on for plca, off otherwise
    alpha: float = 0.5


@dataclass
class Config:
    method: str = "source_only"  # source_only | plca
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs"  # each run gets its own directory under it
    run_name: str | None = None  # null = derived from the method, data, backbone and seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N


METHODS = ("source_only", "plca")


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting ints to floats); raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"config key '{key}' may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list of {_type_name(item_type)}, got {value!r}")
        return [_convert(item, item_type, f"{key}[{n}]") for n, item in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}'; keys allowed at {where}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(prefix, name))
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(config: Any) -> dict:
    """The config as plain dicts and lists (YAML/JSON-serialisable)."""
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.crop_size=[160,160]'`` -> ``(['train', 'crop_size'], [160, 160])`` (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': cannot parse the value ({error})") from None
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


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def build_config(data: dict, overrides: list[str] = ()) -> Config:
    """A validated :class:`Config` from a plain dict plus ``key=value`` overrides."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for override in overrides:
        path, value = parse_override(override)
        _set_path(data, path, value)
    config = _build(Config, data)
    validate(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (or start from defaults when ``path`` is None) and apply overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    try:
        return build_config(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def validate(config: Config) -> None:
    """Checks across keys that types alone cannot express."""
    from plca.data.datasets import DATASET_FORMATS

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    check(config.method in METHODS, f"method '{config.method}' is unknown; choose one of {', '.join(METHODS)}")
    check(len(config.data.classes) > 0, "data.classes must list the class names, in class-index order")
    check(len(set(config.data.classes)) == len(config.data.classes), "data.classes has duplicate names")
    check(len(config.data.classes) < 255, "data.classes: at most 254 classes (255 is the ignore label)")
    for name in ("source", "target", "val"):
        spec = getattr(config.data, name)
        if spec is None:
            continue
        check(spec.format in DATASET_FORMATS,
              f"data.{name}.format '{spec.format}' is unknown; choose one of {', '.join(DATASET_FORMATS)}")
        check(bool(spec.root), f"data.{name}.root is empty: give the dataset's folder")
    check(config.method != "plca" or config.data.target is not None,
          "method plca needs data.target (the unlabelled target-domain images)")
    check(config.data.on_error in ("raise", "skip"), "data.on_error must be 'raise' or 'skip'")
    check(config.data.num_workers >= 0, "data.num_workers must be >= 0")
    check(config.model.style in ("caffe", "pytorch"), "model.style must be 'caffe' or 'pytorch'")
    check(config.model.backbone in ("resnet18", "resnet34", "resnet50", "resnet101"),
          "model.backbone must be one of resnet18, resnet34, resnet50, resnet101")
    train = config.train
    check(train.iters > 0, "train.iters must be > 0")
    check(train.batch_size > 0 and train.accumulation > 0, "train.batch_size and train.accumulation must be > 0")
    check(len(train.crop_size) == 2 and min(train.crop_size) > 0, "train.crop_size must be [h, w] > 0")
    check(train.shorter_side is None or (len(train.shorter_side) == 2 and 0 < train.shorter_side[0] <= train.shorter_side[1]),
          "train.shorter_side must be null or [lo, hi] with 0 < lo <= hi")
    check(train.lr > 0, "train.lr must be > 0")
    check(train.poly_iters is None or train.poly_iters >= train.iters,
          "train.poly_iters must be >= train.iters (the poly schedule may not end before training)")
    check(train.checkpoint_every > 0 and train.log_every > 0 and train.eval_every >= 0 and train.image_every >= 0,
          "train.checkpoint_every and train.log_every must be > 0, train.eval_every and train.image_every >= 0")
    check(config.eval.size is None or (len(config.eval.size) == 2 and min(config.eval.size) > 0),
          "eval.size must be null or [h, w] > 0")
    check(0.0 <= config.loss.association.alpha <= 1.0, "loss.association.alpha must be in [0, 1]")
    check(config.loss.association.impl in ("efficient", "dense"), "loss.association.impl must be efficient or dense")
