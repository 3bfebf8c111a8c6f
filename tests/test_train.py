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


@pytest.mark.numerics
def test_same_seed_gives_bit_identical_metrics():
    config = TrainConfig(data="moons", hidden=[16], optimizer="adam", lr=0.01, batch_size=32,
                         epochs=15, val_size=0.2, dropout=0.1, seed=7)
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
    assert net.loss_and_accuracy(X[40:], y[40:])[1] == pytest.approx(best)


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


def test_a_callback_re_plans_the_run_and_the_schedule_follows():
    from mlp.optim import Schedule
    from mlp.train import Decision

    class Shorten(Callback):
        def __init__(self):
            self.plans = []

        def on_epoch_end(self, record):
            return Decision(plan=5) if record["epoch"] == 2 else None

        def on_plan(self, epochs):
            self.plans.append(epochs)

    cb, schedule = Shorten(), Schedule("cosine", 0.1, total=10)
    X, y = np.random.default_rng(0).standard_normal((20, 2)), np.arange(20) % 2
    result = train(build_mlp(2, [4], 2), SGD(0.1), X, y, epochs=10, schedule=schedule, callback=cb)
    assert result.epochs_run == 5 and cb.plans == [5] and schedule.total == 5
    assert result.history[-1]["lr"] == pytest.approx(schedule(4.0))   # the last epoch's first batch


@pytest.mark.numerics
def test_a_runaway_loss_is_divergence_even_while_finite():
    """lr 1000 on the spiral: the loss jumps a hundredfold and more, then oscillates
    without ever reaching inf; the 100x rule calls it diverged."""
    from mlp.train import RUNAWAY_FACTOR, is_runaway
    outcome = run(TrainConfig(data="spiral", hidden=[100], optimizer="sgd", lr=1000.0, epochs=50))
    assert outcome.status == "diverged"
    losses = [r["train_loss"] for r in outcome.result.history]
    assert all(np.isfinite(losses))              # it never went NaN or inf before the rule fired
    assert is_runaway(RUNAWAY_FACTOR * 1.1 + 1e-9, 1.1) and not is_runaway(50.0, 1.1)
    assert is_runaway(float("nan"), 1.0) and is_runaway(float("inf"), 1.0)


def test_a_checkpoint_of_nnx_0_1_resumes_with_its_momentum_converted(tmp_path):
    """nnx 0.1 kept the cs231n velocity (v = mu v - lr dw); today's optimizer keeps raw
    gradients (v = mu v + dw). An old checkpoint's v is converted on load."""
    import json

    from experiments.checkpoint import load_checkpoint, save_checkpoint
    from mlp.optim import Nesterov
    X, y = np.random.default_rng(0).standard_normal((40, 2)), np.arange(40) % 2
    net, opt = build_mlp(2, [6], 2, seed=0), Nesterov(0.05)
    result = train(net, opt, X, y, epochs=3, batch_size=8)
    save_checkpoint(tmp_path / "new.npz", net, opt, result)
    with np.load(tmp_path / "new.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    progress = json.loads(str(arrays["__train_state__"]))
    del progress["velocity"]
    arrays["__train_state__"] = np.array(json.dumps(progress))
    for key in [k for k in arrays if k.startswith("optim:")]:
        arrays[key] = -opt.lr * arrays[key]                 # as nnx 0.1 wrote it
    np.savez(tmp_path / "old.npz", **arrays)
    restored = Nesterov(0.05)
    load_checkpoint(tmp_path / "old.npz", restored)
    for name, slots in opt.state.items():
        np.testing.assert_allclose(restored.state[name]["v"], slots["v"], rtol=1e-12, atol=1e-15)


def test_lookahead_pulls_the_weights_to_their_average_by_hand():
    """Weights that an optimizer moves by +1 per update; every 2 updates they are pulled
    to the average with rho = 0.5**2 (power 0: a constant decay), and at the epoch's
    end once more with rho = 1 (the network takes the average as it is)."""
    from mlp.train import Lookahead, TrainResult
    w = {"w": np.zeros(1)}
    result = TrainResult()
    ahead = Lookahead(w, result, batches_per_epoch=6, decay=0.5, every=2, start=0, power=0)
    ahead.on_train_begin(1, 6, 0)
    seen = []
    for batch in range(6):
        w["w"] += 1                                   # the update
        ahead.on_batch_end(0, batch, 6, 1, 0.0)
        seen.append(float(w["w"][0]))
    # step 2: the average starts at 2; step 4: 0.25 * 2 + 0.75 * 4 = 3.5; step 6: 0.25 * 3.5 +
    # 0.75 * 5.5 = 5.0
    assert seen == [1, 2, 3, 3.5, 4.5, 5.0]
    w["w"] += 10                                      # the epoch's end takes the average back
    ahead.on_updates_end(0)
    assert w["w"][0] == 5.0


def test_lookahead_starts_late_and_its_decay_rises_with_progress():
    from mlp.train import Lookahead, TrainResult
    w, result = {"w": np.zeros(1)}, TrainResult()
    ahead = Lookahead(w, result, batches_per_epoch=10, decay=0.95, every=5, start=1, power=3)
    ahead.on_train_begin(4, 10, 0)
    for batch in range(10):
        ahead.on_batch_end(0, batch, 10, 1, 0.0)
    assert result.average is None                     # epoch 0 < start
    for batch in range(5):
        ahead.on_batch_end(1, batch, 10, 1, 0.0)
    assert result.average is not None                 # step 15: the average starts
    w["w"][...] = 1.0
    for batch in range(5, 10):
        ahead.on_batch_end(1, batch, 10, 1, 0.0)      # step 20 of 40: rho = 0.95**5 * 0.5**3
    rho = 0.95 ** 5 * 0.5 ** 3
    assert w["w"][0] == pytest.approx(1 - rho)
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
