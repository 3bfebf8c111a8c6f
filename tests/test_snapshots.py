"""Snapshots of a 2D network during training (the frames of an animation)."""
import numpy as np
import pytest
from helpers import flat
from typer.testing import CliRunner

from cli.app import app
from experiments.checkpoint import read_snapshot_arrays
from experiments.config import TrainConfig, resolve
from experiments.runner import build_network, load_data, run
from mlp.network import Network
from mlp.train import Callback

runner = CliRunner()


def test_snapshots_are_the_network_every_n_epochs_from_the_start(tmp_path):
    result = runner.invoke(app, ["train", "--data", "moons", "--hidden", "8", "--epochs", "10",
                                 "--snapshot-every", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "snapshots.npz", allow_pickle=False) as data:
        frames = read_snapshot_arrays(data)
    assert [epoch for epoch, _ in frames] == [0, 4, 8]
    final = Network.load(tmp_path / "model.npz")
    assert set(frames[0][1]) == set(final.params)
    # the first frame is the untrained network, as seed 0 initialises it
    config = resolve(TrainConfig(data="moons", hidden=[8], epochs=10))
    untrained = build_network(config, load_data(config))
    for name, value in untrained.params.items():        # kept as float32, half the file
        assert frames[0][1][name].dtype == np.float32
        np.testing.assert_array_equal(frames[0][1][name], value.astype(np.float32))
    assert not np.array_equal(frames[-1][1]["0.linear.W"], final.params["0.linear.W"])


def test_a_resumed_run_keeps_the_snapshots_taken_before_the_kill(tmp_path):
    class KillAt(Callback):
        def on_epoch_end(self, record):
            if record["epoch"] == 5:
                raise KeyboardInterrupt

    config = dict(data="moons", hidden=[8], epochs=9, batch_size=16, optimizer="adam",
                  lr=0.01, checkpoint_every=1, snapshot_every=2)
    whole = run(TrainConfig(**config))
    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(**config), callback=KillAt(), checkpoint=tmp_path / "checkpoint.npz")
    resumed = run(TrainConfig(**config), checkpoint=tmp_path / "checkpoint.npz")
    assert [e for e, _ in resumed.result.snapshots] == [0, 2, 4, 6, 8]
    for (_, a), (_, b) in zip(resumed.result.snapshots, whole.result.snapshots, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_a_sweep_keeps_each_trials_snapshots(tmp_path):
    result = runner.invoke(app, ["sweep", "--grid", "hidden=3,6", "--seeds", "0", "--epochs", "6",
                                 "--data", "moons", "--snapshot-every", "3", "--workers", "0",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "snapshots").glob("*.npz"))
    assert len(files) == 2
    with np.load(files[0], allow_pickle=False) as data:
        assert data["epochs"].tolist() == [0, 3, 6]


def test_snapshots_of_a_convnet_are_a_usage_error(tmp_path):
    result = runner.invoke(app, ["train", "--data", "cifar10", "--snapshot-every", "1",
                                 "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--snapshot-every" in flat(result.output)
    assert "images" in flat(result.output) and not (tmp_path / "run").exists()
