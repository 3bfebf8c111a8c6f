"""What a run will need, estimated before it starts, so that a run that cannot fit
is refused in one line instead of dying of a MemoryError halfway (and leaving
a half-made run directory behind).

The estimate counts the big arrays a training step holds at once: the data
set, the parameters with their gradients and optimizer state, and the
activations of one batch (forward values plus what the backward keeps). It
is meant to be within a factor of two; it only refuses runs that need more
than the machine's memory.
"""
from __future__ import annotations

import os

import numpy as np

from experiments.config import TrainConfig
from experiments.datasets import FIXED_CLASSES
from experiments.errors import ConfigError

CIFAR10_SHAPE, CIFAR10_TRAIN, CIFAR10_CLASSES = (3, 32, 32), 50_000, 10
# Per parameter: the value, its gradient, and up to two optimizer slots (Adam).
ARRAYS_PER_PARAMETER = 4
# Per activation number of a batch: the output, the cached input or mask, and the
# gradient flowing back.
ARRAYS_PER_ACTIVATION = 3
EVAL_BATCH = 1024           # Network.scores' batch


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _shapes(config: TrainConfig) -> tuple[tuple[int, ...], int, int]:
    """(input shape, training examples, classes) of a resolved config's data."""
    if config.is_image:
        n = config.limit or CIFAR10_TRAIN
        return CIFAR10_SHAPE, n, CIFAR10_CLASSES
    classes = FIXED_CLASSES.get(config.data, config.classes)
    return (2,), config.points * classes, classes


def estimate(config: TrainConfig) -> dict[str, int]:
    """Bytes by what needs them: "data", "parameters", "activations" of the largest batch
    (and, for naming the culprit, "activations_at_eval_batch"), of a resolved config."""
    shape, n, classes = _shapes(config)
    itemsize = np.dtype(config.dtype).itemsize
    batch = n if not config.batch_size else min(config.batch_size, n)
    data = n * int(np.prod(shape)) * (itemsize + (1 if config.is_image else 0))
    if config.arch is not None:
        params, per_example = _conv_counts(config, shape, classes)
    else:
        sizes = [int(np.prod(shape)), *config.hidden, classes]
        params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        per_example = sum(sizes[1:])
    # Evaluation runs in batches of 1024 after training: the larger batch counts.
    per_example_bytes = per_example * ARRAYS_PER_ACTIVATION * itemsize
    return {"data": data, "parameters": params * ARRAYS_PER_PARAMETER * itemsize,
            "activations": max(batch, EVAL_BATCH) * per_example_bytes,
            "activations_at_eval_batch": EVAL_BATCH * per_example_bytes}


def _conv_counts(config: TrainConfig, shape, classes) -> tuple[int, int]:
    """(parameters, activation numbers per example) of a ConvNet spec, by arithmetic on
    its tokens' shapes (building it could itself exhaust the memory being checked)."""
    from mlp.arch import parse_arch, resolve_arch
    from mlp.conv import conv_output_size
    try:
        tokens = parse_arch(resolve_arch(config.arch))
        params, per_example, current = 0, 0, tuple(shape)
        for kind, args in tokens:
            if kind == "conv":
                f, k, s, p = args
                params += f * current[0] * k * k + f
                current = (f, conv_output_size(current[1], k, s, p), conv_output_size(current[2], k, s, p))
                per_example += 2 * int(np.prod(current))        # the conv and its ReLU
            elif kind == "pool":
                k, s = args
                current = (current[0], (current[1] - k) // s + 1, (current[2] - k) // s + 1)
            elif kind == "fc":
                params += int(np.prod(current)) * args[0] + args[0]
                current = (args[0],)
                per_example += 2 * args[0]
            elif kind == "bn":
                params += 2 * current[0]
            per_example += int(np.prod(current))
    except (ValueError, IndexError) as exc:
        raise ConfigError("arch", f"{config.arch!r} does not fit {shape} images: {exc}") from None
    appended_fc = 0 if tokens[-1][0] == "fc" else (int(np.prod(current)) + 1) * classes
    return params + appended_fc, per_example


def check_memory(config: TrainConfig, available: int | None = None) -> None:
    """Refuse a resolved config whose estimate exceeds the machine's memory
    (``available`` bytes, default all of it): ConfigError naming the option that
    makes it big."""
    available = physical_memory() if available is None else available
    if available is None:
        return
    parts = estimate(config)
    at_eval_batch = parts.pop("activations_at_eval_batch")
    total = sum(parts.values())
    if total <= available:
        return
    biggest = max(parts, key=parts.get)
    network = "arch" if config.arch is not None else "hidden"
    if biggest == "parameters" or (biggest == "activations" and at_eval_batch > available / 2):
        option = network                 # too wide a network, whatever the batch
    elif biggest == "activations" and config.batch_size:
        option = "batch_size"
    else:
        option = "limit" if config.is_image else "points"   # the data, or a full batch of it
    raise ConfigError(option, f"the run would need about {_gib(total)} of memory ({biggest} "
                              f"{_gib(parts[biggest])}), more than this machine's {_gib(available)}")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"
