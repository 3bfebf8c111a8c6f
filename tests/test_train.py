"""The training loop and whole runs: the cs231n figures, determinism, divergence."""
import numpy as np
import pytest

from experiments.config import TrainConfig
from experiments.runner import run
from mlp.network import build_mlp
from mlp.optim import SGD
from mlp.train import Callback, train


def test_spiral_full_batch_gd_reaches_the_notes_98_percent():
    outcome = run(TrainConfig(data="spiral", hidden=[100], reg=1e-3, optimizer="sgd", lr=1.0,
                              batch_size=0, epochs=10000))
    assert outcome.status == "ok"
    assert outcome.final["final_train_acc"] >= 0.98


def test_linear_softmax_on_the_spiral_lands_near_the_notes_49_percent():
    outcome = run(TrainConfig(data="spiral", hidden=[], reg=1e-3, optimizer="sgd", lr=1.0,
                              batch_size=0, epochs=10000))
    assert 0.45 <= outcome.final["final_train_acc"] <= 0.58


def test_same_seed_gives_bit_identical_metrics():
    config = TrainConfig(data="moons", hidden=[16], optimizer="adam", lr=0.01, batch_size=32,
                         epochs=15, val_fraction=0.2, dropout=0.1, seed=7)
    a, b = run(config), run(config)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a.result.history] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in b.result.history]
    c = run(TrainConfig(**{**config.to_dict(), "seed": 8}))
    assert c.result.history[-1]["train_loss"] != a.result.history[-1]["train_loss"]


def test_divergence_stops_the_run_with_status_diverged():
    outcome = run(TrainConfig(data="spiral", hidden=[50], optimizer="sgd", lr=1e6, epochs=200))
    assert outcome.status == "diverged"
    assert outcome.result.epochs_run < 200


def test_iterations_override_epochs_and_history_has_one_row_per_epoch():
    outcome = run(TrainConfig(data="blobs", hidden=[8], batch_size=50, iterations=14, epochs=99,
                              optimizer="sgd", lr=0.1))
    # 300 points / 50 = 6 batches per epoch: 14 updates = 2 full epochs + 2 batches
    assert outcome.result.iterations == 14
    assert [r["epoch"] for r in outcome.result.history] == [1, 2, 3]


def test_early_stopping_restores_the_best_validation_parameters():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((60, 2)), rng.integers(0, 2, size=60)   # pure noise: overfits
    net = build_mlp(2, [64], 2, seed=0)
    result = train(net, SGD(0.5), X[:40], y[:40], X_val=X[40:], y_val=y[40:], epochs=300,
                   patience=5)
    assert result.stopped_early and result.epochs_run < 300
    best = max(r["val_acc"] for r in result.history)
    assert net.evaluate(X[40:], y[40:])[1] == pytest.approx(best)


def test_callback_sees_every_epoch_and_can_stop_training():
    class StopAtThree(Callback):
        def __init__(self):
            self.epochs = []

        def on_epoch_end(self, record):
            self.epochs.append(record["epoch"])
            return record["epoch"] == 3

    cb = StopAtThree()
    net = build_mlp(2, [4], 2)
    X, y = np.random.default_rng(0).standard_normal((20, 2)), np.arange(20) % 2
    result = train(net, SGD(0.1), X, y, epochs=10, callback=cb)
    assert cb.epochs == [1, 2, 3] and result.epochs_run == 3


def test_float32_dtype_trains_in_float32():
    outcome = run(TrainConfig(data="circle", hidden=[16], dtype="float32", epochs=50))
    assert all(p.dtype == np.float32 for p in outcome.network.params.values())


def test_importing_nnx_leaves_the_allocator_alone_training_tunes_it(monkeypatch):
    """The glibc mmap-threshold change belongs to the process: `import mlp` must not
    make it; training does, once; NNX_MALLOC_TUNING=0 turns it off."""
    import subprocess
    import sys
    code = ("import mlp, mlp.network, mlp.arch, mlp.conv, experiments.runner, cli.app\n"
            "from mlp import _allocator\nassert _allocator._done is None, _allocator._done")
    subprocess.run([sys.executable, "-c", code], check=True)

    from mlp import _allocator
    calls = []
    monkeypatch.setattr(_allocator, "_mallopt", lambda: calls.append(1) or True)
    net = build_mlp(2, [4], 2, seed=0)
    X, y = np.random.default_rng(0).standard_normal((8, 2)), np.arange(8) % 2
    for value, expected in (("0", 0), ("off", 0), ("", 1), ("1", 1)):
        monkeypatch.setenv("NNX_MALLOC_TUNING", value)
        monkeypatch.setattr(_allocator, "_done", None)
        calls.clear()
        train(net, SGD(0.1), X, y, epochs=2)
        train(net, SGD(0.1), X, y, epochs=1)      # once per process, not per call
        assert len(calls) == expected, value
