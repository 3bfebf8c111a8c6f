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

# Networks benchmarked beside the presets. airbench: the network of the 94 % issue
# (airbench94's layout: a 2x2 whitening conv 3->24 without padding, 32 -> 31, then
# conv groups of 64/256/256 filters, conv-pool-bn-act-conv-bn-act, a final 3x3
# max-pool to 1x1), ReLU standing in for GELU until its preset exists.
SPECS = {
    "airbench": "conv24x2p0-conv64x3-pool2-bn-conv64x3-bn-conv256x3-pool2-bn-conv256x3-bn-"
                "conv256x3-pool2-bn-conv256x3-bn-pool3-fc10",
}


def step_seconds(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def interleaved(steps: dict, warmup: int, reps: int, steps_per_rep: int) -> dict:
    """Median seconds per step of each contender, timed in turns within every
    repetition, so that a noisy neighbour slows both alike; also the median of
    the per-repetition ratios nnx/torch time."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(step_seconds(step, steps_per_rep))
    medians = {name: float(np.median(t)) for name, t in times.items()}
    if "torch" in times:
        medians["ratio"] = float(np.median(np.array(times["torch"]) / np.array(times["nnx"])))
    return medians


def nnx_step(preset: str, X, y):
    net = build_network(preset, SHAPE, CLASSES, seed=0, dtype=np.float32)
    opt = Momentum(lr=1e-3, mu=0.9)

    def step():
        _, grads = net.loss(X, y, train=True)
        opt.step(net.params, grads)
    return step


def torch_model(net, torch):
    """The same network in PyTorch, layer for layer, built from the nnx one (so every
    preset and spec is mirrored, with nothing written twice)."""
    nn = torch.nn
    modules, flat = [], False
    for layer in net.layers:
        if layer.kind == "conv2d":
            modules.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                     layer.stride, layer.padding))
        elif layer.kind == "maxpool2d":
            modules.append(nn.MaxPool2d(layer.pool_size, layer.stride))
        elif layer.kind == "batchnorm":
            modules.append((nn.BatchNorm1d if flat else nn.BatchNorm2d)(layer.num_features))
        elif layer.kind == "linear":
            modules += [nn.Flatten(), nn.Linear(layer.in_features, layer.out_features)]
            flat = True
        elif layer.kind == "relu":
            modules.append(nn.ReLU())
        elif layer.kind == "tanh":
            modules.append(nn.Tanh())
        elif layer.kind == "gelu":
            modules.append(nn.GELU(approximate="tanh"))
        elif layer.kind == "dropout":
            modules.append(nn.Dropout(layer.p))
        elif layer.kind == "flatten":
            flat = True
        else:
            raise ValueError(f"no PyTorch twin for layer {layer.kind!r}")
    return nn.Sequential(*modules)


def torch_step(preset: str, X, y, torch):
    model = torch_model(build_network(preset, SHAPE, CLASSES, seed=0), torch)
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
    warmup, reps, steps_per_rep = (1, 3, 1) if args.quick else (3, 9, 3)
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
          f"median of {reps} x {steps_per_rep} training steps after {warmup} warm-up, nnx and torch "
          f"in turns; ratio = median over repetitions of nnx/torch throughput")
    print(f"{'net':<15} {'nnx img/s':>10} {'torch img/s':>12} {'ratio':>6}")
    for preset in PRESETS:
        steps = {"nnx": nnx_step(preset, X, y)}
        if torch is not None:
            steps["torch"] = torch_step(preset, X, y, torch)
        m = interleaved(steps, warmup, reps, steps_per_rep)
        theirs = f"{BATCH / m['torch']:>12.0f} {m['ratio']:>6.2f}" if torch else f"{'-':>12} {'-':>6}"
        print(f"{preset:<15} {BATCH / m['nnx']:>10.0f} {theirs}", flush=True)


if __name__ == "__main__":
    main()
