"""One training run: config -> data + network -> trainer -> outcome -> files."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import mlp
from experiments.checkpoint import (
    CHECKPOINT,
    Checkpointer,
    TimeBudget,
    estimate_epoch_seconds,
    load_checkpoint,
    snapshot_arrays,
)
from experiments.config import (
    TrainConfig,
    conv_algorithm_pins,
    format_conv_algorithms,
    format_hidden,
    format_option,
    resolve,
)
from experiments.datasets import Dataset, make_2d
from experiments.environment import environment
from experiments.errors import ConfigError
from experiments.files import history_csv, make_dir
from experiments.locks import directory_lock
from experiments.resources import check_memory
from experiments.stacks import stack_key
from mlp.conv import BatchNorm, Conv2D, Whiten
from mlp.network import Network, atomic_write_bytes, build_mlp
from mlp.optim import Optimizer, Schedule, make_optimizer
from mlp.stack_trainer import StackTrainer
from mlp.train import Callback, Callbacks, EarlyStopping, FreezeAfter, Lookahead, Trainer, TrainResult

SNAPSHOTS = "snapshots.npz"
RUN_FILES = ("model.npz", "metrics.csv", "config.json", SNAPSHOTS)


@dataclass
class RunOutcome:
    config: TrainConfig
    network: Network
    result: TrainResult
    final: dict          # final_train_loss, final_train_acc, final_val_loss, final_val_acc
    seconds: float
    dataset: Dataset

    @property
    def status(self) -> str:
        return self.result.status


def load_data(config: TrainConfig) -> Dataset:
    """The data set a resolved config asks for."""
    if config.is_image:
        from experiments.cifar10 import load_cifar10_dataset
        return load_cifar10_dataset(config)
    return make_2d(config.data, config.points, config.classes, config.noise, config.data_seed,
                   config.val_size)


def build_network(config: TrainConfig, data: Dataset) -> Network:
    """The untrained network for a resolved config, initialised from ``config.seed``."""
    if config.arch is not None:
        from mlp.arch import build_convnet
        try:
            net = build_convnet(config.arch, data.input_shape, data.num_classes, seed=config.seed,
                                dtype=np.dtype(config.dtype), loss=config.loss, reg=config.reg,
                                init="he" if config.init == "auto" else config.init,
                                weight_scale=config.weight_scale, activation=config.activation,
                                bn_decay=config.bn_decay, bn_eps=config.bn_eps)
        except ValueError as exc:
            raise ConfigError("arch", str(exc)) from None
        for layer in net.layers:
            if isinstance(layer, Whiten):      # from training images only, never validation
                layer.fit(data.X_train[:WHITEN_IMAGES])
        pin_conv_algorithms(net, conv_algorithm_pins(config.conv_algorithms))
    else:
        net = build_mlp(int(np.prod(data.input_shape)), config.hidden, data.num_classes,
                        activation=config.activation, init=config.init,
                        weight_scale=config.weight_scale, dropout=config.dropout,
                        loss=config.loss, reg=config.reg, seed=config.seed,
                        dtype=np.dtype(config.dtype), input_shape=data.input_shape)
    net.label_smoothing = config.label_smoothing
    net.metadata.update({"data": config.data, "class_names": data.class_names,
                         "config": config.to_dict(), **data.metadata})
    return net


def pin_conv_algorithms(net: Network, pins: dict[int, str]) -> None:
    """Set the pinned conv layers' algorithms (--conv-algorithms); ConfigError naming the
    option where a pin names no conv layer, or an algorithm that does not apply to it."""
    convs = [i for i, layer in enumerate(net.layers) if isinstance(layer, Conv2D)]
    for index, algorithm in pins.items():
        if index not in convs:
            what = f"a {net.layers[index].kind} layer" if index < len(net.layers) else "no layer"
            raise ConfigError("conv_algorithms", f"layer {index} is {what}; this network's conv layers "
                                                 f"are {', '.join(map(str, convs))}")
        try:
            net.layers[index].algorithm = algorithm
        except ValueError as exc:
            raise ConfigError("conv_algorithms", f"layer {index}: {exc}") from None


# airbench fits its whitening layer to 5,000 training images: plenty for a 12x12 covariance.
WHITEN_IMAGES = 5000


def learning_rate_scales(net: Network, config: TrainConfig) -> dict[str, float]:
    """Per parameter name, its learning-rate multiplier where it is not 1: BatchNorm
    biases (--bn-bias-lr), BatchNorm scales kept at 1 (--no-bn-scale: 0) and the
    whitening filters (always 0: they are computed, not trained)."""
    scales = {}
    for i, layer in enumerate(net.layers):
        if isinstance(layer, BatchNorm):
            scales[f"{i}.{layer.kind}.beta"] = config.bn_bias_lr
            if not config.bn_scale:
                scales[f"{i}.{layer.kind}.gamma"] = 0.0
        elif isinstance(layer, Whiten):
            scales[f"{i}.{layer.kind}.W"] = 0.0
    return {name: scale for name, scale in scales.items() if scale != 1.0}


def whitening_biases(net: Network) -> list[str]:
    return [f"{i}.{layer.kind}.b" for i, layer in enumerate(net.layers) if isinstance(layer, Whiten)]


def make_schedule(config: TrainConfig, epochs: float) -> Schedule:
    return Schedule(config.schedule, config.lr, total=epochs, step_size=config.step_size,
                    lr_decay=config.lr_decay, warmup=config.warmup, min_lr=config.min_lr,
                    warmup_from=config.warmup_from, warmup_share=config.warmup_share)


# A time budget may lengthen the probe's plan up to this factor (the probe is rarely
# off by more than a quarter).
BUDGET_EPOCHS_LIMIT = 4


def run(config: TrainConfig, callback: Callback | None = None, data: Dataset | None = None,
        checkpoint: Path | None = None) -> RunOutcome:
    """Train one network as ``config`` says; pass ``data`` to reuse a loaded data set.

    With ``checkpoint`` (a path), progress is saved there every
    ``config.checkpoint_every`` epochs, and a checkpoint already there is
    resumed, giving the numbers an uninterrupted run gives. An MLP on 2D data
    trains as a stack of one (``run_stack``); ConvNets and image data through
    ``Trainer``.
    """
    config = resolve(config)
    check_memory(config)
    data = data if data is not None else load_data(config)
    if trains_stacked(config):
        return run_stack([config], data, callbacks=[callback], checkpoint=checkpoint)[0]
    net, optimizer, state = start(config, data, checkpoint)
    augment = None
    if config.augment:
        from experiments.cifar10 import FlipShift
        augment = FlipShift(config.flip, config.pad, config.shift, seed=config.seed)
    n_batches = math.ceil(len(data.X_train) / (config.batch_size or len(data.X_train)))
    epochs, iterations, max_epochs = config.epochs, config.iterations, None
    if config.time_budget is not None:
        per_epoch = estimate_epoch_seconds(net, optimizer, data.X_train, data.y_train, data.X_val,
                                           config.batch_size, augment)
        epochs, iterations = max(1, int(config.time_budget / per_epoch)), None
        max_epochs = BUDGET_EPOCHS_LIMIT * epochs   # room for the budget to lengthen the plan
    schedule = make_schedule(config, epochs if iterations is None else iterations / n_batches)
    trainer = Trainer(net, optimizer, data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val,
                      batch_size=config.batch_size, schedule=schedule, seed=config.seed,
                      augment=augment, state=state, snapshot_every=config.snapshot_every)
    callbacks = Callbacks(callback)
    if config.time_budget is not None:
        callbacks.callbacks.append(TimeBudget(config.time_budget, epochs, limit=max_epochs))
    if config.patience is not None and trainer.validate:
        callbacks.callbacks.append(EarlyStopping(config.patience, state, trainer.params))
    if config.whiten_bias_epochs is not None and whitening_biases(net):
        callbacks.callbacks.append(FreezeAfter(optimizer, whitening_biases(net),
                                               config.whiten_bias_epochs))
    if config.ema_decay:
        callbacks.callbacks.append(Lookahead({**net.params, **net.buffers}, state,
                                             trainer.batches_per_epoch, config.ema_decay,
                                             config.ema_every, config.ema_start))
    if checkpoint is not None and config.checkpoint_every:
        callbacks.callbacks.append(Checkpointer(checkpoint, net, optimizer, state,
                                                config.checkpoint_every))
    started = time.perf_counter()
    trainer.train(epochs, iterations=iterations, max_epochs=max_epochs, callback=callbacks)
    seconds = time.perf_counter() - started
    return RunOutcome(config, net, state, final_metrics(net, data, state), seconds, data)


def start(config: TrainConfig, data: Dataset, checkpoint: Path | None = None
          ) -> tuple[Network, Optimizer, TrainResult]:
    """The network, optimizer and progress a run starts from: new, or those of the
    checkpoint already at ``checkpoint``."""
    optimizer = make_optimizer(config.optimizer, config.lr, config.momentum, config.weight_decay)
    if checkpoint is not None and Path(checkpoint).exists():
        net, state = load_checkpoint(checkpoint, optimizer)
        if net.metadata.get("config") != config.to_dict():
            raise ConfigError("resume", f"{checkpoint} belongs to a run with another config")
    else:
        net, state = build_network(config, data), TrainResult()
    optimizer.lr_scales.update(learning_rate_scales(net, config))
    return net, optimizer, state


def trains_stacked(config: TrainConfig) -> bool:
    """Whether a resolved config trains through the stacked code: an MLP on 2D data without
    a lookahead (``--ema-decay``; it runs through ``Trainer``). An MLP on CIFAR-10 gains
    nothing there: its products are large and already threaded."""
    return not config.is_image and config.arch is None and not config.ema_decay


def run_stack(configs: list[TrainConfig], data: Dataset | None = None,
              callbacks: list[Callback | None] | None = None, checkpoint: Path | None = None,
              widths: tuple[int, ...] | None = None) -> list[RunOutcome]:
    """Train several MLPs on 2D data as one stacked computation (``mlp.stack_trainer``), one
    outcome per config, each with the numbers it has alone (see ``mlp.stack``).

    ``configs`` share a ``stack_key``; a single config may also have a time budget,
    a ``callback`` and a ``checkpoint`` (as ``run``). ``widths``: the hidden layers'
    padded sizes (default: the largest of the stack).
    """
    configs = [resolve(c) for c in configs]
    if not all(trains_stacked(c) for c in configs):
        raise ValueError("only MLPs on 2D data train in a stack")
    if len(configs) > 1 and (len({stack_key(c) for c in configs}) > 1 or stack_key(configs[0]) is None):
        raise ValueError("these configs cannot share a stack (see experiments.stacks.stack_key)")
    if checkpoint is not None and len(configs) > 1:
        raise ValueError("a checkpoint belongs to a stack of one")
    first = configs[0]
    data = data if data is not None else load_data(first)
    nets, optimizers, states = zip(*(start(c, data, checkpoint) for c in configs), strict=True)
    n_batches = math.ceil(len(data.X_train) / (first.batch_size or len(data.X_train)))
    epochs, iterations, max_epochs = first.epochs, first.iterations, None
    if first.time_budget is not None:
        per_epoch = estimate_epoch_seconds(nets[0], optimizers[0], data.X_train, data.y_train,
                                           data.X_val, first.batch_size, train_epoch=_stack_epoch)
        epochs, iterations = max(1, int(first.time_budget / per_epoch)), None
        max_epochs = BUDGET_EPOCHS_LIMIT * epochs
    progress = epochs if iterations is None else iterations / n_batches
    trainer = StackTrainer(nets, optimizers, data.X_train, data.y_train, X_val=data.X_val,
                           y_val=data.y_val, batch_size=first.batch_size,
                           schedules=[make_schedule(c, progress) for c in configs],
                           seeds=[c.seed for c in configs], patience=[c.patience for c in configs],
                           snapshot_every=[c.snapshot_every for c in configs], states=states,
                           widths=None if widths is None else
                           (nets[0].layers[0].in_features, *widths, data.num_classes))
    watching = []
    for i, config in enumerate(configs):
        watch = Callbacks(callbacks[i] if callbacks else None)
        if config.time_budget is not None:
            watch.callbacks.append(TimeBudget(config.time_budget, epochs, limit=max_epochs))
        if checkpoint is not None and config.checkpoint_every:
            watch.callbacks.append(Checkpointer(checkpoint, nets[i], optimizers[i], states[i],
                                                config.checkpoint_every))
        watching.append(watch if watch.callbacks else None)
    started = time.perf_counter()
    results = trainer.train(epochs, iterations=iterations, max_epochs=max_epochs, callbacks=watching)
    seconds = time.perf_counter() - started
    epochs_run = sum(r.epochs_run for r in results) or len(results)
    return [RunOutcome(config, net, result, final_metrics(net, data, result),
                       seconds * (result.epochs_run or 1) / epochs_run, data)   # the trial's share
            for config, net, result in zip(configs, nets, results, strict=True)]


def _stack_epoch(net, optimizer, X, y, batch_size):
    """One epoch of a stack of one: what ``estimate_epoch_seconds`` times for ``run_stack``."""
    StackTrainer([net], [optimizer], X, y, batch_size=batch_size).train(1)


def final_metrics(net: Network, data: Dataset, result: TrainResult) -> dict:
    """Evaluation-mode loss and accuracy of the final model on train and validation."""
    nan = float("nan")
    final = {"final_train_loss": nan, "final_train_acc": nan,
             "final_val_loss": nan, "final_val_acc": nan}
    if result.status != "ok":
        if result.history:
            final["final_train_loss"] = result.history[-1]["train_loss"]
        return final
    with np.errstate(all="ignore"):
        final["final_train_loss"], final["final_train_acc"] = net.loss_and_accuracy(data.X_train,
                                                                                    data.y_train)
        if len(data.X_val):
            final["final_val_loss"], final["final_val_acc"] = net.loss_and_accuracy(data.X_val, data.y_val)
    return final


# ---- files ---------------------------------------------------------------------
def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    arch = config.arch or f"mlp{format_hidden(config.hidden)}"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.data}-{arch}-seed{config.seed}-{stamp}"


@contextlib.contextmanager
def claim_run_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Create ``path`` for a new run and hold its lock while the block runs (BusyError
    when another nnx process holds it); check it can take the run before any work is
    done. The check happens under the lock: two runs started together cannot both pass it."""
    path = make_dir(path)
    with directory_lock(path):
        existing = [name for name in (*RUN_FILES, CHECKPOINT) if (path / name).exists()]
        if existing and not overwrite:
            hint = "continue it with --resume, " if existing == ["config.json", CHECKPOINT] else ""
            raise ConfigError("out", f"{path} already holds a run ({', '.join(existing)}); {hint}"
                                     "pass --overwrite to replace it or choose another --out")
        for name in existing:      # a stale checkpoint would otherwise be resumed
            (path / name).unlink()
        yield path


@contextlib.contextmanager
def claim_unfinished_run(path: str | Path) -> Iterator[TrainConfig]:
    """Hold the lock of the killed run in ``path`` while the block resumes it; yields its
    config (ConfigError when there is no unfinished run there, BusyError when another
    nnx process is running it)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError("resume", f"{path} holds no nnx run (no such directory)")
    with directory_lock(path):
        yield resumable_config(path)


def start_run(path: Path, config: TrainConfig) -> None:
    """Record the run's config before training, so a killed run can be resumed."""
    record = {"nnx_version": mlp.__version__, "config": config.to_dict(),
              "command": rerun_command(config), "status": "running", "environment": environment()}
    atomic_write_bytes(Path(path) / "config.json", (json.dumps(record, indent=2) + "\n").encode())


def resumable_config(path: Path) -> TrainConfig:
    """The config of the unfinished run in ``path``; ConfigError when there is none."""
    path = Path(path)
    try:
        record = json.loads((path / "config.json").read_text())
        config = TrainConfig.from_dict(record["config"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError("resume", f"{path} holds no nnx run (no readable config.json)") from None
    if record.get("status") != "running":
        raise ConfigError("resume", f"the run in {path} already finished "
                                    f"(status {record.get('status')})")
    if not config.checkpoint_every:
        raise ConfigError("resume", f"the run in {path} wrote no checkpoints "
                                    "(it was started with --checkpoint-every 0)")
    return config


def best_metrics(result: TrainResult) -> dict:
    """The epoch of highest validation accuracy and its accuracy and loss (NaN and
    None without validation)."""
    found = result.best_epoch is not None
    return {"best_epoch": result.best_epoch,
            "best_val_acc": result.best_val_acc if found else math.nan,
            "best_val_loss": result.best_val_loss if found else math.nan}


def snapshots_bytes(result: TrainResult) -> bytes | None:
    """The run's snapshots as the bytes of snapshots.npz, or None when it took none.
    Parameters are stored as float32: frames of an animation need no more, and the file
    halves (201 frames of a 2-100-3 network: 488 KB, not 973 KB; zip compression would
    save 5%). A checkpoint keeps them in full, so a resumed run's frames are exact."""
    if not result.snapshots:
        return None
    arrays = {name: values.astype(np.float32) if values.dtype.kind == "f" else values
              for name, values in snapshot_arrays(result.snapshots).items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def run_record(outcome: RunOutcome) -> dict:
    """Everything config.json holds: the resolved config, the command to rerun it, the
    outcome. The command pins the conv algorithms the run chose (--conv-algorithms): a
    rerun measuring afresh could choose others, which round differently."""
    algorithms = outcome.network.conv_algorithms()
    rerun = dataclasses.replace(outcome.config, conv_algorithms=format_conv_algorithms(algorithms))
    return {"nnx_version": mlp.__version__, "config": outcome.config.to_dict(),
            "command": rerun_command(rerun), "status": outcome.status,
            "epochs_run": outcome.result.epochs_run, "stopped_early": outcome.result.stopped_early,
            "seconds": outcome.seconds, **outcome.final, **best_metrics(outcome.result),
            "conv_algorithms": algorithms,   # {layer index: algorithm}
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment()}


def save_run(path: str | Path, outcome: RunOutcome) -> None:
    """Write model.npz, metrics.csv, config.json (and snapshots.npz when the run took
    snapshots) into ``path``, each atomically."""
    path = Path(path)
    outcome.network.save(path / "model.npz")
    snapshots = snapshots_bytes(outcome.result)
    if snapshots is not None:
        atomic_write_bytes(path / SNAPSHOTS, snapshots)
    atomic_write_bytes(path / "metrics.csv", history_csv(outcome.result.history).encode())
    text = json.dumps(run_record(outcome), indent=2, default=_json_default) + "\n"
    atomic_write_bytes(path / "config.json", text.encode())


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def rerun_command(config: TrainConfig) -> str:
    """The ``nnx train`` command line that reproduces ``config``, each value written by
    its option's formatter (the text its parser reads back), quoted for a POSIX shell."""
    args = ["nnx", "train"]
    for name, value in config.to_dict().items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, shlex.quote(format_option(name, value))]
    return " ".join(args)


