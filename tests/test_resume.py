"""Checkpoints, `nnx train --resume` and `--time-budget`."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import KillAt, flat, kill_when_ready, without_seconds
from typer.testing import CliRunner

from cli.app import app
from experiments.config import TrainConfig, parse_duration
from experiments.runner import BUDGET_EPOCHS_LIMIT, run
from mlp.network import Network

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(data="moons", hidden=[32, 32], dropout=0.2, optimizer="adam", lr=0.01,
              batch_size=32, epochs=12, val_size=0.2, patience=50, schedule="cosine",
              checkpoint_every=1, seed=3)

# `nnx train` in a child that, once the checkpoint of epoch KILL_AFTER is on disk, says so
# (through the file descriptor in argv[1]) and waits to be killed.
KILL_AFTER = 3
CHILD = f"""
import os, sys, threading
from experiments import checkpoint
from cli.app import app

ready, save = int(sys.argv[1]), checkpoint.save_checkpoint

def save_then_wait(path, net, optimizer, state):
    save(path, net, optimizer, state)
    if state.epochs_run == {KILL_AFTER}:
        os.write(ready, b"saved")
        threading.Event().wait()

checkpoint.save_checkpoint = save_then_wait
app(sys.argv[2:], prog_name="nnx")
"""


@pytest.mark.numerics
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole = run(TrainConfig(**CONFIG))
    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(**CONFIG), callback=KillAt(5), checkpoint=tmp_path / "checkpoint.npz")
    resumed = run(TrainConfig(**CONFIG), checkpoint=tmp_path / "checkpoint.npz")
    assert without_seconds(resumed.result.history) == without_seconds(whole.result.history)
    for name, value in whole.network.params.items():
        np.testing.assert_array_equal(resumed.network.params[name], value)


def test_cli_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    args = ["train", "--data", "moons", "--hidden", "64,64", "--dropout", "0.1", "--optimizer",
            "momentum", "--lr", "0.05", "--batch-size", "8", "--epochs", "8",
            "--val-size", "0.2", "--checkpoint-every", "1"]
    killed = tmp_path / "killed"
    assert kill_when_ready(CHILD, [*args, "--out", str(killed)], ROOT) == b"saved"
    assert (killed / "checkpoint.npz").exists() and not (killed / "model.npz").exists()
    assert json.loads((killed / "config.json").read_text())["status"] == "running"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--resume", str(killed)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "whole")]).exit_code == 0
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv").drop(columns="seconds") for d in ("killed", "whole"))
    assert len(a) == 8
    pd.testing.assert_frame_equal(a, b)
    X = np.random.default_rng(0).standard_normal((20, 2))
    np.testing.assert_array_equal(Network.load(killed / "model.npz").scores(X),
                                  Network.load(tmp_path / "whole" / "model.npz").scores(X))
    assert json.loads((killed / "config.json").read_text())["status"] == "ok"


def test_resume_refuses_finished_runs_and_empty_directories(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["train", "--epochs", "5", "--out", str(tmp_path / "done")]).exit_code == 0
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "done")])
    assert result.exit_code == 2 and "already finished" in flat(result.output)
    result = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "no readable config.json" in flat(result.output)


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("45m") == 2700
    assert parse_duration("1.5h") == 5400 and parse_duration("12") == 12
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """time.perf_counter, which only moves when the test says so."""
    fake = FakeClock()
    monkeypatch.setattr("time.perf_counter", fake)
    return fake


@pytest.fixture
def batches_take(monkeypatch, clock):
    """Make every training batch take ``seconds`` on the fake clock: the probe and the
    budget then see a machine of exactly known speed (a power of two keeps the sums exact)."""
    from mlp.stack import MLPStack

    def set_speed(seconds):
        # a network trains alone (Network) or as a stack of one (MLPStack, nnx train's MLPs)
        for cls, step in ((Network, "loss_and_scores"), (MLPStack, "train_step")):
            real = getattr(cls, step)

            def timed(self, *args, real=real, **kwargs):
                clock.now += seconds
                return real(self, *args, **kwargs)
            monkeypatch.setattr(cls, step, timed)
    return set_speed


def test_time_budget_fits_the_run_into_its_budget(clock, batches_take):
    batches_take(2 ** -10)      # 300 spiral points in batches of 16: 19 batches, 19/1024 s an epoch
    config = TrainConfig(data="spiral", hidden=[20], batch_size=16, schedule="cosine",
                         optimizer="sgd", lr=0.1, time_budget=1.5)
    outcome = run(config)
    assert outcome.result.epochs_run == int(1.5 / (19 * 2 ** -10)) == 80
    training = sum(r["seconds"] for r in outcome.result.history)
    assert 1.5 - 19 * 2 ** -10 < training <= 1.5          # the budget, less than an epoch left over
    assert outcome.result.history[-1]["lr"] < 0.1 * 0.01    # the cosine reached its end


@pytest.mark.parametrize("epoch_seconds, planned, expected", [
    (60, 10, 16),    # faster than the probe said: the first epochs lengthen the plan
    (150, 10, 6),    # slower: they shorten it
])
def test_time_budget_plans_from_the_first_epochs(clock, epoch_seconds, planned, expected):
    from experiments import checkpoint
    budget = checkpoint.TimeBudget(1000, planned, limit=4 * planned)
    budget.on_train_begin(planned, 10, 0)
    epoch, decision, plans = 0, None, []
    while not (decision and decision.stop):
        epoch += 1
        clock.now += epoch_seconds
        decision = budget.on_epoch_end({"epoch": epoch})
        plans.append(decision.plan)
    assert epoch == expected == budget.planned
    assert set(plans) == {expected}           # the new plan is made after the first epoch
    assert clock.now <= 1000


def test_time_budget_runs_past_a_pessimistic_probe(monkeypatch, clock, batches_take):
    """The probe's plan is only a first guess: a run whose epochs go faster than it
    said keeps training until the budget is spent (up to the limit), and its cosine still ends."""
    from experiments import runner
    monkeypatch.setattr(runner, "estimate_epoch_seconds", lambda *args, **kwargs: 0.5)
    batches_take(2 ** -10)                                  # full batch: one batch an epoch
    config = TrainConfig(data="spiral", hidden=[20], schedule="cosine", optimizer="sgd", lr=0.5,
                         time_budget=1.0)                   # the probe plans 2 epochs
    outcome = run(config)
    assert outcome.result.epochs_run == BUDGET_EPOCHS_LIMIT * 2     # the most a plan may grow
    assert outcome.result.history[-1]["lr"] < 0.5 * 0.2


def test_time_budget_only_shortens_in_the_second_half(clock):
    from experiments import checkpoint
    budget = checkpoint.TimeBudget(1000, 10)
    budget.on_train_begin(10, 10, 0)
    for epoch, seconds in enumerate([100, 100, 100, 100, 100, 100, 10], 1):  # then it speeds up
        clock.now += seconds
        assert not budget.on_epoch_end({"epoch": epoch}).stop
    assert budget.planned == 10                                     # a late cosine is not lengthened
    for epoch in range(8, 10):
        clock.now += 300                                            # and slows down a lot
        budget.on_epoch_end({"epoch": epoch})
    assert budget.planned < 10


def test_bad_time_budget_is_a_usage_error():
    result = CliRunner().invoke(app, ["train", "--time-budget", "soon"])
    assert result.exit_code == 2 and "duration" in flat(result.output)
