"""Spiral MLP training speed: nnx against scikit-learn's MLPClassifier, side by side.

Same problem (cs231n spiral, 300 points, 3 classes), same architecture (2-100-3,
ReLU, softmax), full-batch SGD at lr 1 with L2, same number of epochs; the
median of several repetitions of each, measured in one process.

    python bench/bench_mlp.py [--epochs 2000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np

from experiments.datasets import spiral
from mlp.network import build_mlp
from mlp.optim import SGD
from mlp.train import train


def time_nnx(X, y, epochs: int) -> float:
    net = build_mlp(2, [100], 3, reg=1e-3, seed=0)
    started = time.perf_counter()
    train(net, SGD(1.0), X, y, epochs=epochs, batch_size=0)
    return time.perf_counter() - started


def time_sklearn(X, y, epochs: int) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(100,), activation="relu", solver="sgd",
                        learning_rate_init=1.0, momentum=0.0, nesterovs_momentum=False,
                        batch_size=len(X), alpha=1e-3, max_iter=epochs, tol=0.0,
                        n_iter_no_change=epochs + 1, shuffle=False, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        started = time.perf_counter()
        clf.fit(X, y)
        return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    X, y = spiral(points=100, classes=3, seed=0)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        sklearn = None
    nnx_times, sk_times = [], []
    for _ in range(args.repeats):              # interleaved so drift hits both alike
        nnx_times.append(time_nnx(X, y, args.epochs))
        if sklearn is not None:
            sk_times.append(time_sklearn(X, y, args.epochs))
    nnx_ms = statistics.median(nnx_times) / args.epochs * 1e3
    print(f"spiral MLP 2-100-3, full batch, {args.epochs} epochs, median of {args.repeats}")
    print(f"{'':12s}{'ms/iter':>10s}")
    print(f"{'nnx':12s}{nnx_ms:10.4f}")
    if sk_times:
        sk_ms = statistics.median(sk_times) / args.epochs * 1e3
        print(f"{'sklearn':12s}{sk_ms:10.4f}")
        print(f"speed ratio (sklearn time / nnx time): {sk_ms / nnx_ms:.2f}x")
    else:
        print("scikit-learn is not installed (pip install -e '.[bench]'): nnx only")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
