"""Config: YAML + overrides, type checking, clear errors naming the key."""

from pathlib import Path

import pytest
import yaml

from plca.config import ConfigError, build_config, load_config, parse_override, read_config_file, save_config, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))

MINIMAL = {
    "data": {
        "classes": ["road", "car"],
        "source": {"format": "folder", "root": "/src", "split": "train"},
        "val": {"format": "folder", "root": "/tgt", "split": "val"},
    }
}


def test_overrides_documented_in_the_issue():
    config = build_config(MINIMAL, [
        "train.iters=200", "model.backbone=resnet18", "data.target.root=/x", "data.target.format=folder",
        "data.classes=[sky,road,car]", "train.crop_size=[160,160]", "data.classes=[sky, traffic light]",
    ])
    assert config.train.iters == 200
    assert config.model.backbone == "resnet18"
    assert config.data.target.root == "/x"
    assert config.data.target.split == "train"  # default filled in
    assert config.data.classes == ["sky", "traffic light"]
    assert config.train.crop_size == [160, 160]


def test_int_is_accepted_for_float_and_null_for_optional():
    config = build_config(MINIMAL, ["train.lr=1", "model.pretrained=null", "train.shorter_side=[10,20]"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.pretrained is None
    assert config.train.shorter_side == [10, 20]


@pytest.mark.parametrize("override, key", [
    ("train.itres=5", "train.itres"),
    ("model.colour=red", "model.colour"),
    ("bogus=1", "bogus"),
])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(MINIMAL, [override])


@pytest.mark.parametrize("override, fragment", [
    ("train.iters=many", "train.iters"),
    ("train.crop_size=5", "train.crop_size"),
    ("train.flip=3", "train.flip"),
    ("data.source.format=kitti", "data.source.format"),
    ("method=dacs", "method"),
    ("train.iters=0", "train.iters"),
    ("model.style=tf", "model.style"),
    ("train.cat_max_ratio=0", "train.cat_max_ratio"),
    ("train.target_cat_max_ratio=1.5", "train.target_cat_max_ratio"),
])
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        build_config(MINIMAL, [override])


def test_plca_requires_a_target():
    with pytest.raises(ConfigError, match="data.target"):
        build_config(MINIMAL, ["method=plca"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("train.iters")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..iters=3")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_save_and_reload_round_trip(tmp_path):
    config = build_config(MINIMAL, ["train.iters=7"])
    save_config(config, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    raw = read_config_file(path)
    assert config.method == raw["method"]
    assert "_base_" not in raw


def test_reference_hyperparameters_in_shipped_configs():
    from plca.data.labels import CITYSCAPES_CLASSES, SYNTHIA16_CLASSES

    gta = load_config(Path(CONFIGS[0]).parent / "gta2cityscapes_plca.yaml")
    assert tuple(gta.data.classes) == CITYSCAPES_CLASSES
    assert (gta.train.lr, gta.train.momentum, gta.train.weight_decay, gta.train.poly_power) == (2.5e-4, 0.9, 5e-4, 0.9)
    assert gta.train.crop_size == [730, 730] and gta.train.shorter_side == [760, 988]
    assert gta.train.iters == 28 * 372 and gta.train.poly_iters == 30 * 372
    assert gta.loss.lovasz_weight == 3.0 and gta.plca.lsr_weight == 0.01
    assert gta.plca.association.feature_weight == gta.plca.association.classifier_weight == 0.1
    assert gta.eval.size == [730, 1460] and gta.model.style == "caffe"
    synthia = load_config(Path(CONFIGS[0]).parent / "synthia2cityscapes_plca.yaml")
    assert tuple(synthia.data.classes) == SYNTHIA16_CLASSES
    assert synthia.train.iters == 8 * 372 and synthia.train.poly_iters == 10 * 372
    # PLCA's reference crops any window; DAFormer's re-draws source and target crops (cat_max_ratio 0.75)
    assert gta.train.cat_max_ratio == gta.train.target_cat_max_ratio == 1.0
    for name in ("gta2cityscapes_self_training", "synthia2cityscapes_self_training_plca",
                 "gta2cityscapes_daformer_mitb5"):
        daformer = load_config(Path(CONFIGS[0]).parent / f"{name}.yaml")
        assert (daformer.train.cat_max_ratio, daformer.train.target_cat_max_ratio) == (0.75, 1.0)  # never on the target
    folder = load_config(Path(CONFIGS[0]).parent / "folder_self_training.yaml")
    assert (folder.train.cat_max_ratio, folder.train.target_cat_max_ratio) == (0.75, 1.0)


def test_deeplab_v2_heads_of_the_shipped_configs():
    # PLCA's configs keep the reference's four ASPP branches; DAFormer's recipe on DeepLab-v2 uses its reduced head
    folder = Path(CONFIGS[0]).parent
    for name in ("gta2cityscapes_plca", "gta2cityscapes_source_only", "synthia2cityscapes_plca",
                 "synthia2cityscapes_source_only", "folder_plca", "folder_source_only"):
        assert load_config(folder / f"{name}.yaml").model.head == "deeplabv2", name
    for name in ("gta2cityscapes_self_training", "gta2cityscapes_self_training_plca",
                 "synthia2cityscapes_self_training", "synthia2cityscapes_self_training_plca", "folder_self_training",
                 "folder_self_training_plca"):
        config = load_config(folder / f"{name}.yaml")
        assert config.model.head == "deeplabv2_reduced", name
        assert config.model.style == ("caffe" if "cityscapes" in name else "pytorch")
    v1c = read_config_file(folder / "_base_" / "models" / "deeplabv2_r101_v1c.yaml")
    assert v1c["model"]["head"] == "deeplabv2_reduced"  # DACS / DAFormer's DeepLab-v2


def test_base_files_compose_and_the_file_overrides_its_bases(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.yaml").write_text("model: {backbone: resnet18, style: pytorch}\ntrain: {iters: 5}\n")
    (tmp_path / "base" / "data.yaml").write_text(yaml.safe_dump(MINIMAL) + "train: {iters: 6, lr: 0.5}\n")
    (tmp_path / "run.yaml").write_text("_base_: [base/model.yaml, base/data.yaml]\ntrain: {lr: 0.25}\n")
    config = load_config(tmp_path / "run.yaml", ["train.seed=3"])
    assert config.model.backbone == "resnet18" and config.data.classes == ["road", "car"]
    assert config.train.iters == 6  # the later base wins over the earlier one
    assert config.train.lr == 0.25  # the file wins over its bases
    assert config.train.seed == 3  # and the command line over everything
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("_base_: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match="nowhere.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_method_defaults_sit_below_what_the_user_gives():
    source_only = build_config(MINIMAL)
    assert source_only.plca is None and "plca" not in to_dict(source_only)  # no PLCA terms at all
    plca = build_config(MINIMAL, ["method=plca", "data.target.root=/t"])
    assert plca.plca.association.feature_weight == 0.1 and plca.plca.lsr_weight == 0.01
    given = build_config(MINIMAL, ["method=plca", "data.target.root=/t", "plca.lsr_weight=0.5"])
    assert given.plca.lsr_weight == 0.5
    self_training = build_config(MINIMAL, ["method=self_training", "data.target.root=/t"])
    assert (self_training.plca.lsr_weight, self_training.plca.association.feature_weight,
            self_training.plca.association.classifier_weight) == (0.0, 0.0, 0.0)
    assert self_training.plca.association.alpha == 0.5 and self_training.plca.lsr_threshold == 10.0
    asked = build_config(MINIMAL, ["method=self_training", "data.target.root=/t",
                                   "plca.association.feature_weight=0.2"])
    assert asked.plca.association.feature_weight == 0.2 and asked.plca.association.classifier_weight == 0.0


@pytest.mark.parametrize("override, fragment", [
    ("train.momentum=1.0", "train.momentum"),
    ("train.momentum=-0.1", "train.momentum"),
    ("train.weight_decay=-1e-4", "train.weight_decay"),
    ("train.poly_power=-1", "train.poly_power"),
    ("loss.lovasz_weight=-1", "loss.lovasz_weight"),
    ("loss.lovasz_reduction=mean", "loss.lovasz_reduction"),
    ("loss.association.feature_weight=-0.1", "loss.association.feature_weight"),
    ("train.seed=-1", "train.seed"),
    ("train.flip=1", "train.flip"),
    ("model.backbone=resnet152", "model.backbone"),
    ("model.head=fcn", "model.head"),
    ("model.style=caffe", "model.style"),  # with a MiT-like backbone below
    ("train.optimizer=adam", "train.optimizer"),
    ("device=tpu", "device"),
])
def test_values_that_cannot_be_right_are_refused(override, fragment):
    extra = ["model.backbone=resnet18"] if fragment != "model.style" else []
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        build_config(MINIMAL, extra + [override] + (["model.backbone=mit_b0"] if fragment == "model.style" else []))


def test_numbers_written_as_strings_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "train: {lr: 1e-3, weight_decay: 5e-4}\n")  # YAML reads 1e-3 as a string
    config = load_config(path)
    assert config.train.lr == pytest.approx(1e-3) and config.train.weight_decay == pytest.approx(5e-4)
    assert build_config(MINIMAL, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_a_binary_file_is_not_a_config(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="weights.pth"):
        load_config(path)


RCS = "data.rare_class_sampling."


@pytest.mark.parametrize("overrides, keys", [
    ([f"{RCS}min_pixels_ratio=0.002"], ["min_pixels", "min_pixels_ratio", "both set"]),
    ([f"{RCS}min_pixels=null"], ["min_pixels", "min_pixels_ratio", "both null"]),
    ([f"{RCS}min_crop_pixels_ratio=0.006"], ["min_crop_ratio", "min_crop_pixels_ratio", "both set"]),
    ([f"{RCS}min_crop_ratio=null"], ["min_crop_ratio", "min_crop_pixels_ratio", "both null"]),
    ([f"{RCS}min_pixels=null", f"{RCS}min_pixels_ratio=0.002"], ["min_crop_ratio multiplies", "min_pixels"]),
    ([f"{RCS}min_pixels=null", f"{RCS}min_pixels_ratio=1.5", f"{RCS}min_crop_ratio=null",
      f"{RCS}min_crop_pixels_ratio=0.006"], ["min_pixels_ratio must be in"]),
    ([f"{RCS}min_crop_ratio=null", f"{RCS}min_crop_pixels_ratio=-0.1"], ["min_crop_pixels_ratio must be in"]),
    ([f"{RCS}min_pixels=-1"], ["min_pixels must be >= 0"]),
])
def test_rare_class_thresholds_are_given_once(overrides, keys):
    with pytest.raises(ConfigError) as error:
        build_config(MINIMAL, [f"{RCS}enabled=true", *overrides])
    for key in keys:
        assert key in str(error.value)
    if "both" in keys[-1]:
        assert f"{RCS}{keys[0]} and {RCS}{keys[1]}" in str(error.value)


def test_rare_class_thresholds_absolute_relative_or_mixed():
    default = build_config(MINIMAL).data.rare_class_sampling
    assert (default.min_pixels, default.min_pixels_ratio, default.min_crop_ratio, default.min_crop_pixels_ratio) == (
        3000, None, 0.5, None)
    relative = build_config(MINIMAL, [f"{RCS}min_pixels=null", f"{RCS}min_pixels_ratio=0.00149",
                                      f"{RCS}min_crop_ratio=null", f"{RCS}min_crop_pixels_ratio=0.005723"])
    assert relative.data.rare_class_sampling.min_pixels_ratio == 0.00149
    # an absolute image threshold with a crop share is allowed (the share does not multiply min_pixels)
    build_config(MINIMAL, [f"{RCS}min_crop_ratio=null", f"{RCS}min_crop_pixels_ratio=0"])


def test_validate_only_dispatches_to_the_owners_of_the_sections():
    import inspect

    from plca.config import validate

    assert len(inspect.getsource(validate).splitlines()) < 30


def test_each_choice_list_has_one_source_that_the_key_documentation_names():
    from plca.config import Config, key_comments
    from plca.data.config_checks import ON_ERROR_CHOICES
    from plca.engine.config_checks import EVAL_MODELS
    from plca.engine.optim import NO_DECAY_RULES, OPTIMIZERS
    from plca.models.segmentor import FEATURE_SOURCES

    comments = key_comments(Config())
    for key, choices in {"train.optimizer": OPTIMIZERS, "train.no_decay": NO_DECAY_RULES,
                         "model.features": FEATURE_SOURCES, "data.on_error": ON_ERROR_CHOICES,
                         "eval.model": EVAL_MODELS}.items():
        for choice in choices:
            assert choice in comments[key], (key, choice)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_config(MINIMAL, [f"{key}=not_a_choice"])


def test_the_cli_offers_the_owners_choice_lists():
    from plca.cli import build_parser
    from plca.data.build import RUN_CHECK_LEVELS
    from plca.demo import DEMO_METHODS
    from plca.models.trained import RUN_MODELS
    from plca.tools.sweep import LAUNCHERS

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    offered = {(name, action.dest): list(action.choices) for name, command in commands.items()
               for action in command._actions if action.choices is not None}
    assert offered[("train", "data_check")] == list(RUN_CHECK_LEVELS)
    assert offered[("demo", "methods")] == list(DEMO_METHODS)
    assert offered[("sweep", "launcher")] == list(LAUNCHERS)
    assert offered[("export", "which")] == list(RUN_MODELS)


# --------------------------------------------------------------------------- PLCA's keys before the plca: section

PLCA_RUN = {**MINIMAL, "method": "plca", "data": {**MINIMAL["data"], "target": {"root": "/tgt"}}}
OLD_LOSS = {"lovasz_weight": 2.0, "lsr_weight": 0.02, "lsr_threshold": 8.0,
            "association": {"feature_weight": 0.3, "alpha": 0.25, "impl": "dense"}}
NEW_PLCA = {"lsr_weight": 0.02, "lsr_threshold": 8.0,
            "association": {"feature_weight": 0.3, "alpha": 0.25, "impl": "dense"}}


def deprecation_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "plca.config" and "deprecated" in r.getMessage()]


def old_stored(config) -> dict:
    """``to_dict`` of ``config`` as plca wrote it before the plca: section (weights 0 for source_only)."""
    data = to_dict(config)
    plca = data.pop("plca", None) or {"lsr_weight": 0.0, "lsr_threshold": 10.0, "association": {
        "feature_weight": 0.0, "classifier_weight": 0.0, "aggregate": True, "alpha": 0.5, "impl": "efficient",
        "reduction": "pooled", "similarity_dtype": "float32"}}
    data["loss"].update(plca)
    return data


@pytest.mark.parametrize("method", ["plca", "self_training"])
def test_old_loss_keys_load_as_the_plca_section_with_one_deprecation_line(method, caplog, tmp_path):
    data = {**PLCA_RUN, "method": method}
    new = build_config({**data, "loss": {"lovasz_weight": 2.0}, "plca": NEW_PLCA})
    assert deprecation_lines(caplog) == []
    old = build_config({**data, "loss": OLD_LOSS})
    assert to_dict(old) == to_dict(new)
    assert old.plca.lsr_weight == 0.02 and old.plca.lsr_threshold == 8.0 and old.loss.lovasz_weight == 2.0
    assert (old.plca.association.feature_weight, old.plca.association.alpha, old.plca.association.impl) == (
        0.3, 0.25, "dense")
    assert "association" not in to_dict(old)["loss"] and "lsr_weight" not in to_dict(old)["loss"]
    lines = deprecation_lines(caplog)
    assert len(lines) == 1
    for old_key, new_key in (("loss.lsr_weight", "plca.lsr_weight"), ("loss.lsr_threshold", "plca.lsr_threshold"),
                             ("loss.association", "plca.association")):
        assert f"{old_key} -> {new_key}" in lines[0]
    # from a file and from the command line alike
    caplog.clear()
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({**data, "loss": OLD_LOSS}))
    assert to_dict(load_config(path)) == to_dict(new)
    assert len(deprecation_lines(caplog)) == 1
    caplog.clear()
    overridden = build_config(data, ["loss.association.feature_weight=0.3", "loss.lsr_weight=0.02"])
    assert overridden.plca.association.feature_weight == 0.3 and overridden.plca.lsr_weight == 0.02
    assert len(deprecation_lines(caplog)) == 1
    assert "loss.association.feature_weight -> plca.association.feature_weight" in deprecation_lines(caplog)[0]


def test_an_old_and_a_new_key_with_different_values_are_refused():
    both = {**PLCA_RUN, "loss": {"association": {"feature_weight": 0.3}},
            "plca": {"association": {"feature_weight": 0.1}}}
    with pytest.raises(ConfigError, match=r"loss\.association\.feature_weight \(0\.3\) and "
                                          r"plca\.association\.feature_weight \(0\.1\) are both given"):
        build_config(both)
    with pytest.raises(ConfigError, match=r"loss\.lsr_weight=0\.5 and plca\.lsr_weight=0\.2 are both given"):
        build_config(PLCA_RUN, ["plca.lsr_weight=0.2", "loss.lsr_weight=0.5"])
    # the same value under both names, or an old-key override of a new-key file, is no conflict
    same = {**PLCA_RUN, "loss": {"association": {"feature_weight": 0.3}},
            "plca": {"association": {"feature_weight": 0.3, "alpha": 0.2}}}
    config = build_config(same)
    assert config.plca.association.feature_weight == 0.3 and config.plca.association.alpha == 0.2
    config = build_config({**PLCA_RUN, "plca": {"lsr_weight": 0.2}}, ["loss.lsr_weight=0.5"])
    assert config.plca.lsr_weight == 0.5


def test_old_plca_keys_of_a_source_only_config_are_checked_and_ignored(caplog):
    stored = old_stored(build_config(MINIMAL))  # every source_only run stored them (at weight 0)
    config = build_config(stored)
    assert config.plca is None and to_dict(config) == to_dict(build_config(MINIMAL))
    lines = deprecation_lines(caplog)
    assert len(lines) == 1 and "method source_only has no plca section" in lines[0]
    with pytest.raises(ConfigError, match=r"plca\.association\.alpha must be in \[0, 1\].*"
                                          r"given as loss\.association\.alpha, its old name"):
        build_config(MINIMAL, ["loss.association.alpha=2"])


@pytest.mark.parametrize("method", ["source_only", "plca", "self_training"])
def test_a_run_stored_with_the_old_keys_resumes(method, tmp_path):
    from plca.engine.run_dir import check_resume_config

    config = build_config({**PLCA_RUN, "method": method})
    stored = old_stored(config)
    assert "association" in stored["loss"] and "plca" not in stored
    assert check_resume_config(config, stored, tmp_path / "last.pt") == []
    assert to_dict(build_config(stored)) == to_dict(config)  # plca train --resume RUN_DIR, inference, export
    if method != "source_only":
        stored["loss"]["association"]["feature_weight"] = 0.5
        with pytest.raises(ConfigError, match=r"plca\.association\.feature_weight"):
            check_resume_config(config, stored, tmp_path / "last.pt")
