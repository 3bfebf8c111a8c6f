"""Stacked training (mlp/stack.py, mlp/stack_trainer.py): many MLPs as one computation,
every trial with the numbers it has alone.

A stacked trial runs other operations than the solo layers (its bias carried in the
product, the scores transposed, ReLU as a multiply by its mask, the loss on columns),
so its numbers equal its solo run's to 1e-10 of each array's magnitude (``assert_close``),
not bit for bit; its discrete outcomes (status, epochs run, early stop, best epoch)
exactly. Bit for bit still: a trial's numbers whoever shares its stack (same widths)."""
import copy
import math
import pickle

import numpy as np
import pytest
from helpers import assert_close

from experiments.config import TrainConfig
from experiments.datasets import make_2d
from experiments.files import history_csv
from experiments.runner import run
from mlp.gradcheck import check_stack
from mlp.history import History
from mlp.network import build_mlp
from mlp.optim import OPTIMIZERS, Schedule, make_optimizer
from mlp.stack import MLPStack
from mlp.stack_trainer import StackTrainer
from mlp.train import Callback, Decision, EarlyStopping, Trainer, TrainResult

DATA = make_2d("spiral", 30, 3, 0.2, 0, 0.2)          # 72 training points, 18 for validation
RTOL = 1e-10
# stacked and solo runs sum in other orders, whose rounding each BLAS kernel sets apart
pytestmark = pytest.mark.numerics


def trial(hidden, reg=1e-3, lr=0.5, seed=0, dropout=0.0, optimizer="sgd", schedule="constant",
          patience=None, snapshot_every=0, momentum=0.9, label_smoothing=0.0, activation="relu",
          weight_decay=0.0):
    return dict(hidden=hidden, reg=reg, lr=lr, seed=seed, dropout=dropout, optimizer=optimizer,
                schedule=schedule, patience=patience, snapshot_every=snapshot_every,
                momentum=momentum, label_smoothing=label_smoothing, activation=activation,
                weight_decay=weight_decay)


def build(spec, epochs):
    net = build_mlp(2, spec["hidden"], 3, reg=spec["reg"], seed=spec["seed"], dropout=spec["dropout"],
                    activation=spec["activation"])
    net.label_smoothing = spec["label_smoothing"]
    return (net, make_optimizer(spec["optimizer"], spec["lr"], spec["momentum"], spec["weight_decay"]),
            Schedule(spec["schedule"], spec["lr"], total=epochs, step_size=4))


def alone(spec, epochs, batch_size):
    """The trial trained by the solo Trainer, as nnx trained every network before stacks."""
    net, optimizer, schedule = build(spec, epochs)
    trainer = Trainer(net, optimizer, DATA.X_train, DATA.y_train, X_val=DATA.X_val, y_val=DATA.y_val,
                      batch_size=batch_size, schedule=schedule, seed=spec["seed"],
                      snapshot_every=spec["snapshot_every"])
    callback = None
    if spec["patience"] is not None:
        callback = EarlyStopping(spec["patience"], trainer.result, trainer.params)
    return net, trainer.train(epochs, callback=callback)


def stacked(specs, epochs, batch_size, widths=None, callbacks=None):
    built = [build(spec, epochs) for spec in specs]
    trainer = StackTrainer([b[0] for b in built], [b[1] for b in built], DATA.X_train, DATA.y_train,
                           X_val=DATA.X_val, y_val=DATA.y_val, batch_size=batch_size,
                           schedules=[b[2] for b in built], seeds=[s["seed"] for s in specs],
                           patience=[s["patience"] for s in specs],
                           snapshot_every=[s["snapshot_every"] for s in specs], widths=widths)
    results = trainer.train(epochs, callbacks=callbacks)
    return [b[0] for b in built], results


def columns(history, name):
    return np.array([record[name] for record in history])


def assert_same_run(net, result, solo_net, solo):
    """The stacked trial equals its solo run: its discrete outcomes exactly, its curves
    and parameters to RTOL, scaled to each array's magnitude."""
    assert (result.status, result.epochs_run, result.stopped_early, result.best_epoch) == \
        (solo.status, solo.epochs_run, solo.stopped_early, solo.best_epoch)
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        a, b = columns(result.history, name), columns(solo.history, name)
        finite = np.isfinite(b)
        np.testing.assert_array_equal(np.isfinite(a), finite, err_msg=name)
        assert_close(a[finite], b[finite], RTOL, err_msg=name)
    for name, value in solo_net.params.items():
        assert_close(net.params[name], value, RTOL, err_msg=name)


# hidden sizes 4 (padded to 12), 12 and 7 (padded); regs, lrs, seeds and dropout mixed;
# the last trial's lr makes it diverge in its first epochs
GRID = [trial([12], reg=1e-3, lr=0.5, seed=0), trial([4], reg=0.0, lr=1.0, seed=1),
        trial([12], reg=1e-2, lr=0.2, seed=2, dropout=0.3), trial([7], reg=1e-3, lr=0.5, seed=3,
                                                                   dropout=0.1),
        trial([12], reg=1e-4, lr=1.0, seed=1), trial([12], reg=1e-3, lr=1e4, seed=4)]


@pytest.mark.parametrize("batch_size", [0, 16])
def test_each_trial_of_a_stack_trains_as_it_does_alone(batch_size):
    """A grid of hidden sizes, regs, lrs, seeds, with dropout and a diverging trial, full
    batch and minibatches: every trial ends as its solo run does, padded or not (to
    1e-10)."""
    nets, results = stacked(GRID, 40, batch_size)
    assert [r.status for r in results] == ["ok"] * 5 + ["diverged"]
    assert results[-1].epochs_run < 40
    for spec, net, result in zip(GRID, nets, results, strict=True):
        solo_net, solo = alone(spec, 40, batch_size)
        assert_same_run(net, result, solo_net, solo)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_stacks_with_per_trial_lr_momentum_and_weight_decay(name):
    """Momentum in PyTorch's form differs from cs231n's only under a moving lr: the
    cosine and step schedules check the lr reaches each trial's step as it does alone;
    weight decay (weight_decay / base_lr * w added to the gradient) is each trial's."""
    specs = [trial([9], lr=lr, seed=s, momentum=m, optimizer=name, schedule=schedule, weight_decay=wd)
             for lr, s, m, schedule, wd in [(0.05, 0, 0.9, "cosine", 0.01), (0.02, 1, 0.5, "step", 0.0),
                                            (0.05, 2, 0.8, "constant", 0.002)]]
    nets, results = stacked(specs, 12, 16)
    for spec, net, result in zip(specs, nets, results, strict=True):
        assert_same_run(net, result, *alone(spec, 12, 16))


def test_early_stopping_is_per_trial_and_restores_that_trials_best_parameters():
    specs = [trial([16], lr=0.5, seed=0, patience=3), trial([16], lr=0.5, seed=1),
             trial([16], lr=0.2, seed=2, patience=6)]
    nets, results = stacked(specs, 60, 8)
    assert results[0].stopped_early and not results[1].stopped_early
    assert results[0].epochs_run < 60 and results[1].epochs_run == 60
    for spec, net, result in zip(specs, nets, results, strict=True):
        solo_net, solo = alone(spec, 60, 8)
        assert_same_run(net, result, solo_net, solo)
        if spec["patience"] is not None and result.stopped_early:
            best = result.history[result.best_epoch - 1]["val_acc"]
            assert net.loss_and_accuracy(DATA.X_val, DATA.y_val)[1] == pytest.approx(best)


def test_other_activations_losses_and_label_smoothing_stack():
    for activation in ("tanh", "sigmoid", "leaky_relu"):
        specs = [trial([8, 5], seed=0, activation=activation, label_smoothing=0.1),
                 trial([3, 5], seed=1, activation=activation, dropout=0.2),
                 trial([8, 2], seed=2, activation=activation)]
        nets, results = stacked(specs, 10, 16)
        for spec, net, result in zip(specs, nets, results, strict=True):
            assert_same_run(net, result, *alone(spec, 10, 16))


def test_each_trial_keeps_its_own_snapshots():
    specs = [trial([6], seed=0, snapshot_every=3), trial([10], seed=1), trial([10], seed=2, snapshot_every=5)]
    nets, results = stacked(specs, 10, 0)
    assert results[1].snapshots == []
    for spec, result in zip(specs, results, strict=True):
        _, solo = alone(spec, 10, 0)
        assert [e for e, _ in result.snapshots] == [e for e, _ in solo.snapshots]
        for (_, a), (_, b) in zip(result.snapshots, solo.snapshots, strict=True):
            for name in b:
                assert_close(a[name], b[name], RTOL)


def test_a_trials_numbers_depend_on_the_widths_not_on_the_other_trials():
    """Padded to the same widths, a trial gets the same bits alone and in any company:
    what lets a sweep resume a stack with some of its trials done."""
    specs = [trial([5], seed=0, dropout=0.2), trial([11], seed=1), trial([8], seed=2, lr=3e3)]
    nets, results = stacked(specs, 15, 16, widths=(2, 11, 3))
    net, (result,) = stacked(specs[:1], 15, 16, widths=(2, 11, 3))
    assert results[2].status == "diverged"
    for name in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert columns(result.history, name).tolist() == columns(results[0].history, name).tolist()
    for name, value in net[0].params.items():
        np.testing.assert_array_equal(nets[0].params[name], value)


def test_a_callback_decides_for_its_own_trial():
    class StopAt(Callback):
        def __init__(self, epoch):
            self.epoch, self.seen = epoch, []

        def on_epoch_end(self, record):
            self.seen.append(record["epoch"])
            return Decision(stop=record["epoch"] == self.epoch)

    class Shorten(Callback):
        def __init__(self):
            self.plans = []

        def on_epoch_end(self, record):
            return Decision(plan=6) if record["epoch"] == 2 else None

        def on_plan(self, epochs):
            self.plans.append(epochs)

    stop, shorten = StopAt(3), Shorten()
    specs = [trial([6], seed=0), trial([6], seed=1, schedule="cosine"), trial([6], seed=2)]
    nets, results = stacked(specs, 12, 0, callbacks=[stop, shorten, None])
    assert stop.seen == [1, 2, 3] and results[0].stopped_early and results[0].epochs_run == 3
    assert shorten.plans == [6] and results[1].epochs_run == 6 and not results[1].stopped_early
    assert results[2].epochs_run == 12
    assert isinstance(results[0].history, list) and isinstance(results[2].history, History)
    _, solo = alone(specs[2], 12, 0)
    assert_close(columns(results[2].history, "train_loss"), columns(solo.history, "train_loss"), RTOL)


def test_padded_units_keep_zero_weights_and_zero_gradients():
    class PaddingStaysZero(Callback):
        """Looks at the stack after every epoch: trial 1 (3x2) is padded to 8x6."""

        def __init__(self, stack):
            self.stack, self.epochs = stack, 0

        def on_epoch_end(self, record):
            for array in (self.stack.flat, self.stack.flat_grad):
                first, second, last = self.stack.blocks(array)
                assert not first[1, :, 3:].any() and not second[1, 3:-1, :].any()
                assert not second[1, :, 2:].any() and not last[1, 2:-1, :].any()
                assert first[0].any()
            self.epochs += 1

    for activation in ("relu", "tanh", "sigmoid", "leaky_relu"):
        for name in OPTIMIZERS:
            specs = [trial([8, 6], seed=0, optimizer=name, lr=0.05, activation=activation),
                     trial([3, 2], seed=1, optimizer=name, lr=0.05, activation=activation, dropout=0.2)]
            built = [build(spec, 5) for spec in specs]
            trainer = StackTrainer([b[0] for b in built], [b[1] for b in built], DATA.X_train,
                                   DATA.y_train, batch_size=16, seeds=[0, 1])
            watch = PaddingStaysZero(trainer.stack)
            trainer.train(5, callbacks=[watch, None])
            assert watch.epochs == 5


def test_stacked_gradients_match_numerical_ones_on_a_padded_stack():
    # inputs whose pre-activations and margins stay clear of the kinks of ReLU and hinge
    # by more than the finite difference's step (at a kink it means nothing)
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((9, 2)), rng.integers(0, 3, size=9)
    for activation in ("relu", "tanh", "sigmoid", "leaky_relu"):
        for loss in ("softmax", "svm"):
            nets = [build_mlp(2, hidden, 3, activation=activation, loss=loss, reg=reg, dropout=p, seed=i)
                    for i, (hidden, reg, p) in enumerate([([6, 4], 0.1, 0.0), ([3, 4], 0.0, 0.3),
                                                          ([6, 2], 0.02, 0.1)])]
            if loss == "softmax":
                nets[2].label_smoothing = 0.2
            stack = MLPStack(nets)
            error = check_stack(stack, X, y, before_forward=lambda s: s.reseed(
                lambda t, layer: np.random.default_rng([t, layer])))
            assert error < 1e-7, (activation, loss, error)


def test_the_stacked_gradient_check_can_fail():
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((9, 2)), rng.integers(0, 3, size=9)
    stack = MLPStack([build_mlp(2, [5], 3, reg=0.5, seed=0), build_mlp(2, [3], 3, reg=0.5, seed=1)])
    stack.reg_flat = stack.reg_flat * 0         # the L2 gradient forgotten
    assert check_stack(stack, X, y) > 1e-3


def test_a_stack_of_one_gives_the_solo_trainers_numbers():
    """nnx train of a 2D MLP runs as a stack of one: the numbers nnx gave before stacks,
    to 1e-10."""
    configs = [dict(), dict(hidden=[16, 8], dropout=0.2, optimizer="adam", lr=0.01, batch_size=32,
                            schedule="cosine", val_size=0.2, patience=5),
               dict(loss="svm", optimizer="nesterov", lr=0.05, batch_size=50, activation="tanh",
                    weight_decay=0.01, schedule="linear", warmup=3, warmup_from=0.1),
               dict(label_smoothing=0.1, reg=0.0, hidden=[], val_size=0.3),
               dict(optimizer="rmsprop", lr=0.01, iterations=25, batch_size=40, snapshot_every=2)]
    for overrides in configs:
        config = TrainConfig(data="moons", epochs=30, **overrides)
        outcome = run(config)
        from experiments.runner import build_network, load_data, make_schedule
        resolved, data = outcome.config, outcome.dataset
        net = build_network(resolved, load_data(resolved))
        optimizer = make_optimizer(resolved.optimizer, resolved.lr, resolved.momentum,
                                   resolved.weight_decay)
        n_batches = math.ceil(len(data.X_train) / (resolved.batch_size or len(data.X_train)))
        progress = resolved.epochs if resolved.iterations is None else resolved.iterations / n_batches
        trainer = Trainer(net, optimizer, data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val,
                          batch_size=resolved.batch_size, schedule=make_schedule(resolved, progress),
                          seed=resolved.seed, snapshot_every=resolved.snapshot_every)
        callback = EarlyStopping(resolved.patience, trainer.result, trainer.params) \
            if resolved.patience and trainer.validate else None
        solo = trainer.train(resolved.epochs, iterations=resolved.iterations, callback=callback)
        assert_same_run(outcome.network, outcome.result, net, solo)
        assert [r["epoch"] for r in outcome.result.history] == [r["epoch"] for r in solo.history]
        assert len(outcome.result.snapshots) == len(solo.snapshots)


def test_stacks_refuse_networks_that_cannot_share_one():
    with pytest.raises(ValueError, match="cannot share a stack"):
        MLPStack([build_mlp(2, [4], 3), build_mlp(2, [4, 4], 3)])
    with pytest.raises(ValueError, match="cannot share a stack"):
        MLPStack([build_mlp(2, [4], 3), build_mlp(2, [4], 3, activation="tanh")])
    with pytest.raises(ValueError, match="do not hold"):
        MLPStack([build_mlp(2, [4], 3)], widths=(2, 3, 3))
    with pytest.raises(ValueError, match="one kind of optimizer"):
        StackTrainer([build_mlp(2, [4], 3), build_mlp(2, [4], 3)],
                     [make_optimizer("sgd", 0.1), make_optimizer("adam", 0.1)], DATA.X_train, DATA.y_train)


def test_a_float32_stack_trains_near_its_solo_runs():
    specs = [trial([8], seed=0), trial([5], seed=1, lr=0.05)]
    built = [build(spec, 8) for spec in specs]
    for net, _, _ in built:
        for layer in net.layers:
            for name, value in list(layer.params.items()):
                layer.params[name] = value.astype(np.float32)
        net.dtype = np.dtype(np.float32)
    solo_nets = [copy.deepcopy(b[0]) for b in built]
    trainer = StackTrainer([b[0] for b in built], [b[1] for b in built], DATA.X_train, DATA.y_train,
                           batch_size=16, schedules=[b[2] for b in built], seeds=[0, 1])
    trainer.train(8)
    for spec, net, solo_net in zip(specs, [b[0] for b in built], solo_nets, strict=True):
        _, optimizer, schedule = build(spec, 8)
        Trainer(solo_net, optimizer, DATA.X_train, DATA.y_train, batch_size=16, schedule=schedule,
                seed=spec["seed"]).train(8)
        for name, value in solo_net.params.items():
            assert net.params[name].dtype == np.float32
            assert_close(net.params[name], value, 1e-5)


# ---- History ------------------------------------------------------------------------
def records():
    return [{"epoch": 1, "train_loss": 1.25, "train_acc": 0.5, "val_loss": math.nan, "val_acc": math.nan,
             "lr": 0.1, "seconds": 0.0123456789},
            {"epoch": 2, "train_loss": 0.1 + 0.2, "train_acc": 2 / 3, "val_loss": -0.0, "val_acc": 0.0,
             "lr": 0.1, "seconds": 1e-7}]


def test_history_reads_as_its_records_and_writes_the_same_csv():
    history = History.from_records(records() * 3)
    assert history == records() * 3 and len(history) == 6
    assert history[-1] == records()[1] and history[1:3] == (records() * 3)[1:3]
    assert isinstance(history[0]["epoch"], int) and isinstance(history[0]["lr"], float)
    assert history.to_csv() == history_csv(records() * 3)
    assert history_csv(history) == history_csv(list(history))
    many = History.from_records([dict(r, epoch=i + 1) for i, r in enumerate(records() * 40)])
    assert history_csv(many) == history_csv(list(many))          # columns of few distinct values
    assert pickle.loads(pickle.dumps(history)) == history
    with pytest.raises(IndexError):
        history[6]


def test_train_result_history_of_a_stacked_trial_is_a_history():
    _, (result,) = stacked([trial([4])], 3, 0)
    assert isinstance(result.history, History) and result.epochs_run == 3
    assert isinstance(TrainResult().history, list)


def test_evaluation_in_batches_gives_the_whole_sets_loss_and_accuracy():
    """Evaluation goes through the rows in batches (eval_batch_size): per trial, the loss
    and accuracy of the whole set, as each trial's own network computes them."""
    nets = [build_mlp(2, [6], 3, reg=1e-2, seed=0), build_mlp(2, [4], 3, reg=0.0, seed=1)]
    stack = MLPStack(nets)
    X, y = DATA.X_train, DATA.y_train
    whole, batched = stack.loss_and_accuracy(X, y), stack.loss_and_accuracy(X, y, batch_size=7)
    assert_close(batched[0], whole[0], 1e-12)
    np.testing.assert_array_equal(batched[1], whole[1])
    for t, net in enumerate(nets):
        loss, accuracy = net.loss_and_accuracy(X, y)
        assert_close(whole[0][t:t + 1], np.array([loss]), RTOL)
        assert whole[1][t] == accuracy
