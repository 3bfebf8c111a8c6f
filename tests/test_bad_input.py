"""Bad input to every command: one line naming the problem, exit 2 for a bad option
(usage), 1 for a run-time failure (a missing or corrupt file), never a traceback,
and nothing left behind that blocks a re-run."""
import json
import os
import shutil

import numpy as np
import pytest
from helpers import flat
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished run, a finished sweep, and damaged copies of them."""
    root = tmp_path_factory.mktemp("bad")
    assert runner.invoke(app, ["train", "--hidden", "8", "--epochs", "5", "--out",
                               str(root / "run")]).exit_code == 0
    assert runner.invoke(app, ["sweep", "--grid", "hidden=3,6", "--seeds", "0-1", "--epochs", "5",
                               "--workers", "0", "--out", str(root / "sweep")]).exit_code == 0
    (root / "afile").write_text("x")
    damage = {"empty": b"", "binary": bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8)),
              "wrong-header": b"a,b,c\n1,2,3\n"}
    for name, content in damage.items():
        shutil.copytree(root / "sweep", root / f"sweep-{name}")
        (root / f"sweep-{name}" / "results.csv").write_bytes(content)
    shutil.copytree(root / "sweep", root / "sweep-long-row")
    with open(root / "sweep-long-row" / "results.csv", "a") as f:
        f.write(",".join(["x"] * 500) + "\n")
    shutil.copytree(root / "run", root / "run-garbage-metrics")
    (root / "run-garbage-metrics" / "metrics.csv").write_text("hello\nworld\n")
    (root / "binary.toml").write_bytes(damage["binary"][:200])
    (root / "not-a-model.npz").write_text("nope")
    return root


FILE_PARENT = "is a file, not a directory"
CASES = [
    # sizes that cannot fit in memory: refused before anything is written
    (["train", "--hidden", "1000000000", "--out", "{root}/huge"], 2, "--hidden", "memory"),
    (["train", "--hidden", "100000,100000", "--out", "{root}/huge"], 2, "--hidden", "memory"),
    (["train", "--points", "1000000000", "--out", "{root}/huge"], 2, "--points", "memory"),
    (["train", "--data", "cifar10", "--arch", "conv100000x3-fc10", "--out", "{root}/huge"], 2,
     "--arch", "memory"),
    (["sweep", "--grid", "hidden=1000000000", "--dry-run"], 2, "--grid hidden", "memory"),
    # output paths that cannot be created
    (["train", "--hidden", "8", "--out", "{root}/afile/sub"], 2, "--out", "cannot create"),
    (["train", "--hidden", "8", "--out", "/proc/nnx-run"], 2, "--out", "cannot"),
    (["sweep", "--grid", "hidden=3", "--epochs", "2", "--out", "{root}/afile/sub"], 2, "--out",
     "cannot create"),
    (["sweep", "--grid", "hidden=3", "--epochs", "2", "--out", "/proc/nnx-sweep"], 2, "--out", "cannot"),
    (["evaluate", "{root}/run", "--plot", "{root}/afile/c.png"], 2, "--plot", FILE_PARENT),
    (["evaluate", "{root}/run", "--plot", "/proc/c.png"], 2, "--plot", "cannot"),
    (["plot-boundary", "{root}/run", "--out", "{root}/afile/b.png"], 2, "--out", FILE_PARENT),
    (["plot-boundary", "{root}/run", "--out", "/proc/b.png"], 2, "--out", "cannot"),
    (["plot-curves", "{root}/sweep", "--out", "{root}/afile/c.png"], 2, "--out", FILE_PARENT),
    (["plot-variance", "{root}/sweep", "--out", "/proc/v.png"], 2, "--out", "cannot"),
    (["plot-sweep", "{root}/sweep", "--out", "{root}/afile/h.png"], 2, "--out", FILE_PARENT),
    (["reproduce", "cs231n", "--quick", "--out", "{root}/afile/x"], 2, "--out", "cannot create"),
    (["reproduce", "cs231n", "--quick", "--out", "/proc/nnx-x"], 2, "--out", "cannot"),
    # unknown column names: usage errors
    (["plot-boundary", "{root}/sweep", "--rows", "nope"], 2, "--rows", "'nope' is not an option"),
    (["plot-variance", "{root}/sweep", "--metric", "nope"], 2, "--metric", "not a metric column"),
    (["plot-variance", "{root}/sweep", "--x", "nope"], 2, "--x", "'nope' is not an option"),
    (["plot-sweep", "{root}/sweep", "--metric", "nope"], 2, "--metric", "not a metric column"),
    (["plot-sweep", "{root}/sweep", "--x", "final_train_acc"], 2, "--x", "is not an option"),
    # non-finite or absurd values
    (["plot-boundary", "{root}/run", "--margin", "inf"], 2, "--margin", ""),
    (["plot-boundary", "{root}/run", "--margin", "nan"], 2, "--margin", ""),
    (["plot-boundary", "{root}/run", "--resolution", "1000000000000"], 2, "--resolution", ""),
    (["gradcheck", "--seed", "-1"], 2, "--seed", ">= 0"),
    (["train", "--epochs", "1e23"], 2, "--epochs", "not a whole number"),
    (["train", "--epochs", "100000000000"], 2, "--epochs", "<="),
    (["train", "--lr", "inf"], 2, "--lr", "finite"),
    (["train", "--lr", "nan"], 2, "--lr", "finite"),
    # conv algorithm pins, refused before any data is read
    (["train", "--data", "cifar10", "--conv-algorithms", "0:fft"], 2, "--conv-algorithms",
     "'fft' is not one of im2col, im2col2, winograd2, winograd4"),
    (["train", "--data", "cifar10", "--conv-algorithms", "0=im2col"], 2, "--conv-algorithms",
     "'0=im2col' is not LAYER:ALGORITHM"),
    (["train", "--data", "cifar10", "--conv-algorithms", "0:im2col,0:im2col2"], 2, "--conv-algorithms",
     "layer 0 is pinned twice"),
    (["train", "--conv-algorithms", "0:im2col"], 2, "--conv-algorithms", "this run trains an MLP"),
    (["sweep", "--seeds", "0-99999999999", "--dry-run"], 2, "--seeds", "more than"),
    # files that are not what they should be: run-time failures naming the file
    (["sweep", "--config", "{root}/binary.toml"], 2, "--config", "not a text file"),
    (["evaluate", "{root}/not-a-model.npz"], 1, "", "not an nnx model file"),
    (["plot-curves", "{root}/run-garbage-metrics"], 1, "", "metrics.csv is not a learning curve"),
]
for damaged in ("empty", "binary", "wrong-header", "long-row"):
    for command in ("plot-boundary", "plot-variance", "plot-curves", "plot-sweep"):
        CASES.append(([command, f"{{root}}/sweep-{damaged}"], 1, "", "results.csv"))


@pytest.mark.parametrize("args, code, option, words", CASES,
                         ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_gets_one_line_and_the_right_exit_code(made, args, code, option, words):
    args = [a.format(root=made) for a in args]
    result = runner.invoke(app, args)
    text = flat(result.output)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    if code == 2:
        assert f"Invalid value for '{option}'" in text, text
    else:
        assert text.startswith("Error:") or "Error: " in text, text
    assert words in text, text
    assert not (made / "huge").exists()


def test_a_run_that_fails_before_its_first_checkpoint_can_be_run_again(tmp_path):
    """A missing data set is found only when the run starts: its config.json must not
    be left saying "running", which would make the directory refuse a re-run."""
    out = tmp_path / "run"
    args = ["train", "--data", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--epochs", "1",
            "--out", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 1 and "nnx data download" in flat(first.output)
    assert not (out / "config.json").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already holds a run" not in flat(again.output)


def test_a_model_file_whose_config_does_not_fit_names_the_file_and_the_field(tmp_path, made):
    from mlp.network import Network
    net = Network.load(made / "run" / "model.npz")
    net.metadata["config"]["points"] = -3
    net.save(tmp_path / "bad-config.npz")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "bad-config.npz")])
    text = flat(result.output)
    assert result.exit_code == 1 and "bad-config.npz" in text and "points" in text, text
    net = Network.load(made / "run" / "model.npz")
    net.metadata["config"]["data"] = "cifar10"
    net.metadata["config"]["data_dir"] = str(tmp_path)
    net.metadata["data"] = "cifar10"
    net.save(tmp_path / "wrong-data.npz")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "wrong-data.npz"), "--split", "val"])
    assert result.exit_code == 1 and "wrong-data.npz" in flat(result.output)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = runner.invoke(app, ["train", "--epochs", "2", "--out", str(locked / "run")])
    assert result.exit_code == 2 and "--out" in flat(result.output)


def test_config_json_of_a_refused_run_is_untouched(made):
    before = json.loads((made / "run" / "config.json").read_text())
    result = runner.invoke(app, ["train", "--epochs", "2", "--out", str(made / "run")])
    assert result.exit_code == 2
    assert json.loads((made / "run" / "config.json").read_text()) == before


@pytest.mark.parametrize("values", [{"data": "cifar10", "arch": "conv6bn"},
                                    {"data": "cifar10", "arch": "convnetjs"},
                                    {"data": "cifar10", "arch": "conv8x4s2p1-pool2-bn-conv4x3"},
                                    {"data": "spiral", "hidden": [30, 20]}])
def test_the_memory_estimate_counts_the_parameters_a_built_network_has(values):
    """The estimate does arithmetic on the spec (building a huge network to measure it
    would itself exhaust memory); it must agree with what building gives."""
    from experiments.config import TrainConfig, resolve
    from experiments.resources import ARRAYS_PER_PARAMETER, estimate
    from experiments.runner import build_network, load_data
    config = resolve(TrainConfig(**values))
    data = load_data(config) if not config.is_image else None
    if data is None:
        from mlp.arch import build_convnet
        net = build_convnet(config.arch, (3, 32, 32), 10, dtype=np.float32)
    else:
        net = build_network(config, data)
    itemsize = np.dtype(config.dtype).itemsize
    assert estimate(config)["parameters"] == net.num_params * ARRAYS_PER_PARAMETER * itemsize
