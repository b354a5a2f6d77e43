"""Help that teaches: every command describes itself, shows an example and its defaults; `plca config`."""

import pytest

from plca.cli import COMMANDS, build_parser, main


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_has_a_description_an_example_and_its_defaults(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"plca {name}" in text.split("examples:")[1]
    summary, paragraph, _ = COMMANDS[name]
    assert paragraph.split()[0] in text
    parser = subparsers()[name]
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, [], "==SUPPRESS=="):
            assert "default" in (parser.formatter_class(prog="x")._get_help_string(action) or ""), action.dest


def test_top_level_help_lists_commands_without_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and all(name in text for name in COMMANDS)


def test_train_help_says_where_the_keys_are_documented(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "plca config --show" in capsys.readouterr().out


def test_config_show_prints_every_key_with_its_meaning(capsys, tmp_path):
    assert main(["config", "--show", "configs/gta2cityscapes_self_training_plca.yaml", "train.lr=1e-4"]) == 0
    text = capsys.readouterr().out
    assert "lr: 0.0001  # base learning rate" in text
    assert "feature_weight: 0.1  # cos association" in text
    assert "threshold: 0.968  # confidence" in text
    import yaml

    assert yaml.safe_load(text)["train"]["lr"] == 1e-4  # the output is valid YAML
