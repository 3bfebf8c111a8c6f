"""Where a ConvNet's training step spends its time: each layer's forward and backward.

    python bench/profile_conv.py [--model convnetjs] [--batch-size 128] [--steps 10]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from mlp.arch import build_network


def timed(fn, name: str, totals: dict):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - started
        return result
    return wrapper


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnetjs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    net = build_network(args.model, (3, 32, 32), 10, seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch_size, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.batch_size)
    for _ in range(3):
        net.loss(X, y)
    totals: dict[str, float] = {}
    for i, layer in enumerate(net.layers):
        layer.forward = timed(layer.forward, f"{i:2d} {layer.kind} forward", totals)
        layer.backward = timed(layer.backward, f"{i:2d} {layer.kind} backward", totals)
    started = time.perf_counter()
    for _ in range(args.steps):
        net.loss(X, y)
    step = (time.perf_counter() - started) / args.steps
    print(f"{args.model}, batch {args.batch_size}: {step * 1e3:.1f} ms per forward+backward, "
          f"{args.batch_size / step:,.0f} images/s")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {seconds / args.steps * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
