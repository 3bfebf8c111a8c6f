"""Wall time of the default sweep (`nnx sweep` with no options) on 1 and 2 workers.

Each run starts from an empty directory, so every trial trains. The second
worker should give >= 1.8x: trials are independent and each worker uses one
BLAS thread. Also checks that both runs produced the same numbers.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from experiments.store import METRIC_COLUMNS
from experiments.sweep import default_sweep, run_sweep


def timed_sweep(workers: int, root: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    outcome = run_sweep(default_sweep(), root / f"workers{workers}", workers=workers)
    return time.perf_counter() - started, outcome.rows


def numbers(rows: dict) -> dict:
    """Every row's metrics but the timings, which differ from run to run."""
    return {k: (row["status"], *(row[c] for c in METRIC_COLUMNS if c != "seconds"))
            for k, row in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        times, results = {}, {}
        for workers in args.workers:
            times[workers], results[workers] = timed_sweep(workers, Path(folder))
            trial_seconds = sum(float(row["seconds"]) for row in results[workers].values())
            print(f"default sweep ({len(results[workers])} trials), {workers} worker(s): "
                  f"{times[workers]:.1f} s; the trials' own times add up to {trial_seconds:.1f} s  "
                  f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
    base = args.workers[0]
    for workers in args.workers[1:]:
        same = numbers(results[workers]) == numbers(results[base])
        print(f"speed-up {workers} vs {base} worker(s): {times[base] / times[workers]:.2f}x; "
              f"identical results: {same}")


if __name__ == "__main__":
    main()
