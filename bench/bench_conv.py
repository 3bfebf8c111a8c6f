"""Training throughput of the convnet presets, nnx against PyTorch on the CPU.

One step = forward + backward + SGD-momentum update on a batch of 128 random
CIFAR-shaped images (3x32x32, 10 classes, float32). PyTorch runs with 2
threads, once with NCHW memory and once channels_last (what a user tuning
PyTorch for CPU speed picks). Each contender gets a warm-up (nnx measures its
conv algorithms there), then nnx, PyTorch NCHW and PyTorch channels_last are
timed in turns, repetition after repetition, so a noisy neighbour slows all
alike; each turn starts with one untimed step, so that every contender is timed
in its own steady state, as in training, not in the caches the previous one
left. The medians are reported, and each ratio is the median over repetitions
of that repetition's ratio.

nnx's GFLOP/s counts the arithmetic of direct convolution and the linear
layers (2 x multiply-adds; forward, input gradient except for the first
layer, weight gradient) over the step's time: Winograd does fewer
multiplications, so it can pass the GEMM peak, which is measured in the same
run with one large float32 np.matmul on all BLAS threads.

    python bench/bench_conv.py [--quick] [--nets conv6bn airbench] [--one-thread] [--unfused]
                               [--unsharded] [--versus-algorithm im2col] [--no-torch] [--reps 7]
                               [--steps 2]

nnx trains as ``nnx train`` does: in shards of the batch, the second in a worker
process (mlp/shards.py; ``NNX_SHARDS=1``: the whole batch here). ``--unsharded``
adds nnx training the whole batch in this process on its threads to the turns and
prints the shards' gain. ``--one-thread`` runs both on one thread, nnx unsharded
(a worker's time would escape the count), and counts this thread's CPU time, not
the wall clock: on a machine shared with other work, the comparison that a busy
neighbour disturbs least. ``--unfused`` adds nnx with NNX_FUSION=off to the turns
(every layer alone in training) and prints what the fused steps gain.
``--versus-algorithm A`` adds nnx with NNX_CONV_ALGORITHM=A (a network of its own,
every conv it applies to forced to A) and prints its time over nnx's: what nnx's
own choice of algorithms gains over A.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlp._allocator import keep_freed_arrays_in_the_heap  # noqa: E402
from mlp.arch import PRESETS, build_convnet, resolve_arch  # noqa: E402
from mlp.optim import Momentum  # noqa: E402
from mlp.shards import ShardedStep, shard_count, shardable  # noqa: E402

BATCH, SHAPE, CLASSES = 128, (3, 32, 32), 10
TORCH_THREADS = 2

# Networks benchmarked beside the presets (airbench94, the network of the 94 % issue, is
# one). wide5x5: 5x5 convs with 32-128 filters, where Winograd F(2x2, 5x5) pays
# (convnetjs's 16-20 filters are too few for its transforms to pay).
SPECS = {
    "wide5x5": "conv32x5-pool2-bn-conv64x5-pool2-bn-conv128x5-pool2-bn-pool4-fc10",
}


CLOCK = time.perf_counter


def step_seconds(step, steps: int) -> float:
    start = CLOCK()
    for _ in range(steps):
        step()
    return (CLOCK() - start) / steps


def interleaved(steps: dict, warmup: int, reps: int, steps_per_rep: int) -> tuple[dict, dict, dict]:
    """Median seconds per step of each contender, timed in turns within every
    repetition; for each contender but "nnx", the median over repetitions of its time
    over nnx's (nnx's speed relative to it); and those ratios turn by turn."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            step()      # untimed: each is timed in its own steady state, as in training,
            times[name].append(step_seconds(step, steps_per_rep))   # not in the last one's caches
    medians = {name: float(np.median(t)) for name, t in times.items()}
    turns = {name: np.array(t) / np.array(times["nnx"]) for name, t in times.items() if name != "nnx"}
    ratios = {name: float(np.median(r)) for name, r in turns.items()}
    return medians, ratios, turns


def step_flops(net) -> float:
    """Direct-convolution arithmetic of one training step: 2 x multiply-adds of every
    conv and linear layer, forward, weight gradient and input gradient (which a
    layer with ``input_grad=False`` skips)."""
    shape, total = net.input_shape, 0.0
    for layer in net.layers:
        out = layer.output_shape(shape)
        if layer.kind == "conv2d":
            macs = np.prod(out) * layer.in_channels * layer.kernel_size ** 2
            total += 2 * macs * (3 if layer.input_grad else 2)
        elif layer.kind == "linear":
            total += 2 * layer.in_features * layer.out_features * 3
        shape = out
    return total * BATCH


def with_setting(step, name: str, value: str):
    """``step`` with the environment variable ``name`` set to ``value`` (NNX_FUSION=off:
    every layer alone), the setting restored after."""
    def run():
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            step()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
    run.sharded = getattr(step, "sharded", None)     # what close() stops
    return run


def nnx_step(spec: str, X, y, sharded: bool = True):
    """(net, step): a training step as ``nnx train`` runs it, in shards of the batch
    (mlp/shards.py) unless ``sharded`` is False or NNX_SHARDS=1. A sharded step's
    workers are stopped by ``close(step)``."""
    net = build_convnet(spec, SHAPE, CLASSES, seed=0, dtype=np.float32)
    opt = Momentum(lr=1e-3, mu=0.9)
    shards = shard_count()
    sharded = ShardedStep(net, BATCH, SHAPE, shards) if sharded and shardable(net, shards) else None

    def step():
        if sharded is None:
            _, grads = net.loss(X, y, train=True)
        else:
            _, _, grads = sharded.loss_and_scores(X, y)
        opt.step(net.params, grads)
    step.sharded = sharded
    return net, step


def close(step) -> None:
    if getattr(step, "sharded", None) is not None:
        step.sharded.close()


def torch_model(net, torch):
    """The same network in PyTorch, layer for layer, built from the nnx one (so every
    preset and spec is mirrored, with nothing written twice)."""
    nn = torch.nn

    class Scale(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    modules, flat = [], False
    for layer in net.layers:
        if layer.kind in ("conv2d", "whiten"):
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                             layer.padding)
            if layer.kind == "whiten":
                conv.weight.requires_grad_(False)   # frozen filters, a trained bias, as nnx's
            modules.append(conv)
        elif layer.kind == "scale":
            modules.append(Scale(layer.factor))
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


def torch_step(net, X, y, torch, channels_last: bool):
    model = torch_model(net, torch)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    if channels_last:
        model, Xt = model.to(memory_format=torch.channels_last), Xt.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(Xt), yt)
        loss.backward()
        opt.step()
    return step


def gemm_peak(size: int = 2048, reps: int = 7) -> float:
    """float32 GFLOP/s of one large np.matmul on all BLAS threads (the median of ``reps``)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(np.float32) for _ in range(2))
    a @ b
    times = []
    for _ in range(reps):
        started = CLOCK()
        a @ b
        times.append(CLOCK() - started)
    return 2 * size ** 3 / float(np.median(times)) / 1e9


def machine() -> str:
    """CPU model, cores, and the BLAS with the kernel OpenBLAS picked for this CPU."""
    from threadpoolctl import threadpool_info

    from experiments.environment import cpu_model
    model = cpu_model() or "unknown CPU"
    blas = [f"{i.get('internal_api')} {i.get('version')} kernel {i.get('architecture')}, "
            f"{i.get('num_threads')} thread{'s' if i.get('num_threads') != 1 else ''}"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return f"{model}, {os.cpu_count()} CPUs; BLAS: {'; '.join(blas) or 'unknown'}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--nets", nargs="*", default=[*PRESETS, *SPECS],
                        help="presets, SPECS names or specs (default: the presets and wide5x5)")
    parser.add_argument("--one-thread", action="store_true",
                        help="both on one thread, timed by this thread's CPU time")
    parser.add_argument("--unfused", action="store_true",
                        help="also nnx with NNX_FUSION=off, in the same turns")
    parser.add_argument("--versus-algorithm", metavar="ALGORITHM",
                        help="also nnx with NNX_CONV_ALGORITHM=ALGORITHM, in the same turns")
    parser.add_argument("--unsharded", action="store_true",
                        help="also nnx with the whole batch in this process (NNX_SHARDS=1), in the "
                             "same turns")
    parser.add_argument("--no-torch", action="store_true", help="nnx alone (with --unfused: fusion's gain)")
    parser.add_argument("--reps", type=int, default=7, help="turns of each contender")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per turn")
    args = parser.parse_args(argv)
    warmup, reps, steps_per_rep = (2, 3, 1) if args.quick else (3, args.reps, args.steps)
    keep_freed_arrays_in_the_heap()   # as training does
    threads = TORCH_THREADS
    if args.one_thread:
        global CLOCK
        from threadpoolctl import threadpool_limits

        from mlp import parallel
        CLOCK, threads, parallel.THREADS = time.thread_time, 1, 1
        threadpool_limits(1)
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            print("note: PyTorch is not installed; showing nnx only")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH)
    peak = gemm_peak()
    print(machine())
    clock = "CPU time of one thread" if args.one_thread else "wall clock"
    on = f"{threads} thread{'s' if threads > 1 else ''}"
    print(f"float32 GEMM peak (2048^3 np.matmul, {on}): {peak:.0f} GFLOP/s")
    print(f"batch {BATCH}, float32, forward + backward + momentum step; nnx and PyTorch"
          f"{'' if torch is None else ' ' + torch.__version__} on {on}, {clock}; median of {reps} x "
          f"{steps_per_rep} steps after {warmup} warm-up, in turns, each after an untimed step; "
          f"ratio = PyTorch's time / nnx's (> 1: nnx faster)")
    print(f"{'net':<15} {'nnx img/s':>9} {'NCHW img/s':>10} {'ratio':>6} {'ch-last img/s':>13} {'ratio':>6} "
          f"{'nnx GFLOP/s':>11} {'of peak':>7}{'  fused gain' if args.unfused else ''}"
          f"{'  shard gain' if args.unsharded else ''}"
          f"{f'  vs {args.versus_algorithm}' if args.versus_algorithm else ''}  conv algorithms")
    spread = []
    for name in args.nets:
        spec = resolve_arch(SPECS.get(name, name))
        # --one-thread times this thread's CPU time, which a shard's worker would escape
        net, step = nnx_step(spec, X, y, sharded=not args.one_thread)
        steps = {"nnx": step}
        if args.unfused:
            steps["unfused"] = with_setting(step, "NNX_FUSION", "off")
        if args.versus_algorithm:
            steps["forced"] = with_setting(nnx_step(spec, X, y, sharded=not args.one_thread)[1],
                                           "NNX_CONV_ALGORITHM", args.versus_algorithm)
        if args.unsharded:
            steps["unsharded"] = nnx_step(spec, X, y, sharded=False)[1]
        if torch is not None:
            steps["nchw"] = torch_step(net, X, y, torch, channels_last=False)
            steps["channels_last"] = torch_step(net, X, y, torch, channels_last=True)
        try:
            medians, ratios, turns = interleaved(steps, warmup, reps, steps_per_rep)
        finally:
            for contender in steps.values():
                close(contender)
        gflops = step_flops(net) / medians["nnx"] / 1e9
        theirs = (f"{BATCH / medians['nchw']:>10.0f} {ratios['nchw']:>5.2f}x "
                  f"{BATCH / medians['channels_last']:>13.0f} {ratios['channels_last']:>5.2f}x"
                  if torch is not None else f"{'-':>10} {'-':>6} {'-':>13} {'-':>6}")
        algorithms = ",".join(sorted(set(net.conv_algorithms().values())))
        gain = f" {ratios['unfused']:>11.2f}x" if args.unfused else ""
        if args.versus_algorithm:
            gain += f" {ratios['forced']:>{len(args.versus_algorithm) + 4}.2f}x"
        if args.unsharded:
            gain += f" {ratios['unsharded']:>11.2f}x"
        print(f"{name:<15} {BATCH / medians['nnx']:>9.0f} {theirs} {gflops:>11.0f} {gflops / peak:>7.0%}"
              f"{gain}  {algorithms}", flush=True)
        spread.append((name, turns))
    if torch is not None:
        # one run's median hides how its turns went: on a shared machine they move
        print("turn by turn, PyTorch's time / nnx's: the range, and in how many turns nnx was faster")
        for name, turns in spread:
            print(f"  {name:<15} " + "   ".join(
                f"{key} {turns[key].min():.2f}-{turns[key].max():.2f}x, {np.sum(turns[key] > 1)} of "
                f"{len(turns[key])}" for key in ("nchw", "channels_last")))


if __name__ == "__main__":
    main()
