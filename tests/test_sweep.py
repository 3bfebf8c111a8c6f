"""`nnx sweep`: spec parsing, the results store, resume and crash safety, backends."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_close, assert_same_numbers, flat, kill_when_ready
from typer.testing import CliRunner

import experiments.executors as executors
import experiments.store as store_module
from cli.app import app
from experiments.errors import BusyError, ConfigError
from experiments.store import (
    FINAL_COLUMNS,
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    RESULT_SCHEMA_VERSION,
    SweepStore,
    summarize,
)
from experiments.sweep import (
    Sweep,
    build_sweep,
    expand,
    parse_grid,
    parse_seeds,
    run_sweep,
    sweep_from_toml,
    sweep_to_toml,
)
from mlp.network import Network

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
# 2 x 2 x 2 trials of 30 epochs on 90 points: well under a second in all.
QUICK = ["--grid", "hidden=3,20", "--grid", "reg=0.001,0.1", "--seeds", "0-1",
         "--epochs", "30", "--points", "30", "--val-size", "0.2"]
QUICK_SPEC = Sweep(fixed={"epochs": 30, "points": 30, "val_size": 0.2},
                       grid={"hidden": [[3], [20]], "reg": [0.001, 0.1], "seed": [0, 1]})


def invoke(*args):
    return runner.invoke(app, ["sweep", *map(str, args)])


def numbers(out: Path) -> dict:
    """trial -> everything a rerun must reproduce bit for bit: status, metrics (as
    written, repr of each float) and the learning curve without its timings."""
    rows = SweepStore(out).read_rows()
    result = {}
    for key, row in rows.items():
        curve = (out / "curves" / f"{key}.csv").read_text().splitlines()
        curve = [line.rsplit(",", 1)[0] for line in curve]          # drop the seconds column
        metrics = tuple(row[c] for c in METRIC_COLUMNS if c != "seconds")
        result[key] = (row["status"], metrics, tuple(curve))
    return result


def failing_run(bad_hidden):
    """A stand-in for runner.run that raises for one hidden size (a trial with a bug)."""
    real = executors.run

    def run(config, *args, **kwargs):
        if config.hidden == bad_hidden:
            raise RuntimeError("boom\nsecond line")
        return real(config, *args, **kwargs)
    return run


def break_trials(monkeypatch, bad_hidden):
    """Trials of one hidden size fail, alone (runner.run) and in any stack that holds one
    (runner.run_stack), whose trials then run again alone."""
    real = executors.run_stack

    def run_stack(configs, *args, **kwargs):
        if any(config.hidden == bad_hidden for config in configs):
            raise RuntimeError("boom")
        return real(configs, *args, **kwargs)
    monkeypatch.setattr(executors, "run", failing_run(bad_hidden))
    monkeypatch.setattr(executors, "run_stack", run_stack)


# ---- spec ----------------------------------------------------------------------
def test_axis_values_take_the_train_option_types():
    grid = parse_grid(["hidden=3,6,20", "reg=1e-3,0.1", "activation=relu,tanh",
                       "batch_size=0,32", "augment=true,false"])
    assert grid["hidden"] == [[3], [6], [20]]          # one value per single-layer size
    assert grid["reg"] == [0.001, 0.1] and all(isinstance(v, float) for v in grid["reg"])
    assert grid["activation"] == ["relu", "tanh"] and grid["batch_size"] == [0, 32]
    assert grid["augment"] == [True, False]
    assert parse_grid(["hidden=64x64,none"])["hidden"] == [[64, 64], []]
    assert parse_grid(["val-size=0.1"]) == {"val_size": [0.1]}


def test_seeds_are_ranges_or_lists_and_an_ordinary_axis():
    assert parse_seeds("0-9") == list(range(10))
    assert parse_seeds("0,3,5") == [0, 3, 5]
    assert parse_grid(["seed=2-4"])["seed"] == [2, 3, 4]
    spec = build_sweep(["seed=0,1", "hidden=3"])
    assert list(spec.grid) == ["hidden", "seed"]      # seeds innermost


@pytest.mark.parametrize("args, flag, words", [
    (["--grid", "hidden="], "--grid hidden", "no values"),
    (["--grid", "reg=0.1,,0.2"], "--grid reg", "empty value"),
    (["--grid", "hiden=3,6"], "--grid", "did you mean 'hidden'"),
    (["--grid", "reg=0.1,abc"], "--grid reg", "'abc' is not a number"),
    (["--grid", "reg=0.1,-1"], "--grid reg", "must be >= 0"),
    (["--grid", "hidden=3,0"], "--grid hidden", "between 1 and"),
    (["--grid", "activation=relu,swish"], "--grid activation", "not one of"),
    (["--seeds", "5-2"], "--seeds", "is empty"),
    (["--set", "patience=soon"], "--set patience", "not a whole number"),
    (["--set", "nope=1"], "--set", "unknown option 'nope'"),
    (["--grid", "reg=0.1,0.2", "--reg", "0.1"], "--grid reg", "both fixed and a grid axis"),
    (["--grid", "lr=0.5", "--grid", "lr=0.1"], "--grid lr", "given twice"),
    (["--grid", "hidden=64,64"], "--grid", "written 64x64"),
    (["--name", "a/b"], "--name", "is not a name"),
])
def test_a_bad_grid_is_one_usage_error_before_anything_runs(tmp_path, args, flag, words):
    result = invoke(*args, "--out", tmp_path / "s")
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert f"Invalid value for '{flag}'" in text and words in text, text
    assert not (tmp_path / "s").exists()


def test_every_trial_is_resolved_and_validated_up_front():
    # one bad combination deep in the grid is caught before any trial runs
    spec = Sweep(grid={"loss": ["softmax", "svm"], "label_smoothing": [0.0, 0.1]})
    with pytest.raises(ConfigError, match="softmax loss only"):
        expand(spec)


def test_trial_key_hashes_the_resolved_config(monkeypatch):
    implicit = expand(Sweep(fixed={"epochs": 30}, grid={"seed": [0]}))[0]
    explicit = expand(Sweep(fixed={"epochs": 30, "reg": 1e-3, "lr": 1, "hidden": [100]},
                                grid={"seed": [0]}))[0]
    assert implicit.key == explicit.key and len(implicit.key) == 16
    other = expand(Sweep(fixed={"epochs": 30}, grid={"seed": [1]}))[0]
    assert other.key != implicit.key
    monkeypatch.setattr(store_module, "RESULT_SCHEMA_VERSION", RESULT_SCHEMA_VERSION + 1)
    assert expand(Sweep(fixed={"epochs": 30}, grid={"seed": [0]}))[0].key != implicit.key


def test_toml_file_round_trips_and_matches_the_command_line(tmp_path):
    file = tmp_path / "sweep.toml"
    file.write_text('name = "quick"\nseeds = "0-1"\n[fixed]\nepochs = 30\npoints = 30\n'
                    'val_size = 0.2\n[grid]\nhidden = [3, 20]\nreg = [0.001, 0.1]\n')
    from_file = build_sweep(config=file)
    from_cli = build_sweep(["hidden=3,20", "reg=0.001,0.1"], "0-1",
                          fixed={"epochs": 30, "points": 30, "val_size": 0.2})
    assert [t.key for t in expand(from_file)] == [t.key for t in expand(from_cli)]
    again = sweep_from_toml(sweep_to_toml(from_file))
    assert [t.key for t in expand(again)] == [t.key for t in expand(from_file)]
    assert again.name == "quick"
    nested = sweep_from_toml('[grid]\nhidden = [[64, 64], "32x16", "none"]\n')
    assert nested.grid["hidden"] == [[64, 64], [32, 16], []]


def test_bad_toml_names_the_config_file(tmp_path):
    file = tmp_path / "bad.toml"
    file.write_text("[grid]\nhidden = [3,\n")
    result = invoke("--config", file)
    assert result.exit_code == 2 and "Invalid value for '--config'" in flat(result.output)
    file.write_text("[grid]\nreg = []\n")
    assert "no values" in flat(invoke("--config", file).output)


def test_default_sweep_is_a_named_grid_on_the_spiral():
    spec = build_sweep()
    trials = expand(spec)
    assert spec.name == "default" and list(spec.grid) == ["hidden", "reg", "seed"]
    assert len(trials) == 80 and {t.config.data for t in trials} == {"spiral"}
    assert all(t.config.val_size == 0.2 for t in trials)
    changed = build_sweep(fixed={"epochs": 30}, seeds="0-1")
    assert changed.name is None and changed.grid["seed"] == [0, 1]
    assert len(expand(changed)) == 32 and changed.fixed["epochs"] == 30


# ---- results -------------------------------------------------------------------
def test_sweep_writes_results_summary_curves_models_and_spec(tmp_path):
    out = tmp_path / "s"
    result = invoke(*QUICK, "--out", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "Sweep summary" in result.output and "8 trials: 8 ok" in flat(result.output)
    results = pd.read_csv(out / "results.csv")
    assert tuple(results.columns) == RESULT_COLUMNS and len(results) == 8
    assert results["trial_key"].is_unique and set(results["status"]) == {"ok"}
    assert sorted(results["hidden"].astype(str).unique()) == ["20", "3"]
    assert set(results["seed"]) == {0, 1} and set(results["epochs_run"]) == {30}
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and set(summary["n_ok"]) == {2} and "seed" not in summary
    for metric in ("final_val_acc", "final_train_loss", "epochs_run", "seconds"):
        assert {f"{s}_{metric}" for s in ("mean", "std", "min", "max")} <= set(summary.columns)
    for key in results["trial_key"]:
        curve = pd.read_csv(out / "curves" / f"{key}.csv")
        assert curve["epoch"].tolist() == list(range(1, 31))
        assert Network.load(out / "models" / f"{key}.npz").metadata["data"] == "spiral"
    assert "[grid]" in (out / "sweep.toml").read_text()


def test_summary_is_mean_std_min_max_over_the_ok_seeds():
    """Known values: losses 0.5 and 0.7 over two ok seeds of one configuration (mean 0.6,
    std 0.1 with ddof 0), a diverged and a failed seed that count but do not average."""
    rows = []
    for hidden, seed, status, loss in [("3", 0, "ok", "0.5"), ("3", 1, "ok", "0.7"),
                                       ("3", 2, "diverged", "9.0"), ("20", 0, "failed", ""),
                                       ("20", 1, "ok", "0.25")]:
        row = dict.fromkeys(RESULT_COLUMNS, "")
        row.update(trial_key=f"{hidden}-{seed}", status=status, hidden=hidden, seed=str(seed),
                   final_train_loss=loss, epochs_run="30", seconds="1.5")
        rows.append(row)
    summary = summarize(pd.DataFrame(rows, columns=list(RESULT_COLUMNS))).set_index("hidden")
    three, twenty = summary.loc["3"], summary.loc["20"]
    assert three["mean_final_train_loss"] == pytest.approx(0.6, rel=1e-15)
    assert three["std_final_train_loss"] == pytest.approx(0.1, rel=1e-14)
    assert (three["min_final_train_loss"], three["max_final_train_loss"]) == (0.5, 0.7)
    assert (three["n_ok"], three["n_diverged"], three["n_failed"]) == (2, 1, 0)
    assert twenty["mean_final_train_loss"] == 0.25 and twenty["std_final_train_loss"] == 0.0
    assert (twenty["n_ok"], twenty["n_diverged"], twenty["n_failed"]) == (1, 0, 1)
    assert np.isnan(three["mean_final_val_acc"])            # no validation split: no number


def test_dry_run_lists_trials_and_writes_nothing(tmp_path):
    result = invoke(*QUICK, "--out", tmp_path / "s", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "8 trials" in result.output and "to run" in result.output
    assert not (tmp_path / "s").exists()


def test_default_out_is_derived_from_the_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*QUICK, "--dry-run")
    assert result.exit_code == 0
    name = next(w for w in flat(result.output).split() if w.startswith("runs/sweep-spiral-"))
    assert name.startswith("runs/sweep-spiral-hidden-reg-seed-")
    assert name in flat(invoke(*QUICK, "--dry-run").output)       # same command, same place
    assert "runs/sweep-default" in flat(invoke("--dry-run").output)


# ---- resume ---------------------------------------------------------------------
def test_rerun_skips_every_finished_trial(tmp_path):
    first = run_sweep(QUICK_SPEC, tmp_path, workers=0)
    before = (tmp_path / "results.csv").read_bytes()
    result = invoke(*QUICK, "--out", tmp_path, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "skipping 8 finished trial(s) of 8" in result.output
    assert (tmp_path / "results.csv").read_bytes() == before and first.ran == 8


def test_torn_last_line_is_repaired_and_its_trial_rerun(tmp_path):
    run_sweep(QUICK_SPEC, tmp_path, workers=0)
    expected = numbers(tmp_path)
    path = tmp_path / "results.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])         # killed mid-append
    torn_key = lines[-1][:16].decode()
    outcome = run_sweep(QUICK_SPEC, tmp_path, workers=0)
    assert outcome.ran == 1 and outcome.skipped == 7
    assert path.read_bytes().endswith(b"\n") and len(path.read_bytes().splitlines()) == 9
    assert numbers(tmp_path) == expected and torn_key in expected


def test_a_curve_without_its_row_is_replaced_on_resume(tmp_path):
    run_sweep(QUICK_SPEC, tmp_path, workers=0)
    stray = tmp_path / "curves" / "0123456789abcdef.csv"
    stray.write_text("epoch\n")
    run_sweep(QUICK_SPEC, tmp_path, workers=0)
    assert not stray.exists()
    assert len(list((tmp_path / "curves").iterdir())) == 8


def test_a_changed_spec_is_refused_unless_forced(tmp_path):
    assert invoke(*QUICK, "--out", tmp_path, "--workers", "0").exit_code == 0
    changed = ["--grid", "hidden=3,50", "--grid", "reg=0.001,0.1", "--seeds", "0-1",
               "--epochs", "30", "--points", "30", "--val-size", "0.2"]
    result = invoke(*changed, "--out", tmp_path, "--workers", "0")
    assert result.exit_code == 2 and "holds a different sweep" in flat(result.output)
    result = invoke(*changed, "--out", tmp_path, "--workers", "0", "--force")
    assert result.exit_code == 0, result.output
    assert "skipping 4 finished" in result.output              # hidden=3 is shared
    results = pd.read_csv(tmp_path / "results.csv")
    assert sorted(results["hidden"].unique()) == [3, 50] and len(results) == 8
    assert len(list((tmp_path / "curves").iterdir())) == 8
    assert "50" in (tmp_path / "sweep.toml").read_text()


def test_a_directory_that_is_not_a_sweep_is_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke(*QUICK, "--out", tmp_path, "--workers", "0")
    assert result.exit_code == 2 and "holds no sweep" in flat(result.output)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_directory_in_use_is_locked(tmp_path):
    with SweepStore.open(tmp_path), pytest.raises(BusyError, match="another nnx process"):
        with SweepStore.open(tmp_path):
            pass


# ---- failed and diverged trials --------------------------------------------------
def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    break_trials(monkeypatch, [3])
    result = invoke(*QUICK, "--out", tmp_path, "--workers", "0")
    assert result.exit_code == 1
    assert "4 trial(s) failed" in flat(result.output)
    results = pd.read_csv(tmp_path / "results.csv")
    failed = results[results["status"] == "failed"]
    assert len(failed) == 4 and set(failed["hidden"]) == {3}
    assert set(failed["error"]) == {"RuntimeError: boom second line"}
    assert set(results[results["status"] == "ok"]["hidden"]) == {20}
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary.set_index("hidden")["n_failed"].to_dict() == {3: 2, 20: 0}
    assert not any((tmp_path / "models" / f"{k}.npz").exists() for k in failed["trial_key"])


def test_failed_trials_rerun_only_with_retry_failed(tmp_path, monkeypatch):
    break_trials(monkeypatch, [3])
    run_sweep(QUICK_SPEC, tmp_path, workers=0)
    monkeypatch.undo()                                   # the bug is fixed
    again = run_sweep(QUICK_SPEC, tmp_path, workers=0)
    assert again.ran == 0 and again.count("failed") == 4
    retried = run_sweep(QUICK_SPEC, tmp_path, workers=0, retry_failed=True)
    assert retried.ran == 4 and retried.count("ok") == 8
    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == 8 and results["trial_key"].is_unique


def test_a_diverging_trial_is_recorded_as_diverged(tmp_path):
    result = invoke("--grid", "lr=1,1e9", "--epochs", "30", "--points", "30", "--val-size",
                    "0.2", "--hidden", "20", "--out", tmp_path, "--workers", "0")
    assert result.exit_code == 0, result.output
    results = pd.read_csv(tmp_path / "results.csv").set_index("lr")
    assert results.loc[1e9, "status"] == "diverged" and results.loc[1.0, "status"] == "ok"
    assert results.loc[1e9, "epochs_run"] < 30 and np.isnan(results.loc[1e9, "final_val_acc"])
    assert (tmp_path / "curves" / f"{results.loc[1e9, 'trial_key']}.csv").exists()
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("lr")
    assert summary.loc[1e9, "n_diverged"] == 1 and summary.loc[1e9, "n_ok"] == 0


# ---- backends --------------------------------------------------------------------
def test_serial_process_and_dask_results_are_bit_identical(tmp_path):
    distributed = pytest.importorskip("distributed")
    run_sweep(QUICK_SPEC, tmp_path / "serial", workers=0)
    run_sweep(QUICK_SPEC, tmp_path / "processes", workers=2)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        run_sweep(QUICK_SPEC, tmp_path / "dask", scheduler=cluster.scheduler_address)
    serial = numbers(tmp_path / "serial")
    assert len(serial) == 8
    assert numbers(tmp_path / "processes") == serial and numbers(tmp_path / "dask") == serial
    for key in serial:
        a = Network.load(tmp_path / "serial" / "models" / f"{key}.npz")
        b = Network.load(tmp_path / "dask" / "models" / f"{key}.npz")
        assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


def test_an_unreachable_scheduler_is_a_usage_error_that_creates_nothing(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT", "0.5s")
    result = invoke(*QUICK, "--out", tmp_path / "s", "--scheduler", "tcp://127.0.0.1:9")
    assert result.exit_code == 2 and "--scheduler" in flat(result.output)
    assert not (tmp_path / "s").exists()


# `nnx sweep` in a child that says so (through the file descriptor in argv[1]) once
# KILL_AFTER rows are written, and waits to be killed with its workers.
KILL_AFTER = 3
CHILD = f"""
import os, sys, threading
from experiments.store import SweepStore
from cli.app import app

ready, append = int(sys.argv[1]), SweepStore.append

def append_then_wait(self, trial, record):
    row = append(self, trial, record)
    if len(self.read_rows()) == {KILL_AFTER}:
        os.write(ready, b"appended")
        threading.Event().wait()
    return row

SweepStore.append = append_then_wait
app(sys.argv[2:], prog_name="nnx")
"""


@pytest.mark.slow
def test_kill_and_resume_finds_every_trial_exactly_once(tmp_path):
    """SIGKILL a running sweep, tear its last line, resume: same trials, same numbers."""
    args = ["sweep", "--grid", "hidden=5,10,20,30", "--seeds", "0-3", "--epochs", "600",
            "--points", "30", "--val-size", "0.2", "--workers", "1", "--out", str(tmp_path / "killed")]
    results = tmp_path / "killed" / "results.csv"
    assert kill_when_ready(CHILD, args, ROOT) == b"appended"
    done = results.read_bytes().count(b"\n") - 1
    assert done == KILL_AFTER
    with open(results, "ab") as f:
        f.write(b"0123456789abcdef,ok,spiral,30,3,")                # a torn append
    resumed = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping {done} finished trial(s) of 16" in resumed.stdout
    spec = build_sweep(["hidden=5,10,20,30"], "0-3",
                      fixed={"epochs": 600, "points": 30, "val_size": 0.2})
    run_sweep(spec, tmp_path / "uninterrupted", workers=0)
    rows = pd.read_csv(results)
    assert len(rows) == 16 and rows["trial_key"].is_unique
    assert numbers(tmp_path / "killed") == numbers(tmp_path / "uninterrupted")


def test_a_sweep_of_nnx_0_1_resumes_with_its_rows_carried_over(tmp_path):
    """tests/data/sweep-nnx-0.1.0 was written by nnx 0.1 (options model, val_fraction,
    gamma; the key in column "trial"). Its rows are upgraded in place and re-keyed
    with their files; the two trials with a 2D validation split run again, because
    the split is now drawn by the stratified split every data set shares."""
    import shutil
    old = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "data" / "sweep-nnx-0.1.0", old)
    before = pd.read_csv(old / "results.csv")
    kept = before[before["val_fraction"] == 0.0]
    result = invoke("--config", old / "sweep.toml", "--out", old, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "skipping 2 finished trial(s) of 4; 2 to run" in flat(result.output)
    after = pd.read_csv(old / "results.csv")
    assert list(after.columns) == list(RESULT_COLUMNS) and len(after) == 4
    carried = after[after["finished"].isin(kept["finished"])]
    assert sorted(carried["final_train_loss"]) == sorted(kept["final_train_loss"])
    for key in after["trial_key"]:
        assert (old / "curves" / f"{key}.csv").exists() and (old / "models" / f"{key}.npz").exists()
    assert sorted(p.stem for p in (old / "models").iterdir()) == sorted(after["trial_key"])
    # the carried rows are what today's nnx computes for those trials: to 1e-10, as a
    # 2D MLP now trains in a stack (other operations than nnx 0.1's layers)
    fresh = tmp_path / "fresh"
    assert invoke("--config", old / "sweep.toml", "--out", fresh, "--workers", 0).exit_code == 0
    assert_same_numbers(fresh, old)


# ---- stacks ----------------------------------------------------------------------
# hidden 3 and 5 share a width group (3 is padded to 5); 20 trains unpadded
STACKED = ["--grid", "hidden=3,5,20", "--grid", "reg=0.001,0.1", "--seeds", "0-2", "--grid",
           "lr=0.5,1", "--epochs", "40", "--points", "30", "--val-size", "0.2", "--batch-size", "16",
           "--dropout", "0.1", "--patience", "15"]


@pytest.mark.numerics
def test_a_stacked_sweep_gives_the_numbers_of_trials_run_one_by_one(tmp_path):
    """Every trial's row and curve from stacks equal those of --stack-size 1: bit for bit for
    trials as wide as their stack, to 1e-10 of the array's magnitude for padded ones."""

    from experiments.stacks import width_groups
    from experiments.sweep import plan
    assert invoke(*STACKED, "--out", tmp_path / "one", "--workers", "0", "--stack-size", "1").exit_code == 0
    result = invoke(*STACKED, "--out", tmp_path / "stacked", "--workers", "0")
    assert result.exit_code == 0, result.output
    trials, _ = plan(build_sweep(["hidden=3,5,20", "reg=0.001,0.1", "lr=0.5,1"], "0-2",
                                 fixed={"epochs": 40, "points": 30, "val_size": 0.2, "batch_size": 16,
                                        "dropout": 0.1, "patience": 15}))
    padded = {t.key for t, widths in ((t, width_groups(trials)[t.key]) for t in trials)
              if tuple(t.config.hidden) != widths}
    assert len(padded) == 12 and len(trials) == 36
    one = pd.read_csv(tmp_path / "one" / "results.csv").set_index("trial_key")
    stacked = pd.read_csv(tmp_path / "stacked" / "results.csv").set_index("trial_key")
    assert sorted(one.index) == sorted(stacked.index)
    stacked = stacked.loc[one.index]
    assert (one["status"] == stacked["status"]).all() and (one["epochs_run"] == stacked["epochs_run"]).all()
    assert (stacked["epochs_run"] < 40).any()                      # some stopped early
    for key in one.index:
        a = pd.read_csv(tmp_path / "stacked" / "curves" / f"{key}.csv").drop(columns="seconds")
        b = pd.read_csv(tmp_path / "one" / "curves" / f"{key}.csv").drop(columns="seconds")
        metrics = [*FINAL_COLUMNS]
        if key in padded:
            assert_close(stacked.loc[key, metrics].to_numpy(float), one.loc[key, metrics].to_numpy(float),
                         1e-10)
            assert_close(a.to_numpy(float), b.to_numpy(float), 1e-10)
        else:
            assert (stacked.loc[key, metrics] == one.loc[key, metrics]).all(), key
            pd.testing.assert_frame_equal(a, b)
    models = [Network.load(tmp_path / d / "models" / f"{key}.npz") for d in ("one", "stacked")
              for key in [one.index[0]]]
    for name in models[0].params:
        assert_close(models[1].params[name], models[0].params[name], 1e-10)


def test_stacks_are_planned_from_the_whole_sweep_not_from_what_is_left():
    """A trial's padded width depends on the sweep's trials alone: a resumed sweep, another
    stack size or another number of workers pads it the same, so it gets the same bits."""
    from experiments.stacks import pack, width_groups
    trials = expand(build_sweep(["hidden=3,4,5,50,60,200", "reg=0.001,0.1"], "0-3",
                                fixed={"epochs": 30, "points": 30}))
    widths = width_groups(trials)
    assert {widths[t.key] for t in trials if t.config.hidden == [3]} == {(5,)}      # 3, 4, 5 share
    assert {widths[t.key] for t in trials if t.config.hidden == [200]} == {(200,)}  # alone
    for todo, size, workers in ((trials, None, 1), (trials[5:17], 4, 2), (trials[::3], 2, 8)):
        for stack in pack(trials, todo, size, workers):
            assert all(widths[t.key] == stack.widths for t in stack.trials)
            assert len(stack.trials) <= (size or 64)
        assert sorted(t.key for s in pack(trials, todo, size, workers) for t in s.trials) == \
            sorted(t.key for t in todo)
    assert all(len(s.trials) == 1 and s.widths is None for s in pack(trials, trials, 1, 2))


def test_trials_that_cannot_share_a_stack_train_alone():
    from experiments.stacks import pack, stack_key
    trials = expand(build_sweep(["time_budget=5,9"], "0-1", fixed={"epochs": 30}))
    assert all(stack_key(t.config) is None for t in trials)
    assert [s.widths for s in pack(trials, trials)] == [None] * 4
    images = expand(build_sweep(["reg=0.1,0.2"], fixed={"data": "cifar10"}))
    assert [s.widths for s in pack(images, images)] == [None, None]
    lookahead = expand(build_sweep(["ema_decay=0.9,0.95"], fixed={"epochs": 30}))
    assert all(stack_key(t.config) is None for t in lookahead)      # Lookahead runs in Trainer
    mixed = expand(build_sweep(["optimizer=sgd,adam", "hidden=8,8x8"], "0-1", fixed={"epochs": 30}))
    assert all(len({(t.config.optimizer, len(t.config.hidden)) for t in s.trials}) == 1
               for s in pack(mixed, mixed))


def test_the_stack_key_holds_what_a_2d_trial_shares_with_its_stack():
    """Per-trial options (weight decay among them) and options of image data or
    BatchNorm, which a 2D MLP does not use, leave the key alone; what every trial of a
    stack must share changes it."""
    from dataclasses import replace

    from experiments.config import TrainConfig, resolve
    from experiments.stacks import stack_key
    base = TrainConfig(data="spiral", epochs=30, optimizer="momentum")
    key = stack_key(resolve(base))
    for change in ({"weight_decay": 0.01}, {"seed": 3}, {"lr": 0.1}, {"momentum": 0.5}, {"reg": 0.1},
                   {"hidden": [7]}, {"schedule": "linear", "warmup": 2, "warmup_from": 0.1},
                   {"flip": "alternating"}, {"pad": "reflect"}, {"shift": 4}, {"bn_decay": 0.5},
                   {"bn_eps": 1e-3}, {"bn_scale": False}, {"bn_bias_lr": 2.0},
                   {"whiten_bias_epochs": 3}):
        assert stack_key(resolve(replace(base, **change))) == key, change
    for change in ({"optimizer": "adam"}, {"batch_size": 16}, {"points": 50}, {"hidden": [7, 7]},
                   {"epochs": 31}, {"activation": "tanh"}, {"data_seed": 1}):
        assert stack_key(resolve(replace(base, **change))) != key, change


def test_stack_size_is_a_sweep_option(tmp_path):
    result = invoke(*QUICK, "--out", tmp_path, "--stack-size", "0")
    assert result.exit_code == 2 and "--stack-size" in flat(result.output)
    result = invoke(*QUICK, "--out", tmp_path, "--workers", "0", "--stack-size", "3")
    assert result.exit_code == 0, result.output
    assert "8 trials: 8 ok" in flat(result.output)
    assert "stack_size" not in (tmp_path / "sweep.toml").read_text()
