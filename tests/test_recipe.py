"""The pieces of the airbench94 recipe, each checked on its own (against PyTorch where it
has the same operation), and the recipe end to end on a tiny CIFAR-10 stand-in."""
import json

import numpy as np
import pytest
from helpers import KillAt, cifar_dir, flat, without_seconds
from typer.testing import CliRunner

from cli.app import app
from cli.options import config_from_options
from experiments.config import RECIPES, TrainConfig, apply_recipe, resolve
from experiments.runner import learning_rate_scales, run
from mlp.arch import build_convnet
from mlp.conv import BatchNorm, Conv2D, Whiten
from mlp.init import init_weight

runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return cifar_dir(tmp_path_factory.mktemp("cifar"), seed=4, per_batch=40)


# ---- whitening ------------------------------------------------------------------------
def test_whitening_decorrelates_patches_to_unit_variance():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3, 10, 10))
    X[:, 1] += 0.9 * X[:, 0]                                # correlated channels
    layer = Whiten(3, 2, eps=0.0, dtype=np.float64)
    layer.fit(X)
    out = layer.forward(X)
    channels = np.ascontiguousarray(out).transpose(1, 0, 2, 3).reshape(24, -1)
    second_moment = channels[:12] @ channels[:12].T / channels.shape[1]  # uncentred, as fitted
    np.testing.assert_allclose(second_moment, np.eye(12), atol=1e-9)
    np.testing.assert_array_equal(layer.params["W"][12:], -layer.params["W"][:12])


def test_whitening_filters_are_airbenchs_up_to_sign():
    """airbench's get_whitening_parameters (torch.linalg.eigh of the patch covariance,
    largest eigenvalue first, eigenvectors / sqrt(eigenvalue + eps)) on the same
    images gives the same filters, each up to its sign (eigenvectors have none)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 3, 8, 8)).astype(np.float32)
    X[:, 2] -= 0.5 * X[:, 1]
    layer = Whiten(3, 2)
    layer.fit(X)
    x = torch.tensor(X)
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3, 2, 2).double()
    flat_patches = patches.view(len(patches), -1)
    values, vectors = torch.linalg.eigh(flat_patches.T @ flat_patches / len(flat_patches))
    theirs = (vectors.T.reshape(12, 3, 2, 2).flip(0) / torch.sqrt(values.flip(0) + 5e-4).view(-1, 1, 1, 1))
    ours = layer.params["W"][:12].astype(np.float64)
    theirs = theirs.numpy()
    signs = np.sign(np.sum(ours * theirs, axis=(1, 2, 3)))
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(ours, signs[:, None, None, None] * theirs, rtol=1e-4, atol=1e-4)
    out = torch.nn.functional.conv2d(x, torch.tensor(layer.params["W"]), torch.tensor(layer.params["b"]))
    np.testing.assert_allclose(np.ascontiguousarray(layer.forward(X)), out.numpy(), rtol=1e-4, atol=1e-4)


# ---- initialisation, BatchNorm options, the head -------------------------------------------
def test_dirac_init_makes_the_first_filters_the_identity():
    w = init_weight((6, 4, 3, 3), 36, 54, "dirac", 0.0, np.random.default_rng(0), np.float64)
    conv = Conv2D(4, 6, 3, 1, 1, dtype=np.float64)
    conv.params["W"][...] = w
    x = np.random.default_rng(1).standard_normal((2, 4, 5, 5))
    out = np.ascontiguousarray(conv.forward(x))
    np.testing.assert_allclose(out[:, :4], x, atol=1e-12)            # channel i passes through
    assert np.all(np.abs(w[4:]) <= 1 / 6) and np.any(w[4:] != 0)     # the rest: U(+-1/sqrt(36))
    torch = pytest.importorskip("torch")
    reference = torch.empty(4, 4, 3, 3, dtype=torch.float64)
    torch.nn.init.dirac_(reference)
    np.testing.assert_array_equal(w[:4], reference.numpy())


def test_batchnorm_decay_and_eps_are_torchs_momentum_and_eps():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    ours = BatchNorm(5, decay=0.6, eps=1e-12, dtype=np.float64)
    theirs = torch.nn.BatchNorm2d(5, momentum=0.4, eps=1e-12, dtype=torch.float64)
    for _ in range(3):
        x = rng.standard_normal((4, 5, 3, 3)) * 2 + 1
        out = ours.forward(x, train=True)
        expected = theirs(torch.tensor(x))
        np.testing.assert_allclose(np.ascontiguousarray(out), expected.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(ours.buffers["running_mean"], theirs.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours.buffers["running_var"], theirs.running_var.numpy(), rtol=1e-12)


def test_learning_rate_scales_freeze_bn_scales_and_whitening_and_speed_up_bn_biases():
    config = resolve(TrainConfig(**apply_recipe({"recipe": "airbench94"})))
    net = build_convnet(config.arch, (3, 32, 32), 10, bn_decay=config.bn_decay)
    scales = learning_rate_scales(net, config)
    assert scales["0.whiten.W"] == 0.0 and "0.whiten.b" not in scales
    assert scales["4.batchnorm.beta"] == 64.0 and scales["4.batchnorm.gamma"] == 0.0
    assert not any(name.endswith(("conv2d.W", "linear.W")) for name in scales)


def test_the_airbench94_preset_is_airbenchs_network():
    net = build_convnet("airbench94", (3, 32, 32), 10, activation="gelu")
    kinds = [layer.kind for layer in net.layers]
    assert kinds[:2] == ["whiten", "gelu"] and kinds[-3:] == ["maxpool2d", "linear", "scale"]
    convs = [layer for layer in net.layers if layer.kind == "conv2d"]
    assert [c.out_channels for c in convs] == [64, 64, 256, 256, 256, 256]
    assert net.layers[0].out_channels == 24 and net.layers[-1].factor == pytest.approx(1 / 9, rel=1e-4)
    assert kinds.count("gelu") == 7 and kinds.index("maxpool2d") == 3      # conv, pool, bn, act
    assert net.layers[-4].kind == "gelu"       # the last act before the 3x3 pool: GELU does not commute


# ---- the recipe, end to end -----------------------------------------------------------------
def test_the_recipe_fills_only_the_options_not_given():
    values = apply_recipe({"recipe": "airbench94", "lr": 0.5, "label_smoothing": 0.0})
    assert values["lr"] == 0.5 and values["label_smoothing"] == 0.0
    assert values["momentum"] == RECIPES["airbench94"]["momentum"] == 0.85
    config = resolve(TrainConfig(**values))
    assert (config.arch, config.schedule, config.batch_size) == ("airbench94", "linear", 1024)


def test_a_flag_given_overrides_the_recipe_and_one_left_off_does_not():
    config = config_from_options({"recipe": "airbench94", "bn_scale": True})
    assert config.bn_scale is True and config.augment is True
    assert config_from_options({}).augment is False and config_from_options({}).bn_scale is True


def test_the_recipe_trains_end_to_end_from_the_command_line(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NNX_CONV_ALGORITHM", "im2col")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--recipe", "airbench94", "--data-dir", str(data_dir),
                                 "--val-size", "40", "--epochs", "2", "--batch-size", "50",
                                 "--arch", "airbench93", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["recipe"] == "airbench94" and record["config"]["bn_bias_lr"] == 64.0
    assert "--recipe airbench94" in record["command"]
    # a flag left off the command line is the recipe's, not the flag's default
    assert record["config"]["augment"] is True and record["config"]["bn_scale"] is False
    result = runner.invoke(app, ["evaluate", str(out), "--data-dir", str(data_dir), "--tta"])
    assert result.exit_code == 0 and "(tta)" in flat(result.output)


def test_a_killed_recipe_run_resumes_to_the_same_numbers(data_dir, tmp_path, monkeypatch):
    """Whitening, frozen BatchNorm scales, a faster BatchNorm bias, the whitening bias
    frozen after an epoch, lookahead, alternating flips: all restored from the checkpoint."""
    monkeypatch.setenv("NNX_CONV_ALGORITHM", "im2col")
    config = TrainConfig(**apply_recipe({
        "recipe": "airbench94", "data_dir": str(data_dir), "val_size": 40, "epochs": 4,
        "batch_size": 40, "arch": "whiten2-conv8x3-pool2-bn-conv8x3-bn-act-pool2-fc10-scale0.5",
        "whiten_bias_epochs": 1, "ema_start": 1.0, "ema_every": 2, "warmup": 1.0}))
    whole = run(config)
    with pytest.raises(KeyboardInterrupt):
        run(config, callback=KillAt(2), checkpoint=tmp_path / "checkpoint.npz")
    resumed = run(config, checkpoint=tmp_path / "checkpoint.npz")
    assert without_seconds(resumed.result.history) == without_seconds(whole.result.history)
    for name, value in whole.network.params.items():
        np.testing.assert_array_equal(resumed.network.params[name], value)
    gammas = [v for k, v in whole.network.params.items() if k.endswith("gamma")]
    assert all(np.all(g == 1) for g in gammas)                    # kept at 1 (--no-bn-scale)


def test_the_whitening_bias_stops_after_its_epochs(data_dir, monkeypatch):
    monkeypatch.setenv("NNX_CONV_ALGORITHM", "im2col")
    snapshots = {}

    class Watch(KillAt):
        def __init__(self):
            super().__init__(-1)

        def on_epoch_end(self, record):
            snapshots[record["epoch"]] = self.net.params["0.whiten.b"].copy()

    watch = Watch()
    base = {"recipe": "airbench94", "data_dir": str(data_dir), "val_size": 40, "epochs": 4,
            "batch_size": 40, "arch": "whiten2-conv8x3-pool2-bn-fc10", "whiten_bias_epochs": 2,
            "ema_decay": 0.0}
    config = resolve(TrainConfig(**apply_recipe(base)))
    from experiments.runner import build_network, load_data
    data = load_data(config)
    watch.net = build_network(config, data)
    import experiments.runner as runner_module
    monkeypatch.setattr(runner_module, "build_network", lambda config, data: watch.net)
    run(config, callback=watch, data=data)
    assert not np.array_equal(snapshots[1], snapshots[2])          # trained for two epochs
    np.testing.assert_array_equal(snapshots[2], snapshots[3])       # then kept
    np.testing.assert_array_equal(snapshots[3], snapshots[4])
