"""The best validation epoch next to the final one: results.csv, summary.csv, and the
upgrade of results.csv files written before the best_* columns existed."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_same_numbers, flat
from typer.testing import CliRunner

from cli.app import app
from experiments.store import BEST_COLUMNS, RESULT_COLUMNS, SweepStore, best_of_history
from experiments.sweep import Sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SPEC = Sweep(fixed={"data": "moons", "points": 40, "epochs": 25, "val_size": 0.3, "optimizer": "adam",
                    "lr": 0.05, "batch_size": 8},
             grid={"hidden": [[3], [12]], "seed": [0, 1, 2]})


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return run_sweep(SPEC, tmp_path_factory.mktemp("best") / "sweep", workers=0).out


def test_best_columns_are_the_first_peak_of_each_trials_validation_accuracy(sweep_dir):
    results = pd.read_csv(sweep_dir / "results.csv")
    assert tuple(results.columns) == RESULT_COLUMNS
    moved = 0
    for _, row in results.iterrows():
        curve = pd.read_csv(sweep_dir / "curves" / f"{row['trial_key']}.csv")
        peak = int(np.argmax(curve["val_acc"].to_numpy()))       # argmax: the first on ties
        assert row["best_epoch"] == curve["epoch"][peak]
        assert row["best_val_acc"] == curve["val_acc"][peak]
        assert row["best_val_loss"] == curve["val_loss"][peak]
        assert row["best_val_acc"] >= row["final_val_acc"] - 1e-12
        moved += row["best_epoch"] != row["epochs_run"]
    assert moved, "every trial peaked at its last epoch: the test cannot tell best from final"


def test_summary_has_mean_std_min_max_of_the_best_columns(sweep_dir):
    results = pd.read_csv(sweep_dir / "results.csv")
    summary = pd.read_csv(sweep_dir / "summary.csv")
    for _, config in summary.iterrows():
        seeds = results[results["hidden"] == config["hidden"]]
        for metric in BEST_COLUMNS:
            values = seeds[metric].to_numpy(dtype=float)
            assert config[f"mean_{metric}"] == pytest.approx(values.mean(), abs=1e-15)
            assert config[f"std_{metric}"] == pytest.approx(values.std(), abs=1e-15)
            assert (config[f"min_{metric}"], config[f"max_{metric}"]) == (values.min(), values.max())


def test_best_of_history_skips_epochs_without_validation_and_keeps_the_first_peak():
    nan = float("nan")
    history = [{"epoch": 1, "val_acc": 0.5, "val_loss": 0.9}, {"epoch": 2, "val_acc": 0.7, "val_loss": 0.6},
               {"epoch": 3, "val_acc": 0.7, "val_loss": 0.5}, {"epoch": 4, "val_acc": 0.9, "val_loss": nan}]
    assert best_of_history(history) == {"best_epoch": 2, "best_val_acc": 0.7, "best_val_loss": 0.6}
    none = best_of_history([{"epoch": 1, "val_acc": nan, "val_loss": nan}])
    assert none["best_epoch"] is None and np.isnan(none["best_val_acc"])


def test_the_sweep_summary_table_shows_best_val_acc_beside_the_final(sweep_dir):
    result = runner.invoke(app, ["sweep", "--config", str(sweep_dir / "sweep.toml"), "--out",
                                 str(sweep_dir), "--workers", "0"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "val_acc" in text and "best val_acc" in text and "best epoch" in text
    summary = pd.read_csv(sweep_dir / "summary.csv")
    first = summary.iloc[0]
    assert f"{first['mean_best_val_acc']:.3f}±{first['std_best_val_acc']:.3f}" in text


def test_a_sweep_of_schema_2_gains_the_best_columns_without_running_again(tmp_path):
    """tests/data/sweep-results-schema-2 was written by nnx before the best_* columns
    (commit 247ef39): 2 seeds x validation split 0 and 0.25, with snapshots. Its rows
    are upgraded in place (new keys, files renamed), best_* computed from each curve;
    nothing runs again, and the numbers are what today's nnx computes."""
    old = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "data" / "sweep-results-schema-2", old)
    before = pd.read_csv(old / "results.csv")
    assert "best_val_acc" not in before
    result = runner.invoke(app, ["sweep", "--config", str(old / "sweep.toml"), "--out", str(old),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "skipping 4 finished trial(s) of 4; 0 to run" in flat(result.output)
    after = pd.read_csv(old / "results.csv")
    assert list(after.columns) == list(RESULT_COLUMNS) and len(after) == 4
    assert sorted(after["finished"]) == sorted(before["finished"])        # carried, not re-run
    assert not set(after["trial_key"]) & set(before["trial_key"])          # the schema is in the key
    for folder in ("curves", "models", "snapshots"):
        assert sorted(p.stem for p in (old / folder).iterdir()) == sorted(after["trial_key"])
    assert after["best_val_acc"].notna().sum() == 2                          # the two with validation
    assert "mean_best_val_acc" in pd.read_csv(old / "summary.csv")
    fresh = tmp_path / "fresh"
    assert runner.invoke(app, ["sweep", "--config", str(old / "sweep.toml"), "--out", str(fresh),
                               "--workers", "0"]).exit_code == 0
    assert_same_numbers(fresh, old)   # 1e-10: a 2D MLP now trains in a stack


def test_an_upgrade_killed_after_renaming_the_files_finds_them_renamed(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "data" / "sweep-results-schema-2", old)
    store = SweepStore(old)
    original = store.results_path.read_bytes()
    assert store.upgrade()
    upgraded = store.results_path.read_bytes()
    store.results_path.write_bytes(original)      # the kill: files renamed, results.csv not yet
    assert store.upgrade()
    assert store.results_path.read_bytes() == upgraded


def test_a_sweep_written_before_an_option_existed_resumes_without_running_again(sweep_dir, tmp_path):
    """A results.csv of schema 3 without a column for an option added since
    (--conv-algorithms, whose default computes as before and is left out of the trial
    key): its rows carry over under the same keys, the file gains the column, nothing
    runs again."""
    from experiments.store import KEYLESS_DEFAULTS
    old = tmp_path / "old"
    shutil.copytree(sweep_dir, old)
    before = pd.read_csv(old / "results.csv", dtype=str, keep_default_na=False)
    assert set(KEYLESS_DEFAULTS) <= set(before.columns)
    before.drop(columns=list(KEYLESS_DEFAULTS)).to_csv(old / "results.csv", index=False)
    (old / "summary.csv").unlink()
    result = runner.invoke(app, ["sweep", "--config", str(old / "sweep.toml"), "--out", str(old),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert f"skipping {len(before)} finished trial(s) of {len(before)}; 0 to run" in flat(result.output)
    after = pd.read_csv(old / "results.csv", dtype=str, keep_default_na=False)
    assert tuple(after.columns) == RESULT_COLUMNS
    pd.testing.assert_frame_equal(after, before)          # the same rows, keys and numbers
    assert (old / "summary.csv").exists()


def test_an_option_at_its_keyless_default_leaves_the_trial_keys_as_they_were():
    """The key of the default config is the one nnx computed before --conv-algorithms
    existed (commit e3b1f0a): existing sweeps keep their trials. Pinned, it is another."""
    import dataclasses

    from experiments.config import TrainConfig, resolve
    from experiments.store import trial_key
    config = resolve(TrainConfig())
    assert config.conv_algorithms == "auto" and trial_key(config) == "fe41ef14e9fdf1a0"
    assert trial_key(dataclasses.replace(config, conv_algorithms="0:im2col")) != trial_key(config)
