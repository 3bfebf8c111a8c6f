"""Where a ConvNet's training step spends its time, per layer, beside PyTorch's profiler.

One step = forward + backward + SGD-momentum update at batch 128, float32, as
bench_conv.py times it. nnx: each layer's forward and backward and the
optimizer step, timed in place (a fused pair, conv+maxpool2d or batchnorm+relu,
as one; NNX_FUSION=off times them apart), on the whole batch in this process, its
layers sharing the batch among threads (``nnx train`` trains in shards, each in a
process of its own on one thread: --one-thread times the layers so). PyTorch (2 threads, channels_last unless
--nchw): torch.profiler's self time per operator. Both summed by kind
(conv forward, conv backward, pool, batch norm, ...) side by side.

    python bench/profile_conv.py [--model conv6bn] [--gelu] [--steps 5] [--nchw] [--one-thread]
    python bench/profile_conv.py --model airbench94   # the 94 % issue's network
    python bench/profile_conv.py --gelu-forms         # the tanh and erf forms of GELU, timed
    python bench/profile_conv.py --model convnetjs --algorithms
        each conv layer's forward + backward under every algorithm that applies to it
        (with its 2x2 max-pool, fused where it fuses, as training runs it), median and
        fastest of 7 rounds in turns, and the one nnx's own measurement picks
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_conv import BATCH, CLASSES, SHAPE, SPECS, torch_model  # noqa: E402

from mlp._allocator import keep_freed_arrays_in_the_heap  # noqa: E402
from mlp.arch import build_convnet, resolve_arch  # noqa: E402
from mlp.optim import Momentum  # noqa: E402

KIND_OF_TORCH_OP = {
    "aten::mkldnn_convolution": "conv2d forward", "aten::convolution_backward": "conv2d backward",
    "aten::max_pool2d_with_indices": "maxpool2d forward",
    "aten::max_pool2d_with_indices_backward": "maxpool2d backward",
    "aten::native_batch_norm": "batchnorm forward", "aten::native_batch_norm_backward": "batchnorm backward",
    "aten::clamp_min": "relu forward", "aten::threshold_backward": "relu backward",
    "aten::gelu": "gelu forward", "aten::gelu_backward": "gelu backward",
    "aten::addmm": "linear", "aten::mm": "linear",
    "aten::fill_": "zeroing (fill_)", "aten::copy_": "layout copies (copy_)",
}


CLOCK = time.perf_counter   # time.thread_time with --one-thread


def timed(fn, name: str, totals: dict):
    def wrapper(*args, **kwargs):
        started = CLOCK()
        result = fn(*args, **kwargs)
        totals[name] += CLOCK() - started
        return result
    return wrapper


def with_gelu(net):
    """The network with a GELU wherever it has a ReLU (the same places the spec's
    automatic activations go)."""
    from mlp.layers import GELU
    net.layers = [GELU() if layer.kind == "relu" else layer for layer in net.layers]
    return net


def nnx_profile(spec: str, X, y, steps: int, gelu: bool):
    net = build_convnet(spec, SHAPE, CLASSES, seed=0, dtype=np.float32)
    if gelu:
        net = with_gelu(net)
    opt = Momentum(lr=1e-3, mu=0.9)
    for _ in range(3):
        _, grads = net.loss(X, y)
        opt.step(net.params, grads)
    totals: dict[str, float] = defaultdict(float)
    for i, layer in enumerate(net.layers):
        layer.forward = timed(layer.forward, f"{i:2d} {layer.kind} forward", totals)
        layer.backward = timed(layer.backward, f"{i:2d} {layer.kind} backward", totals)
        if i + 1 < len(net.layers):
            # as a fused step, if the network runs one (NNX_FUSION=off times the layers apart)
            pair = f"{i:2d} {layer.kind}+{net.layers[i + 1].kind}"
            if i + 2 < len(net.layers) and layer.absorbs(net.layers[i + 1], net.layers[i + 2]):
                pair += f"+{net.layers[i + 2].kind}"      # the layer after joins the step too
            layer.forward_fused = timed(layer.forward_fused, f"{pair} forward", totals)
            layer.backward_fused = timed(layer.backward_fused, f"{pair} backward", totals)
    opt.step = timed(opt.step, "optimizer step", totals)
    started = CLOCK()
    for _ in range(steps):
        _, grads = net.loss(X, y)
        opt.step(net.params, grads)
    step = (CLOCK() - started) / steps
    per_step = {name: seconds / steps for name, seconds in totals.items()}
    per_step["loss and the rest"] = step - sum(per_step.values())
    return net, step, per_step


def torch_profile(net, X, y, steps: int, torch, channels_last: bool):
    from torch.profiler import ProfilerActivity, profile
    model = torch_model(net, torch)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    if channels_last:
        model, Xt = model.to(memory_format=torch.channels_last), Xt.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(Xt), yt).backward()
        opt.step()

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}
    return seconds, ops


def conv_algorithms(spec: str, X, rounds: int = 8) -> None:
    """Per conv layer of the network: forward + backward under each algorithm that applies,
    timed in turns as ``conv_kernels.fastest`` times them (the first round a warm-up)."""
    import statistics

    from mlp.conv import Conv2D, MaxPool2D
    from mlp.kernels import conv as conv_kernels
    from mlp.kernels import fused_layers
    net = build_convnet(spec, SHAPE, CLASSES, seed=0, dtype=np.float32)
    inputs = {}
    x = X
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Conv2D):
            inputs[i] = x
            layer.algorithm = "im2col"        # recorded: no choice made on the way
        x = layer.forward(x, train=True)
    print(f"{'layer':34s} " + "".join(f"{name:>18s}" for name in conv_kernels.ALGORITHMS) + "   chosen")
    for i, x in inputs.items():
        conv = net.layers[i]
        after = net.layers[i + 1] if i + 1 < len(net.layers) else None
        pooled = fused_layers() and type(after) is MaxPool2D and after.pool_size == after.stride == 2
        w, S, P, K = conv.params["W"], conv.stride, conv.padding, conv.kernel_size
        names = conv_kernels.candidates(K, S, P)
        seconds = conv_kernels.timings(x, w, S, P, conv.input_grad, names, rounds, pooled)
        cells = [f"{statistics.median(seconds[n][1:]) * 1e3:7.2f} /{min(seconds[n][1:]) * 1e3:7.2f}"
                 if n in seconds else "-" for n in conv_kernels.ALGORITHMS]
        label = f"{i:2d} {conv.in_channels}->{conv.out_channels} {K}x{K} at {x.shape[2]}x{x.shape[3]}" + \
            (" +pool" if pooled else "")
        chosen = conv_kernels.choose(x, w, S, P, conv.input_grad, pooled)
        print(f"{label:34s} " + "".join(f"{c:>18s}" for c in cells) + f"   {chosen}")
    print("ms, median / fastest of the rounds after a warm-up; chosen: what nnx's own measurement "
          "(conv_kernels.choose) picks, run after these")


def kind_of(name: str) -> str:
    if name[:2].strip().isdigit():
        return name[3:]
    return name


def gelu_forms():
    """Forward + derivative of GELU on a conv-sized activation, both on one thread: the
    tanh form (the kernel) against an erf form built from Abramowitz-Stegun 7.1.26
    (|error| < 1.5e-7), NumPy having no erf, written with the same in-place passes."""
    from mlp import parallel
    from mlp.kernels.elementwise import gelu_forward
    parallel.THREADS = 1
    x = np.random.default_rng(0).standard_normal((128, 64, 16, 16)).astype(np.float32)
    f32 = np.float32

    def erf_form(x):
        a = np.abs(x)
        a *= f32(1 / np.sqrt(2))
        t = a * f32(0.3275911)
        t += 1
        np.reciprocal(t, out=t)
        poly = t * f32(1.061405429)
        for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
            poly += f32(c)
            poly *= t
        gauss = np.square(a)
        np.negative(gauss, out=gauss)
        np.exp(gauss, out=gauss)
        poly *= gauss                       # 1 - erf(|x| / sqrt 2)
        phi = np.subtract(1, poly)
        np.copysign(phi, x, out=phi)        # erf(x / sqrt 2)
        phi += 1
        phi *= 0.5                          # Phi(x)
        out = x * phi
        gauss *= x
        gauss *= f32(1 / np.sqrt(2 * np.pi))
        gauss += phi                        # Phi(x) + x phi(x)
        return out, gauss

    forms = {"tanh form (the kernel)": lambda: gelu_forward(x, True),
             "erf form (A-S 7.1.26)": lambda: erf_form(x)}
    times = {name: [] for name in forms}
    for _ in range(7):
        for name, fn in forms.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    for name, t in times.items():
        print(f"  {name:24s} {np.median(t[1:]) * 1e3:6.2f} ms for {x.size:,} numbers, forward + derivative, "
              "one thread")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="conv6bn", help="a preset, a bench_conv.SPECS name or a spec")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gelu", action="store_true", help="GELU in place of every ReLU")
    parser.add_argument("--nchw", action="store_true", help="PyTorch in NCHW memory (default channels_last)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--gelu-forms", action="store_true", help="time the two GELU forms and stop")
    parser.add_argument("--algorithms", action="store_true",
                        help="time each conv layer under every algorithm that applies, and stop")
    parser.add_argument("--one-thread", action="store_true",
                        help="both on one thread; nnx timed by its thread's CPU time")
    args = parser.parse_args()
    keep_freed_arrays_in_the_heap()   # as training does
    threads = 2
    if args.one_thread:
        global CLOCK
        from threadpoolctl import threadpool_limits

        from mlp import parallel
        CLOCK, threads, parallel.THREADS = time.thread_time, 1, 1
        threadpool_limits(1)
    if args.gelu_forms:
        gelu_forms()
        return
    spec = resolve_arch(SPECS.get(args.model, args.model))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH)
    if args.algorithms:
        conv_algorithms(spec, X)
        return
    net, step, nnx = nnx_profile(spec, X, y, args.steps, args.gelu)
    print(f"{args.model}{' with GELU' if args.gelu else ''}: {spec}")
    print(f"nnx ({'one thread, CPU time' if args.one_thread else '2 threads'}): {step * 1e3:.1f} ms per "
          f"training step (batch {BATCH}), {BATCH / step:,.0f} images/s; "
          f"conv algorithms {net.conv_algorithms()}")
    for name, seconds in sorted(nnx.items(), key=lambda kv: -kv[1]):
        print(f"  {name:34s} {seconds * 1e3:7.2f} ms")
    torch_ops = {}
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("PyTorch is not installed: nnx only")
        else:
            torch.set_num_threads(threads)
            layout = "NCHW" if args.nchw else "channels_last"
            seconds, torch_ops = torch_profile(net, X, y, args.steps, torch, not args.nchw)
            print(f"PyTorch ({layout}, {threads} thread(s)): {seconds * 1e3:.1f} ms per step, "
                  f"{BATCH / seconds:,.0f} images/s; its profiler's self time per operator:")
            for name, secs in sorted(torch_ops.items(), key=lambda kv: -kv[1])[:14]:
                print(f"  {name:40s} {secs * 1e3:7.2f} ms")
    by_kind: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
    for name, seconds in nnx.items():
        by_kind[kind_of(name)][0] += seconds
    for op, seconds in torch_ops.items():
        kind = KIND_OF_TORCH_OP.get(op, "optimizer step" if op.startswith("Optimizer.step") else None)
        if kind is not None:
            by_kind[kind][1] += seconds
    print(f"by kind, ms per step: {'':14s} {'nnx':>8} {'PyTorch':>8}")
    for kind, (ours, theirs) in sorted(by_kind.items(), key=lambda kv: -max(kv[1])):
        print(f"  {kind:34s} {ours * 1e3:8.2f} {theirs * 1e3:8.2f}")


if __name__ == "__main__":
    main()
