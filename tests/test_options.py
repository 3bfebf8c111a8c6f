"""One definition per option: the config's fields make the command-line options of
`nnx train` and `nnx sweep`, and one parser and one formatter per field serve the
command line, --set, --grid, sweep files, config.json and the rerun command."""
import json
import re
import shlex
from pathlib import Path

import pytest
from helpers import flat
from typer.testing import CliRunner

from cli.app import app
from experiments.config import OPTIONS, RENAMED, TrainConfig, resolve
from experiments.errors import ConfigError
from experiments.runner import rerun_command
from experiments.sweep import build_sweep, expand, parse_fixed, parse_grid, sweep_from_toml

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

# One value per field that differs from its default (and from None).
SAMPLE = {"recipe": None, "bn_decay": 0.5, "bn_eps": 1e-3, "bn_scale": False, "bn_bias_lr": 8.0,
          "whiten_bias_epochs": 2, "data": "moons", "points": 37, "classes": 2, "noise": 0.15,
          "val_size": 0.25,
          "data_seed": 4, "data_dir": "/tmp/nowhere", "limit": 300, "augment": True,
          "arch": None, "conv_algorithms": "0:im2col2,3:winograd4", "hidden": [16, 8],
          "activation": "tanh", "init": "xavier",
          "weight_scale": 0.02, "dropout": 0.1, "loss": "softmax", "reg": 0.003,
          "label_smoothing": 0.05, "dtype": "float32", "optimizer": "adam", "lr": 0.004,
          "momentum": 0.8, "weight_decay": 0.001, "schedule": "step", "warmup_from": 0.2,
          "ema_decay": 0.9, "ema_every": 3, "ema_start": 1.0, "flip": "alternating", "pad": "reflect",
          "shift": 1, "warmup_share": 0.3, "step_size": 3, "lr_decay": 0.5, "warmup": 1.5,
          "min_lr": 1e-4, "epochs": 7, "iterations": 90, "batch_size": 16, "patience": 4,
          "time_budget": 90.0, "seed": 11, "checkpoint_every": 2, "snapshot_every": 5}


def test_the_sample_covers_every_option():
    assert set(SAMPLE) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_value_is_written_as_text_its_parser_reads_back(name):
    value = {**SAMPLE, "arch": "conv8x3-pool2-fc10", "recipe": "airbench94"}[name]
    option = OPTIONS[name]
    assert option.parse(name, option.format(value)) == value


def test_the_rerun_command_parses_back_to_the_same_config():
    """Every field through the real command line: the rerun command's words, given
    to nnx train's own options, rebuild the config exactly."""
    from cli.options import config_from_options
    config = TrainConfig(**SAMPLE)
    words = shlex.split(rerun_command(config))
    assert words[:2] == ["nnx", "train"] and "--hidden" in words
    assert words[words.index("--hidden") + 1] == "16x8"                 # as results.csv writes it
    captured = {}

    import cli.app
    original = cli.app.resolve
    try:                         # stop train() right after it has parsed its options
        def capture(parsed):
            captured["config"] = parsed
            raise ConfigError("data", "captured")
        cli.app.resolve = capture
        runner.invoke(app, words[1:])
    finally:
        cli.app.resolve = original
    assert captured["config"] == config
    assert config_from_options({"hidden": "16x8", "augment": True}).hidden == [16, 8]


def test_a_duration_is_one_syntax_in_train_set_and_grid():
    assert parse_fixed(["time_budget=90s"]) == {"time_budget": 90.0}
    assert parse_grid(["time-budget=90s,2m"]) == {"time_budget": [90.0, 120.0]}
    sweep = build_sweep(["hidden=8"], "0", fixed={"time_budget": 1.5 * 3600})
    assert expand(sweep)[0].config.time_budget == 5400.0


def test_hidden_is_one_syntax_everywhere():
    assert parse_fixed(["hidden=64x64"]) == {"hidden": [64, 64]}
    assert parse_grid(["hidden=64x64,128"]) == {"hidden": [[64, 64], [128]]}
    with pytest.raises(ConfigError, match="the same run.*64x64"):
        expand(build_sweep(["hidden=64,64"], "0"))                      # two trials of [64]


def test_val_size_is_a_fraction_or_a_count_for_every_data_set():
    assert resolve(TrainConfig()).val_size == 0
    assert resolve(TrainConfig(data="cifar10")).val_size == 5000
    with pytest.raises(ConfigError, match="below 1"):
        resolve(TrainConfig(val_size=1.0))
    assert OPTIONS["val_size"].parse("val_size", "5000") == 5000
    assert OPTIONS["val_size"].parse("val_size", "0.1") == 0.1


def test_old_option_names_still_read_where_users_files_hold_them(tmp_path):
    """config.json of older runs, model files and sweep.toml say model, val_fraction,
    gamma; old rerun commands say --model, --val-fraction, --gamma."""
    old = {"model": "convnetjs", "data": "cifar10", "val_fraction": 0.0, "val_size": 5000,
           "gamma": 0.5, "extra": {}}
    config = TrainConfig.from_dict(old)
    assert (config.arch, config.val_size, config.lr_decay) == ("convnetjs", 5000, 0.5)
    sweep = sweep_from_toml('[fixed]\nval_fraction = 0.2\nepochs = 5\n[grid]\nhidden = ["3", "6"]\n')
    assert sweep.fixed["val_size"] == 0.2
    result = runner.invoke(app, ["train", "--hidden", "4", "--epochs", "2", "--val-fraction", "0.2",
                                 "--gamma", "0.5", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (stored["val_size"], stored["lr_decay"]) == (0.2, 0.5)
    both = runner.invoke(app, ["train", "--val-size", "0.1", "--val-fraction", "0.2"])
    assert both.exit_code == 2 and "old name of --val-size" in flat(both.output)
    assert set(RENAMED.values()) <= set(OPTIONS)


def test_every_train_option_is_also_a_fixed_option_of_sweep():
    train_help = flat(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output)
    sweep_help = flat(runner.invoke(app, ["sweep", "--help"], env={"COLUMNS": "250"}).output)
    for name in OPTIONS:
        flag = "--" + name.replace("_", "-")
        assert flag in train_help and flag in sweep_help, flag


def test_a_fixed_option_and_its_set_twin_are_one_thing(tmp_path):
    result = runner.invoke(app, ["sweep", "--epochs", "5", "--set", "epochs=6", "--dry-run"])
    assert result.exit_code == 2 and "fixed twice" in flat(result.output)
    result = runner.invoke(app, ["sweep", "--grid", "hidden=3", "--seeds", "0", "--epochs", "5",
                                 "--time-budget", "90s", "--dry-run", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "time_budget=90.0" in flat(result.output)


def test_cli_restates_no_option_of_the_config():
    """No module under cli/ defines a flag of a config field by hand."""
    flags = {"--" + name.replace("_", "-") for name in OPTIONS}
    for path in (ROOT / "cli").glob("*.py"):
        text = path.read_text()
        declared = set(re.findall(r'typer\.Option\([^)]*?"(--[a-z-]+)"', text, re.S))
        declared |= {"--" + name.replace("_", "-")
                     for name in re.findall(r"^\s+(\w+):[^=\n]*=\s*typer\.Option\(", text, re.M)}
        assert not declared & flags, f"{path.name} restates {sorted(declared & flags)}"


def test_conv_algorithm_pins_resolve_to_one_spelling_and_need_a_convnet():
    """Pins are read as given (spaces, capitals) and stored in the one spelling a run's
    command writes; on cifar10 the default ConvNet takes them, --hidden refuses them."""
    resolved = resolve(TrainConfig(data="cifar10", conv_algorithms=" 3: WINOGRAD4 , 0:im2col2"))
    assert resolved.arch == "convnetjs" and resolved.conv_algorithms == "3:winograd4,0:im2col2"
    assert resolve(TrainConfig(data="cifar10", conv_algorithms="AUTO")).conv_algorithms == "auto"
    with pytest.raises(ConfigError, match="this run trains an MLP"):
        resolve(TrainConfig(data="cifar10", hidden=[8], conv_algorithms="0:im2col"))
