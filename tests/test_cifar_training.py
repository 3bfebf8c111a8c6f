"""ConvNets and MLPs on CIFAR-10 end to end, on a tiny stand-in in the official layout."""
import json

import numpy as np
import pytest
from helpers import KillAt, cifar_dir, flat, without_seconds
from typer.testing import CliRunner

from cli.app import app
from experiments.config import TrainConfig
from experiments.evaluate import evaluate
from experiments.files import read_history_csv
from experiments.runner import run
from mlp.network import Network

runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return cifar_dir(tmp_path_factory.mktemp("cifar"), seed=1, per_batch=24)


def test_train_convnetjs_with_augmentation_then_evaluate(data_dir, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", "cifar10", "--arch", "convnetjs", "--augment",
                                 "--data-dir", str(data_dir), "--val-size", "20", "--epochs", "2",
                                 "--batch-size", "25", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["optimizer"] == "nesterov" and record["config"]["dtype"] == "float32"
    # at batch 25, trained in shards of 12 and 13 (mlp/shards.py): layers 0 and 6 under 40
    # MFLOP (32 and 17), im2col unmeasured; layer 3 (53 MFLOP) measured against im2col over
    # 2x2 tiles and Winograd F(2x2, 5x5) and F(4x4, 5x5), and any may win
    algorithms = record["conv_algorithms"]
    listed = ",".join(f"{layer}:{name}" for layer, name in algorithms.items())
    assert f"conv algorithms {listed}" in flat(result.output)    # the run summary says them too
    assert algorithms.pop("3") in ("im2col", "im2col2", "winograd2", "winograd4")
    assert algorithms == {"0": "im2col", "6": "im2col"}
    assert (out / "checkpoint.npz").exists()
    net = Network.load(out / "model.npz")
    assert net.metadata["arch"].startswith("conv16x5") and len(net.metadata["mean"]) == 3
    assert all(p.dtype == np.float32 for p in net.params.values())
    plot = tmp_path / "confusion.png"
    result = runner.invoke(app, ["evaluate", str(out), "--data", "cifar10", "--split", "test",
                                 "--data-dir", str(data_dir), "--flip-average", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    expected = evaluate(net, "test", str(data_dir), flip_average=True)
    assert f"accuracy {expected.accuracy:.2%}" in result.output and "(flip-averaged)" in result.output
    assert expected.count == 24 and plot.stat().st_size > 0


def test_mlp_on_flattened_cifar(data_dir):
    outcome = run(TrainConfig(data="cifar10", hidden=[32], data_dir=str(data_dir), val_size=20,
                              epochs=2, batch_size=20, optimizer="adam", lr=1e-3))
    assert outcome.status == "ok" and outcome.network.input_shape == (3, 32, 32)
    assert outcome.config.arch is None and outcome.network.layers[0].in_features == 3072


@pytest.mark.numerics
def test_a_killed_convnet_run_resumes_to_the_same_result(data_dir, tmp_path):
    config = dict(data="cifar10", arch="conv8x3-bn-pool2-conv8x3-bn-pool2-fc10", augment=True,
                  data_dir=str(data_dir), val_size=20, epochs=4, batch_size=25, optimizer="nesterov",
                  lr=0.05, schedule="linear", warmup=1, warmup_from=0.2, label_smoothing=0.1, seed=2,
                  weight_decay=5e-4, ema_decay=0.9, ema_every=2, ema_start=1, flip="alternating",
                  pad="reflect")
    whole = run(TrainConfig(**config))
    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(**config), callback=KillAt(2), checkpoint=tmp_path / "checkpoint.npz")
    resumed = run(TrainConfig(**config), checkpoint=tmp_path / "checkpoint.npz")
    assert without_seconds(resumed.result.history) == without_seconds(whole.result.history)
    for name, value in whole.network.buffers.items():       # BatchNorm running statistics too
        np.testing.assert_array_equal(resumed.network.buffers[name], value)


def test_a_resumed_run_computes_with_the_recorded_conv_algorithm(data_dir, tmp_path, monkeypatch):
    """The algorithm measured at the start of a run is recorded in its checkpoint; the
    resumed run keeps it even where a fresh measurement would choose another (Winograd
    and im2col round differently), so it ends with the uninterrupted run's numbers."""
    from mlp.kernels import conv as conv_kernels
    measured = {"choice": "winograd4"}
    monkeypatch.setattr(conv_kernels, "choose", lambda *args, **kwargs: measured["choice"])
    config = TrainConfig(data="cifar10", arch="conv8x3-bn-pool2-conv8x3-bn-pool2-fc10",
                         data_dir=str(data_dir), val_size=20, epochs=3, batch_size=25,
                         optimizer="nesterov", lr=0.05, seed=2)
    whole = run(config)
    assert whole.network.conv_algorithms() == {"0": "winograd4", "4": "winograd4"}
    with pytest.raises(KeyboardInterrupt):
        run(config, callback=KillAt(2), checkpoint=tmp_path / "checkpoint.npz")  # epoch 1 checkpointed
    measured["choice"] = "im2col"          # what another process might measure
    resumed = run(config, checkpoint=tmp_path / "checkpoint.npz")
    assert resumed.network.conv_algorithms() == whole.network.conv_algorithms()
    assert without_seconds(resumed.result.history) == without_seconds(whole.result.history)
    for name, value in whole.network.params.items():
        np.testing.assert_array_equal(resumed.network.params[name], value)
    other = run(config)                    # im2col from the start: other numbers
    assert other.network.conv_algorithms() == {"0": "im2col", "4": "im2col"}
    assert not np.array_equal(other.network.params["0.conv2d.W"], whole.network.params["0.conv2d.W"])


def test_the_recorded_command_pins_the_chosen_conv_algorithms_and_reruns_the_same_numbers(
        data_dir, tmp_path, monkeypatch):
    """A run's command in config.json carries --conv-algorithms with what its layers chose:
    rerun where a fresh measurement would choose otherwise (another process, another
    machine), it computes with the run's algorithms and gives its numbers bit for bit;
    the config keeps what was asked (auto)."""
    import shlex

    from mlp.kernels import conv as conv_kernels
    measured = {"choice": "winograd2"}
    monkeypatch.setattr(conv_kernels, "choose", lambda *args, **kwargs: measured["choice"])
    arch = "conv8x3-pool2-conv8x3-pool2-fc10"

    def train(args, out):
        result = runner.invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 0, result.output
        return json.loads((out / "config.json").read_text()), (out / "metrics.csv").read_text()

    first, curve = train(["train", "--data", "cifar10", "--arch", arch, "--data-dir", str(data_dir),
                          "--val-size", "20", "--epochs", "2", "--batch-size", "25"], tmp_path / "first")
    assert first["conv_algorithms"] == {"0": "winograd2", "3": "winograd2"}
    assert first["config"]["conv_algorithms"] == "auto"
    command = shlex.split(first["command"])
    assert command[:2] == ["nnx", "train"]
    assert command[command.index("--conv-algorithms") + 1] == "0:winograd2,3:winograd2"
    measured["choice"] = "im2col"                      # what a fresh measurement says now
    assert "--out" not in command                     # where it goes is the rerun's to say
    again, again_curve = train(command[1:], tmp_path / "again")
    assert again["conv_algorithms"] == first["conv_algorithms"]
    assert without_seconds(read_history_csv(again_curve)) == without_seconds(read_history_csv(curve))
    auto = command[1:]
    auto[auto.index("--conv-algorithms") + 1] = "auto"
    other, _ = train(auto, tmp_path / "other")          # the control: measured afresh
    assert other["conv_algorithms"] == {"0": "im2col", "3": "im2col"}
    pinned, _ = train([*auto[:auto.index("--conv-algorithms")], "--conv-algorithms", "3:im2col2",
                       *auto[auto.index("--conv-algorithms") + 2:]], tmp_path / "pinned")
    assert pinned["conv_algorithms"] == {"0": "im2col", "3": "im2col2"}   # the unpinned one measured


@pytest.mark.parametrize("arch, pins, words", [
    ("conv8x3-pool2-fc10", "1:im2col", "layer 1 is a maxpool2d layer; this network's conv layers are 0"),
    ("conv8x3-pool2-fc10", "7:im2col", "layer 7 is no layer"),
    ("conv8x7-pool2-fc10", "0:winograd4", "layer 0: conv algorithm 'winograd4' does not apply to a 7x7"),
])
def test_a_pin_that_fits_no_conv_layer_is_a_usage_error(data_dir, tmp_path, arch, pins, words):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", "cifar10", "--arch", arch, "--data-dir", str(data_dir),
                                 "--val-size", "20", "--epochs", "1", "--conv-algorithms", pins,
                                 "--out", str(out)])
    text = flat(result.output)
    assert result.exit_code == 2 and "Invalid value for '--conv-algorithms'" in text and words in text, text
    assert "Traceback" not in result.output and not (out / "config.json").exists()   # free to run again


def test_a_bad_architecture_is_a_usage_error_before_any_data_is_read(tmp_path):
    result = runner.invoke(app, ["train", "--data", "cifar10", "--arch", "conv16x5-blah",
                                 "--data-dir", str(tmp_path), "--epochs", "1"])
    assert result.exit_code == 2 and "Invalid value for '--arch'" in flat(result.output)


def test_missing_cifar_data_says_what_to_run(tmp_path):
    result = runner.invoke(app, ["train", "--data", "cifar10", "--data-dir", str(tmp_path),
                                 "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "nnx data download cifar10" in flat(result.output)
    assert "Traceback" not in result.output


def test_a_shard_worker_lost_mid_run_stops_it_in_one_line_and_resume_finishes_it(data_dir, tmp_path,
                                                                                  monkeypatch):
    """A worker of a sharded step that dies (the kernel's OOM killer, say) ends the run
    with one line that says so, the last checkpoint kept; --resume finishes the run."""
    from mlp.shards import ShardedStep, ShardFailure
    real, calls = ShardedStep.loss_and_scores, []

    def failing(self, X, y):
        calls.append(1)
        if len(calls) == 5:        # the second epoch's
            raise ShardFailure("a shard's worker process ended unexpectedly")
        return real(self, X, y)

    monkeypatch.setattr(ShardedStep, "loss_and_scores", failing)
    out = tmp_path / "run"
    args = ["train", "--data", "cifar10", "--arch", "conv8x3-bn-pool2-fc10", "--data-dir", str(data_dir),
            "--val-size", "20", "--epochs", "3", "--batch-size", "25", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("epoch 1/3") and len(lines) == 2      # the first epoch's line, then
    line = lines[1]
    assert line.startswith("Error: training stopped: a shard's worker process ended unexpectedly")
    assert "its last checkpoint is kept: continue it with --resume" in line
    monkeypatch.setattr(ShardedStep, "loss_and_scores", real)
    result = runner.invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3     # header, three epochs
