"""Which trials of a sweep train together, and how wide their stacks are.

A sweep packs its trials into stacks (``mlp.stack``) by itself:

1. Trials can share a stack when their ``stack_key``s are equal: the same
   data set (data, points, classes, noise, val_size, data_seed), the same
   number of steps (epochs or iterations, batch size), the same depth,
   activation, loss, optimizer and dtype. Everything else is the trial's own:
   seed, reg, lr, momentum, hidden sizes, dropout, label smoothing, init,
   schedule, patience, snapshots. ConvNets, image data and trials with a time
   budget (whose plan follows their own clock) are never stacked: they run
   alone through ``run_trial``.
2. Within a key, trials sorted by hidden sizes fall into *width groups*:
   neighbouring sizes join while the group is small (under ``GROUP_TRIALS``
   trials) and padding them to the group's widest adds at most
   ``MAX_PADDING`` to their work. A trial is padded to its group's widths,
   which depend on the sweep's trials alone: never on which trials are done,
   the stack size or the number of workers, so a trial's numbers don't either.
3. Each group's trials still to run are cut into stacks of at most
   ``stack_size`` trials, and into enough stacks to keep every worker busy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from experiments.config import TrainConfig

# Options every trial of a stack shares (hidden sizes share their number of layers).
SHARED_OPTIONS = ("data", "points", "classes", "noise", "val_size", "data_seed", "data_dir", "limit",
                  "augment", "activation", "loss", "dtype", "optimizer", "epochs", "iterations",
                  "batch_size")
GROUP_TRIALS = 32        # a width group of this many trials is not merged with its neighbours
MAX_PADDING = 0.25       # the most work padding may add to a width group
# The default stack size follows the activations' size: a stack whose hidden activations
# take about STACK_BYTES per layer stays in cache, and no more than MAX_STACK trials share
# one. Measured (bench/bench_sweep.py --stack-sizes, spiral, 240 training points): per
# trial, 2-100-3 nets trained fastest in stacks of 8-16 (2.3 MiB), slower from 32 on;
# 2-3-3 and 2-20-3 nets kept gaining up to 64.
STACK_BYTES = 2 << 20
MAX_STACK = 64
# A group is cut into at least one stack per worker's share of the sweep (so that no
# worker waits on another's long stack), never smaller for it: measured on the default
# sweep with 2 workers, four stacks of five 2-100-3 nets took 20% more CPU than two of ten.
BALANCE = 1


def stack_key(config: TrainConfig) -> tuple | None:
    """What a resolved config shares with the trials of its stack; None when it trains alone."""
    if config.is_image or config.arch is not None or config.time_budget is not None \
            or config.ema_decay:
        return None
    return (*(getattr(config, name) for name in SHARED_OPTIONS), len(config.hidden))


def trial_cost(config: TrainConfig, hidden: tuple[int, ...] | None = None) -> float:
    """A trial's work in arbitrary units, for packing and ordering: steps times the
    parameters and hidden units each training example passes through (image trials
    count as far more than any 2D one, which they are)."""
    if config.is_image or config.hidden is None:
        return (config.epochs or 1) * (config.limit or 50_000) * 1e6
    sizes = (2, *(hidden if hidden is not None else config.hidden), config.classes)
    per_example = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=False)) + 8 * sum(sizes[1:-1])
    examples = (config.points or 1) * config.classes
    steps = config.iterations * (config.batch_size or examples) if config.iterations \
        else (config.epochs or 1) * examples
    return steps * (per_example + 16)


@dataclass
class Stack:
    """Trials that train as one computation; ``widths`` their padded hidden sizes (None:
    the trial trains alone, as ``run_trial``)."""

    trials: list
    widths: tuple[int, ...] | None

    @property
    def cost(self) -> float:
        return sum(trial_cost(t.config, self.widths) for t in self.trials)


def width_groups(trials: list) -> dict[str, tuple[int, ...]]:
    """trial key -> the padded hidden sizes of its width group, for every stackable trial."""
    by_key: dict[tuple, dict[tuple, list]] = {}
    for trial in trials:
        key = stack_key(trial.config)
        if key is not None:
            by_key.setdefault(key, {}).setdefault(tuple(trial.config.hidden), []).append(trial)
    widths = {}
    for sizes in by_key.values():
        group: list[tuple] = []
        for hidden in sorted(sizes):
            if group and _joins(group, hidden, sizes):
                group.append(hidden)
            else:
                _assign(widths, group, sizes)
                group = [hidden]
        _assign(widths, group, sizes)
    return widths


def _joins(group: list[tuple], hidden: tuple, sizes: dict) -> bool:
    members = [t for h in group for t in sizes[h]]
    if len(members) >= GROUP_TRIALS:
        return False
    merged = [*group, hidden]
    padded = tuple(max(h[i] for h in merged) for i in range(len(hidden)))
    trials = [t for h in merged for t in sizes[h]]
    real = sum(trial_cost(t.config) for t in trials)
    return sum(trial_cost(t.config, padded) for t in trials) <= (1 + MAX_PADDING) * real


def _assign(widths: dict, group: list[tuple], sizes: dict) -> None:
    if not group:
        return
    padded = tuple(max(h[i] for h in group) for i in range(len(group[0])))
    for hidden in group:
        for trial in sizes[hidden]:
            widths[trial.key] = padded


def auto_stack_size(config: TrainConfig, widths: tuple[int, ...]) -> int:
    """How many trials of these padded widths share a stack by default: as many as keep a
    hidden layer's activations for the batch (or the validation split) near STACK_BYTES."""
    examples = (config.points or 1) * config.classes
    rows = min(config.batch_size or examples, examples)
    per_trial = 8 * rows * (max(widths, default=0) + 1)
    return max(1, min(MAX_STACK, STACK_BYTES // per_trial))


def pack(trials: list, todo: list, stack_size: int | None = None, workers: int = 1) -> list[Stack]:
    """The stacks that train ``todo`` (trials of the sweep ``trials``), costliest first.
    ``stack_size`` 1 runs every trial alone (as nnx did before stacks); None sizes each
    stack by ``auto_stack_size``."""
    if stack_size == 1:
        stacks = [Stack([t], None) for t in todo]
    else:
        widths = width_groups(trials)
        groups: dict[tuple, list] = {}
        alone = []
        for trial in todo:
            if trial.key in widths:
                groups.setdefault((stack_key(trial.config), widths[trial.key]), []).append(trial)
            else:
                alone.append(Stack([trial], None))
        total = sum(trial_cost(t.config, widths.get(t.key)) for t in todo)
        share = total / max(1, BALANCE * workers)       # no stack above a worker's share
        stacks = alone
        for (_, padded), members in groups.items():
            cost = sum(trial_cost(t.config, padded) for t in members)
            size = stack_size or auto_stack_size(members[0].config, padded)
            count = max(math.ceil(len(members) / size), min(len(members), math.ceil(cost / share)))
            for i in range(count):                      # contiguous runs, as even as they come
                stacks.append(Stack(members[i * len(members) // count:(i + 1) * len(members) // count],
                                    padded))
    return sorted(stacks, key=lambda s: -s.cost)
