"""Sweeps of small networks: trials stacked (the default) against one at a time.

    python bench/bench_sweep.py [--workers 2] [--repeats 1]
        the default sweep (`nnx sweep`: 80 trials, 4,000 full-batch epochs) with stacks
        and with --stack-size 1, from empty directories, in turns, same workers; checks
        that both give the same numbers
    python bench/bench_sweep.py --in-process [--repeats 3]
        the same three ways in this one process (no workers, one core): stacked,
        --stack-size 1 (each trial a stack of one, as nnx train runs it) and each trial
        through the layer-by-layer Trainer (nnx's loop before stacks); CPU time, which
        other work on a shared machine moves least
    python bench/bench_sweep.py --study [--seeds 1000] [--dtype float64] [--out DIR]
        the seed-variance study: hidden 3 and 100 x reg 1e-3 and 1e-2 x 1,000 seeds, the
        default sweep's other options (4,000 trials); wall and CPU time, peak memory,
        and its variance plot (DIR/variance.png)
    python bench/bench_sweep.py --stack-sizes
        per trial, the time of an epoch in one stack of 1 to 64 spiral nets (hidden 3, 6,
        20, 100, the default sweep's): the measurement behind the default stack size
        (experiments/stacks.py), and what a stack gains each width over a stack of one
    python bench/bench_sweep.py --padding
        the width groups of a sweep of dense hidden sizes and the work padding adds
    python bench/bench_sweep.py --products [--seeds 1000]
        a floor under the seed-variance study: the time of its matrix products alone
        (the batched products a stack of 2-3-3 or 2-100-3 nets makes in one epoch and
        one validation pass, float64, one BLAS thread), against the float64 GEMM peak

Times are wall clock and the CPU time of the driver and its workers together; this
machine's cores may be shared with other work, which the CPU time is less moved by.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_mlp import machine  # noqa: E402
from experiments.store import FINAL_COLUMNS, METRIC_COLUMNS  # noqa: E402
from experiments.sweep import Sweep, default_sweep, run_sweep  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_sweep(sweep: Sweep, out: Path, workers: int, stack_size: int | None) -> tuple[float, float, dict]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    outcome = run_sweep(sweep, out, workers=workers, stack_size=stack_size)
    return time.perf_counter() - wall, cpu_seconds() - cpu, outcome.rows


def compare(a: dict, b: dict) -> tuple[int, float]:
    """How many trials' metrics are bit-identical, and the largest difference relative to
    each metric's magnitude over all trials."""
    same, worst = 0, 0.0
    for key, row in a.items():
        other = b[key]
        same += all(row[c] == other[c] for c in (*METRIC_COLUMNS, "status") if c != "seconds")
    for column in FINAL_COLUMNS:
        x = np.array([float(a[k][column]) for k in a])
        y = np.array([float(b[k][column]) for k in a])
        ok = np.isfinite(x) & np.isfinite(y)
        scale = np.max(np.abs(y[ok]), initial=0.0)
        if scale:
            worst = max(worst, float(np.max(np.abs(x[ok] - y[ok]))) / scale)
    return same, worst


def default_sweep_bench(workers: int, repeats: int) -> None:
    times = {"stacked": [], "one by one": []}
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(repeats):                        # in turns: drift hits both alike
            for name, size in (("stacked", None), ("one by one", 1)):
                wall, cpu, rows[name] = timed_sweep(default_sweep(), Path(folder) / f"{name}-{r}",
                                                    workers, size)
                times[name].append((wall, cpu))
                print(f"  {name:10s} run {r + 1}: {wall:6.1f} s wall, {cpu:6.1f} s CPU", flush=True)
    same, worst = compare(rows["stacked"], rows["one by one"])
    print(f"default sweep ({len(rows['stacked'])} trials, 4,000 epochs), {workers} workers, "
          f"median of {repeats}; {machine()}")
    median = {name: [statistics.median(v[i] for v in values) for i in (0, 1)]
              for name, values in times.items()}
    for name, (wall, cpu) in median.items():
        print(f"  {name:10s} {wall:7.1f} s wall  {cpu:7.1f} s CPU")
    print(f"  stacked is {median['one by one'][0] / median['stacked'][0]:.2f}x faster (wall), "
          f"{median['one by one'][1] / median['stacked'][1]:.2f}x (CPU)")
    print(f"  same numbers: {same} of {len(rows['stacked'])} trials bit-identical, the others within "
          f"{worst:.1e} of each metric's magnitude")


def in_process_bench(repeats: int) -> None:
    """The default sweep in this process, stacked, one stack of one per trial, and each
    trial through ``Trainer`` (``runner.trains_stacked`` patched to say no), in turns."""
    import experiments.runner as runner
    stacked_path = runner.trains_stacked
    ways = {"stacked": (None, stacked_path), "--stack-size 1": (1, stacked_path),
            "Trainer": (1, lambda config: False)}
    times = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as folder:
        try:
            for r in range(repeats):
                for name, (size, path) in ways.items():
                    runner.trains_stacked = path
                    cpu = time.process_time()
                    run_sweep(default_sweep(), Path(folder) / f"{name}-{r}", workers=0, stack_size=size)
                    times[name].append(time.process_time() - cpu)
                    print(f"  {name:15s} run {r + 1}: {times[name][-1]:6.1f} s CPU", flush=True)
        finally:
            runner.trains_stacked = stacked_path
    print(f"default sweep (80 trials, 4,000 epochs) in one process, median of {repeats}; {machine()}")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, cpu in median.items():
        ratio = "" if name == "stacked" else f"  (stacked {cpu / median['stacked']:.2f}x faster)"
        print(f"  {name:15s} {cpu:7.1f} s CPU{ratio}")


def variance_study(seeds: int, workers: int, out: Path | None, dtype: str = "float64") -> None:
    sweep = default_sweep()
    sweep.grid = {"hidden": [[3], [100]], "reg": [1e-3, 1e-2], "seed": list(range(seeds))}
    sweep.fixed["dtype"] = dtype
    sweep.name = f"variance-{seeds}-seeds"
    with tempfile.TemporaryDirectory() as folder:
        out = out or Path(folder) / "study"
        if (out / "results.csv").exists():
            sys.exit(f"{out} already holds a sweep: give an empty --out, so that every trial runs")
        wall, cpu, rows = timed_sweep(sweep, out, workers, None)
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        from experiments.plots import plot_variance
        plot_variance(out, out / "variance.png")
        ok = sum(row["status"] == "ok" for row in rows.values())
        print(f"variance study: {len(rows)} trials ({ok} ok) of 4,000 epochs, {dtype}, {workers} workers; "
              f"{machine()}")
        print(f"  {wall:.1f} s wall ({wall / 60:.2f} min), {cpu:.1f} s CPU")
        print(f"  peak RSS: driver {driver:.0f} MiB, largest worker {worker:.0f} MiB; together at most "
              f"{driver + workers * worker:.0f} MiB")
        print(f"  variance plot: {out / 'variance.png'}" + (" (removed with the temporary folder)"
                                                           if out.is_relative_to(folder) else ""))


def products_floor(seeds: int) -> None:
    """The study's matrix products alone, timed with the shapes and memory layouts
    ``mlp.stack.MLPStack`` gives them: per trial and epoch, the five products of a
    full-batch training step on 240 examples and the two of a validation pass on
    60, for a stack of the size the sweep would pick; then the study's total of
    them spread over two cores (everything else a stack does, costing nothing)."""
    from threadpoolctl import threadpool_limits

    from experiments.config import TrainConfig
    from experiments.stacks import auto_stack_size
    rng = np.random.default_rng(0)
    print(f"the variance study's matrix products alone ({seeds} seeds x 2 regs per hidden size, "
          f"4,000 epochs), float64, one BLAS thread; {machine()}")
    total = 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        a = rng.standard_normal((1024, 1024))
        peak = 2 * 1024 ** 3 / min(_seconds(lambda: a @ a) for _ in range(5)) / 1e9
        for h in (3, 100):
            t = auto_stack_size(TrainConfig(), (2, h, 3))
            epoch, flops = _epoch_products(h, t, rng)
            study = 2 * seeds * 4000 * epoch
            total += study
            print(f"  2-{h}-3, stacks of {t}: {epoch * 1e6:6.1f} us per trial and epoch, "
                  f"{flops / epoch / 1e9:5.1f} GFLOP/s; the study's {2 * seeds:,} such trials: "
                  f"{study:6.1f} s on one core")
    print(f"  float64 GEMM peak (1024^3 np.matmul, one thread): {peak:.0f} GFLOP/s")
    print(f"  the products alone, on two cores: {total / 2:.0f} s "
          f"({total / 2 / 120:.2f}x the 2-minute target)")


def _epoch_products(h: int, t: int, rng) -> tuple[float, float]:
    """Seconds and FLOPs per trial of one epoch's products in a stack of t 2-h-3 nets:
    [x, 1] @ [W1; b1], the output layer's product, and in training the weight
    gradients and the hidden gradient, on 240 training and 60 validation rows."""
    from mlp.stack import WIDE
    W1, W2 = rng.standard_normal((t, 3, h)), rng.standard_normal((t, h + 1, 3))
    W2T = W2[:, :-1].transpose(0, 2, 1)
    g1, g2 = np.empty((t, 3, h)), np.empty((t, h + 1, 3))
    calls, flops = [], 0
    for n, train in ((240, True), (60, False)):
        x = np.concatenate([rng.standard_normal((n, 2)), np.ones((n, 1))], axis=1)
        z, dz = np.empty((t, n, h + 1)), np.empty((t, n, h + 1))
        d, scores = rng.standard_normal((t, n, 3)), np.empty((t, n, 3))
        calls.append(lambda x=x, z=z: np.matmul(x, W1, out=z[..., :-1]))
        if h + 1 >= WIDE:
            calls.append(lambda z=z, s=scores: np.matmul(z, W2, out=s))
        else:
            calls.append(lambda z=z: np.matmul(W2.transpose(0, 2, 1), z.transpose(0, 2, 1)))
        flops += 2 * n * (3 * h + (h + 1) * 3)
        if train:
            calls += [lambda z=z, d=d: np.matmul(z.transpose(0, 2, 1), d, out=g2),
                      lambda d=d, dz=dz: np.matmul(d, W2T, out=dz[..., :-1]),
                      lambda x=x, dz=dz: np.matmul(x.T, dz[..., :-1], out=g1)]
            flops += 2 * n * ((h + 1) * 3 + 3 * h + 3 * h)
    seconds = statistics.median(_seconds(lambda: [c() for c in calls]) for _ in range(200)) / t
    return seconds, flops


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def stack_sizes() -> None:
    from threadpoolctl import threadpool_limits

    from experiments.datasets import make_2d
    from mlp.network import build_mlp
    from mlp.optim import SGD
    from mlp.stack_trainer import StackTrainer
    data = make_2d("spiral", 100, 3, None, 0, 0.2)
    sizes, hidden = (1, 4, 8, 16, 32, 64), (3, 6, 20, 100)

    def per_trial_epoch(h: int, t: int) -> float:
        epochs = max(40, 2000 // t // (4 if h > 50 else 1))
        trainer = StackTrainer([build_mlp(2, [h], 3, reg=1e-3, seed=s) for s in range(t)],
                               [SGD(1.0) for _ in range(t)], data.X_train, data.y_train,
                               X_val=data.X_val, y_val=data.y_val, seeds=list(range(t)))
        cpu = time.process_time()
        trainer.train(epochs)
        return (time.process_time() - cpu) / epochs / t

    times = {(h, t): [] for h in hidden for t in sizes}
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(3):
            for key in times:
                times[key].append(per_trial_epoch(*key))
    print(f"one stack of T spiral nets (240 training points, 60 for validation): CPU us per trial "
          f"and epoch, median of 3; {machine()}")
    print("  hidden " + "".join(f"{f'T={t}':>9s}" for t in sizes))
    for h in hidden:
        print(f"  {h:6d} " + "".join(f"{statistics.median(times[h, t]) * 1e6:9.1f}" for t in sizes))


def padding_waste() -> None:
    """How much work padding adds when a sweep's hidden sizes are dense: the width groups
    of hidden 2, 4, ..., 100 (5 seeds each) and their padded work over their own."""
    from experiments.stacks import pack, trial_cost, width_groups
    from experiments.sweep import build_sweep, expand
    sizes = ",".join(str(h) for h in range(2, 101, 2))
    trials = expand(build_sweep([f"hidden={sizes}"], "0-4", fixed={"epochs": 4000}))
    widths = width_groups(trials)
    real = sum(trial_cost(t.config) for t in trials)
    padded = sum(trial_cost(t.config, widths[t.key]) for t in trials)
    groups = sorted({widths[t.key] for t in trials})
    print(f"hidden 2, 4, ..., 100 x 5 seeds ({len(trials)} trials): {len(groups)} width groups "
          f"{[g[0] for g in groups]}; padding adds {100 * (padded / real - 1):.1f} % to the work; "
          f"{len(pack(trials, trials, None, 2))} stacks on 2 workers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--study", action="store_true", help="run the seed-variance study too")
    parser.add_argument("--in-process", action="store_true", help="only compare stacked, stack size "
                        "1 and Trainer in this process")
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help="the study's dtype (--study)")
    parser.add_argument("--out", type=Path, help="where the study's sweep goes (default: a temporary folder)")
    parser.add_argument("--stack-sizes", action="store_true", help="only time stacks of 1 to 64 trials")
    parser.add_argument("--padding", action="store_true", help="only show what padding adds to a "
                        "sweep of dense hidden sizes")
    parser.add_argument("--products", action="store_true", help="only time the variance study's "
                        "matrix products (a floor under its time)")
    args = parser.parse_args()
    if args.products:
        products_floor(args.seeds)
        return
    if args.stack_sizes:
        stack_sizes()
        return
    if args.padding:
        padding_waste()
        return
    if args.in_process:
        in_process_bench(args.repeats)
        return
    default_sweep_bench(args.workers, args.repeats)
    if args.study:
        variance_study(args.seeds, args.workers, args.out, args.dtype)


if __name__ == "__main__":
    main()
