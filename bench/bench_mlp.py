"""Spiral MLP training speed: nnx against scikit-learn's MLPClassifier, side by side.

Same problem (cs231n spiral, 300 points, 3 classes), same architecture (2-100-3,
ReLU, softmax), full-batch SGD at lr 1 with L2, same number of epochs. "nnx" is
what `nnx train` runs: a stack of one (mlp/stack_trainer.py); "nnx solo Trainer"
is the layer-by-layer Trainer (mlp/train.py) that trained it before stacks, and
still trains ConvNets, for reference. The contenders are timed in turns, several
repetitions each, in one process; medians of wall time and of this process's CPU
time (the latter unmoved by other processes sharing the cores), and the speed ratio
as the median of each turn's ratio.

    python bench/bench_mlp.py [--epochs 2000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.datasets import spiral  # noqa: E402
from mlp.network import build_mlp  # noqa: E402
from mlp.optim import SGD  # noqa: E402
from mlp.stack_trainer import StackTrainer  # noqa: E402
from mlp.train import train  # noqa: E402


def machine() -> str:
    """The CPU model and the BLAS kernel, to print beside every figure."""
    from threadpoolctl import threadpool_info

    from experiments.environment import cpu_model
    model = cpu_model() or "unknown CPU"
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')} kernels)"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    load = os.getloadavg()[0]
    return f"{model}, {os.cpu_count()} cores, load {load:.1f}; BLAS: {', '.join(blas) or 'none'}"


def timed(fit) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fit()
    return time.perf_counter() - wall, time.process_time() - cpu


def nnx(X, y, epochs: int):
    net = build_mlp(2, [100], 3, reg=1e-3, seed=0)
    return lambda: StackTrainer([net], [SGD(1.0)], X, y).train(epochs)


def nnx_solo(X, y, epochs: int):
    net = build_mlp(2, [100], 3, reg=1e-3, seed=0)
    return lambda: train(net, SGD(1.0), X, y, epochs=epochs, batch_size=0)


def sklearn(X, y, epochs: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(100,), activation="relu", solver="sgd",
                        learning_rate_init=1.0, momentum=0.0, nesterovs_momentum=False,
                        batch_size=len(X), alpha=1e-3, max_iter=epochs, tol=0.0,
                        n_iter_no_change=epochs + 1, shuffle=False, random_state=0)

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
    return fit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    X, y = spiral(points=100, classes=3, seed=0)
    contenders = {"nnx": nnx, "nnx solo Trainer": nnx_solo, "sklearn": sklearn}
    try:
        import sklearn as _  # noqa: F401
    except ImportError:
        del contenders["sklearn"]
    from threadpoolctl import threadpool_limits
    times = {name: [] for name in contenders}
    with threadpool_limits(limits=1, user_api="blas"):       # one core each, as sweep workers
        for _ in range(args.repeats):                       # in turns: drift hits all alike
            for name, make in contenders.items():
                times[name].append(timed(make(X, y, args.epochs)))
    print(f"spiral MLP 2-100-3, full batch, {args.epochs} epochs, median of {args.repeats}")
    print(machine())
    print(f"{'':18s}{'ms/iter (wall)':>16s}{'ms/iter (CPU)':>16s}")
    per_iter = {}
    for name, values in times.items():
        per_iter[name] = [statistics.median(v[i] for v in values) / args.epochs * 1e3 for i in (0, 1)]
        print(f"{name:18s}{per_iter[name][0]:16.4f}{per_iter[name][1]:16.4f}")
    if "sklearn" in per_iter:
        # each turn's ratio, then their median: drift between turns moves both alike
        wall, cpu = (statistics.median(theirs[i] / ours[i] for theirs, ours in
                                       zip(times["sklearn"], times["nnx"], strict=True)) for i in (0, 1))
        print(f"speed ratio (sklearn time / nnx time, median of the turns' ratios): {wall:.2f}x wall, "
              f"{cpu:.2f}x CPU")
    else:
        print("scikit-learn is not installed (pip install -e '.[bench]'): nnx only")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
