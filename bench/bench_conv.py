"""Training throughput of the convnet presets, nnx against PyTorch on the CPU.

One step = forward + backward + SGD-momentum update on a batch of 128 random
CIFAR-shaped images (3x32x32, 10 classes, float32). Each framework gets a
warm-up, then the median of several timed repetitions is reported as images/s.

    python bench/bench_conv.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlp.arch import PRESETS, build_network  # noqa: E402
from mlp.optim import Momentum  # noqa: E402

BATCH, SHAPE, CLASSES = 128, (3, 32, 32), 10


def median_step_seconds(step, warmup: int, reps: int, steps_per_rep: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(steps_per_rep):
            step()
        times.append((time.perf_counter() - start) / steps_per_rep)
    return float(np.median(times))


def nnx_step(preset: str, X, y):
    net = build_network(preset, SHAPE, CLASSES, seed=0, dtype=np.float32)
    opt = Momentum(lr=1e-3, mu=0.9)

    def step():
        _, grads = net.loss(X, y, train=True)
        opt.step(net.params, grads)
    return step


def torch_model(preset: str, torch):
    nn = torch.nn
    if preset == "convnetjs":
        return nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(20, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(320, 10))
    if preset == "cs231n-3layer":
        return nn.Sequential(nn.Conv2d(3, 32, 7, padding=3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 16 * 16, 100), nn.ReLU(), nn.Linear(100, 10))
    raise ValueError(preset)


def torch_step(preset: str, X, y, torch):
    model = torch_model(preset, torch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(Xt), yt)
        loss.backward()
        opt.step()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args(argv)
    warmup, reps, steps = (1, 3, 1) if args.quick else (3, 7, 3)
    try:
        import torch
    except ImportError:
        torch = None
        print("note: PyTorch is not installed; showing nnx only")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH)
    threads = f", torch threads {torch.get_num_threads()}" if torch else ""
    print(f"batch {BATCH}, float32, {os.cpu_count()} CPUs{threads}; "
          f"median of {reps} x {steps} training steps after {warmup} warm-up")
    print(f"{'net':<15} {'nnx img/s':>10} {'torch img/s':>12} {'ratio':>6}")
    for preset in PRESETS:
        ours = BATCH / median_step_seconds(nnx_step(preset, X, y), warmup, reps, steps)
        if torch is None:
            print(f"{preset:<15} {ours:>10.0f} {'-':>12} {'-':>6}")
            continue
        theirs = BATCH / median_step_seconds(torch_step(preset, X, y, torch), warmup, reps, steps)
        print(f"{preset:<15} {ours:>10.0f} {theirs:>12.0f} {ours / theirs:>6.2f}")


if __name__ == "__main__":
    main()
