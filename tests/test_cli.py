"""`nnx train` and `nnx gradcheck` end to end through Typer's CliRunner."""
import json

import numpy as np
import pandas as pd
import pytest
from helpers import flat
from typer.testing import CliRunner

from cli.app import app
from mlp.network import Network

runner = CliRunner()
QUICK = ["--data", "spiral", "--hidden", "20", "--epochs", "30"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])



def test_train_writes_model_metrics_and_config(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", *QUICK, "--val-size", "0.2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "Run summary" in result.output and "epoch 30/30" in result.output
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                                     "lr", "seconds"]
    assert metrics["epoch"].tolist() == list(range(1, 31))
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["hidden"] == [20] and record["config"]["seed"] == 0
    assert record["config"]["lr"] == 1.0 and record["status"] == "ok"
    net = Network.load(out / "model.npz")
    assert net.metadata["data"] == "spiral"


def test_the_nnx_settings_a_run_ran_with_are_recorded(tmp_path, monkeypatch):
    """config.json's environment names the NNX_ variables that were set (NNX_KERNELS=
    reference rounds otherwise than the fast kernels), and says "none" when none was."""
    for name in ("NNX_KERNELS", "NNX_CONV_ALGORITHM", "NNX_FUSION", "NNX_THREADS", "NNX_SHARDS",
                 "NNX_MALLOC_TUNING"):
        monkeypatch.delenv(name, raising=False)
    assert invoke("train", *QUICK, "--out", tmp_path / "plain").exit_code == 0
    monkeypatch.setenv("NNX_FUSION", "off")
    monkeypatch.setenv("NNX_KERNELS", "reference")
    assert invoke("train", *QUICK, "--out", tmp_path / "set").exit_code == 0
    environment = {name: json.loads((tmp_path / name / "config.json").read_text())["environment"]
                   for name in ("plain", "set")}
    assert environment["plain"]["nnx_settings"] == "none"
    assert environment["set"]["nnx_settings"] == "NNX_KERNELS=reference NNX_FUSION=off"


@pytest.mark.numerics
def test_rerun_command_in_config_json_reproduces_the_run_bit_for_bit(tmp_path):
    assert invoke("train", *QUICK, "--optimizer", "adam", "--batch-size", "32",
                  "--out", tmp_path / "a").exit_code == 0
    command = json.loads((tmp_path / "a" / "config.json").read_text())["command"].split()
    assert command[:2] == ["nnx", "train"]
    assert invoke(*command[1:], "--out", tmp_path / "b").exit_code == 0
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv").drop(columns="seconds") for d in "ab")
    pd.testing.assert_frame_equal(a, b)
    X = np.random.default_rng(0).standard_normal((10, 2))
    np.testing.assert_array_equal(Network.load(tmp_path / "a" / "model.npz").scores(X),
                                  Network.load(tmp_path / "b" / "model.npz").scores(X))


def test_train_refuses_to_overwrite_a_run_unless_told(tmp_path):
    assert invoke("train", *QUICK, "--out", tmp_path).exit_code == 0
    before = (tmp_path / "model.npz").read_bytes()
    result = invoke("train", *QUICK, "--seed", "1", "--out", tmp_path)
    assert result.exit_code == 2 and "--overwrite" in flat(result.output)
    assert (tmp_path / "model.npz").read_bytes() == before
    assert invoke("train", *QUICK, "--seed", "1", "--out", tmp_path, "--overwrite").exit_code == 0
    assert (tmp_path / "model.npz").read_bytes() != before


@pytest.mark.parametrize("args, option", [
    (["--hidden", "0"], "--hidden"),
    (["--hidden", "-5"], "--hidden"),
    (["--hidden", "10,abc"], "--hidden"),
    (["--hidden", ""], "--hidden"),
    (["--reg", "-1"], "--reg"),
    (["--data", "mnist"], "--data"),
    (["--optimizer", "lbfgs"], "--optimizer"),
    (["--lr", "0"], "--lr"),
    (["--dropout", "1"], "--dropout"),
    (["--epochs", "0"], "--epochs"),
    (["--activation", "swish"], "--activation"),
    (["--val-size", "1.5"], "--val-size"),
])
def test_bad_options_get_one_line_naming_the_option_and_exit_2(tmp_path, args, option):
    result = invoke("train", *QUICK, *args, "--out", tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in flat(result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    result = invoke("train", *QUICK, "--out", target)
    assert result.exit_code == 2 and "is a file" in flat(result.output)
    assert target.read_text() == "keep me"


def test_a_diverging_run_exits_1_and_still_writes_its_record(tmp_path):
    result = invoke("train", *QUICK, "--lr", "1e6", "--epochs", "300", "--out", tmp_path)
    assert result.exit_code == 1 and "diverged" in result.output
    assert json.loads((tmp_path / "config.json").read_text())["status"] == "diverged"


def test_gradcheck_prints_a_table_and_passes():
    result = invoke("gradcheck")
    assert result.exit_code == 0, result.output
    assert "max relative error" in result.output and "FAIL" not in result.output
    assert "softmax cross-entropy" in result.output and "multiclass SVM hinge" in result.output


def test_gradcheck_exits_non_zero_when_a_check_fails(monkeypatch):
    import mlp.layers
    monkeypatch.setattr(mlp.layers.Tanh, "backward", lambda self, dout: dout * (1 - self.out))
    result = invoke("gradcheck")
    assert result.exit_code == 1 and "Tanh" in result.output


def test_version_and_help_mention_the_l2_convention():
    assert invoke("--version").output.startswith("nnx ")
    text = flat(invoke("train", "--help").output)
    assert "0.5 * reg * sum(W**2)" in text


def test_lr_default_follows_the_optimizer_and_the_data_set():
    from experiments.config import TrainConfig, resolve
    assert resolve(TrainConfig()).lr == 1.0                           # the notes' spiral run
    assert resolve(TrainConfig(optimizer="adam")).lr == 1e-3          # Adam's own, not 1.0
    image = resolve(TrainConfig(data="cifar10"))
    assert (image.optimizer, image.lr, image.schedule) == ("nesterov", 0.02, "cosine")
    assert resolve(TrainConfig(data="cifar10", optimizer="adadelta")).lr == 1.0
    assert resolve(TrainConfig(data="cifar10", lr=0.1)).lr == 0.1
