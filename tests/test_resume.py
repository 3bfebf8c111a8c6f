"""Checkpoints, `nnx train --resume` and `--time-budget`."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import flat
from typer.testing import CliRunner

from cli.app import app
from experiments.config import TrainConfig, parse_duration
from experiments.runner import run
from mlp.network import Network
from mlp.train import Callback

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(data="moons", hidden=[32, 32], dropout=0.2, optimizer="adam", lr=0.01,
              batch_size=32, epochs=12, val_size=0.2, patience=50, schedule="cosine",
              checkpoint_every=1, seed=3)


class KillAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, record):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


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
            "momentum", "--lr", "0.05", "--batch-size", "8", "--epochs", "150",
            "--val-size", "0.2", "--checkpoint-every", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--out", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while not (killed / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.npz").exists()
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--resume", str(killed)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "whole")]).exit_code == 0
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv").drop(columns="seconds") for d in ("killed", "whole"))
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


def test_time_budget_fits_the_run_into_the_wall_time():
    config = TrainConfig(data="spiral", hidden=[200], batch_size=16, schedule="cosine",
                         optimizer="sgd", lr=0.1, time_budget=1.5)
    started = time.perf_counter()
    outcome = run(config)
    elapsed = time.perf_counter() - started
    assert outcome.result.epochs_run >= 2
    assert elapsed < 1.5 * 1.6 + 1.0                     # the probe, plus slack for a busy machine
    assert outcome.result.history[-1]["lr"] < 0.1 * 0.2   # the cosine reached (near) its end


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("epoch_seconds, planned, expected", [
    (60, 10, 16),    # faster than the probe said: the first epochs lengthen the plan
    (150, 10, 6),    # slower: they shorten it
])
def test_time_budget_plans_from_the_first_epochs(monkeypatch, epoch_seconds, planned, expected):
    from experiments import checkpoint
    clock = FakeClock()
    monkeypatch.setattr(checkpoint.time, "perf_counter", clock)
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


def test_time_budget_runs_past_a_pessimistic_probe(monkeypatch):
    """The probe's plan is only a first guess: a run whose epochs go faster than it
    said keeps training until the budget is spent, and its cosine still ends."""
    from experiments import runner
    monkeypatch.setattr(runner, "estimate_epoch_seconds", lambda *args, **kwargs: 0.5)
    config = TrainConfig(data="spiral", hidden=[20], schedule="cosine", optimizer="sgd", lr=0.5,
                         time_budget=1.0)                  # the probe plans 2 epochs
    outcome = run(config)
    assert outcome.result.epochs_run > 2
    assert outcome.result.history[-1]["lr"] < 0.5 * 0.2


def test_time_budget_only_shortens_in_the_second_half(monkeypatch):
    from experiments import checkpoint
    clock = FakeClock()
    monkeypatch.setattr(checkpoint.time, "perf_counter", clock)
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
