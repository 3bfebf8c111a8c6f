"""One training run: config -> data + network -> trainer -> outcome -> files."""
from __future__ import annotations

import csv
import io
import json
import math
import time
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
)
from experiments.config import TrainConfig, format_hidden, resolve
from experiments.datasets import Dataset, make_2d
from experiments.errors import ConfigError
from mlp.network import Network, atomic_write_bytes, build_mlp
from mlp.optim import Schedule, make_optimizer
from mlp.train import HISTORY_COLUMNS, Callback, Callbacks, TrainResult, train

RUN_FILES = ("model.npz", "metrics.csv", "config.json")


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
                   config.val_fraction)


def build_network(config: TrainConfig, data: Dataset) -> Network:
    """The untrained network for a resolved config, initialised from ``config.seed``."""
    if config.model is not None:
        from mlp.arch import build_network as build_conv
        try:
            net = build_conv(config.model, data.input_shape, data.num_classes, seed=config.seed,
                             dtype=np.dtype(config.dtype), loss=config.loss, reg=config.reg,
                             init="he" if config.init == "auto" else config.init,
                             weight_scale=config.weight_scale)
        except ValueError as exc:
            raise ConfigError("model", str(exc)) from None
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


def make_schedule(config: TrainConfig, epochs: float) -> Schedule:
    return Schedule(config.schedule, config.lr, total=epochs, step_size=config.step_size,
                    gamma=config.gamma, warmup=config.warmup, min_lr=config.min_lr)


# A time budget may lengthen the probe's plan up to this factor (the probe is rarely
# off by more than a quarter).
BUDGET_EPOCHS_LIMIT = 4


def run(config: TrainConfig, callback: Callback | None = None, data: Dataset | None = None,
        checkpoint: Path | None = None) -> RunOutcome:
    """Train one network as ``config`` says; pass ``data`` to reuse a loaded data set.

    With ``checkpoint`` (a path), progress is saved there every
    ``config.checkpoint_every`` epochs, and a checkpoint already there is
    resumed, giving the numbers an uninterrupted run gives.
    """
    config = resolve(config)
    data = data if data is not None else load_data(config)
    optimizer = make_optimizer(config.optimizer, config.lr, config.momentum)
    if checkpoint is not None and Path(checkpoint).exists():
        net, state = load_checkpoint(checkpoint, optimizer)
        if net.metadata.get("config") != config.to_dict():
            raise ConfigError("resume", f"{checkpoint} belongs to a run with another config")
    else:
        net, state = build_network(config, data), TrainResult()
    augment = None
    if config.augment:
        from experiments.cifar10 import augment_flip_shift
        augment = augment_flip_shift
    n_batches = math.ceil(len(data.X_train) / (config.batch_size or len(data.X_train)))
    epochs, iterations, max_epochs = config.epochs, config.iterations, None
    if config.time_budget is not None:
        per_epoch = estimate_epoch_seconds(net, optimizer, data.X_train, data.y_train, data.X_val,
                                           config.batch_size, augment)
        epochs, iterations = max(1, int(config.time_budget / per_epoch)), None
        max_epochs = BUDGET_EPOCHS_LIMIT * epochs   # room for the budget to lengthen the plan
    schedule = make_schedule(config, epochs if iterations is None else iterations / n_batches)
    callbacks = Callbacks(callback)
    if config.time_budget is not None:  # first: the others see each epoch with the new plan
        callbacks.callbacks.insert(0, TimeBudget(config.time_budget, schedule, epochs, callbacks.on_plan,
                                                 limit=max_epochs))
    if checkpoint is not None and config.checkpoint_every:
        callbacks.callbacks.append(Checkpointer(checkpoint, net, optimizer, state,
                                                config.checkpoint_every))
    started = time.perf_counter()
    train(net, optimizer, data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val,
          epochs=epochs, iterations=iterations, batch_size=config.batch_size, schedule=schedule,
          seed=config.seed, callback=callbacks, patience=config.patience, augment=augment,
          state=state, max_epochs=max_epochs)
    seconds = time.perf_counter() - started
    return RunOutcome(config, net, state, final_metrics(net, data, state), seconds, data)


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
        final["final_train_loss"], final["final_train_acc"] = net.evaluate(data.X_train, data.y_train)
        if len(data.X_val):
            final["final_val_loss"], final["final_val_acc"] = net.evaluate(data.X_val, data.y_val)
    return final


# ---- files ---------------------------------------------------------------------
def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    arch = config.model or f"mlp{format_hidden(config.hidden)}"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.data}-{arch}-seed{config.seed}-{stamp}"


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Check ``path`` can take a run before any work is done; create it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError("out", f"{path} is a file, not a directory")
    existing = [name for name in (*RUN_FILES, CHECKPOINT) if (path / name).exists()]
    if existing and not overwrite:
        hint = "continue it with --resume, " if existing == ["config.json", CHECKPOINT] else ""
        raise ConfigError("out", f"{path} already holds a run ({', '.join(existing)}); {hint}"
                                 "pass --overwrite to replace it or choose another --out")
    for name in existing:      # a stale checkpoint would otherwise be resumed
        (path / name).unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_run(path: Path, config: TrainConfig) -> None:
    """Record the run's config before training, so a killed run can be resumed."""
    record = {"nnx_version": mlp.__version__, "config": config.to_dict(),
              "command": rerun_command(config), "status": "running"}
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


def history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def run_record(outcome: RunOutcome) -> dict:
    """Everything config.json holds: the resolved config, the command to rerun it, the outcome."""
    return {"nnx_version": mlp.__version__, "config": outcome.config.to_dict(),
            "command": rerun_command(outcome.config), "status": outcome.status,
            "epochs_run": outcome.result.epochs_run, "stopped_early": outcome.result.stopped_early,
            "seconds": outcome.seconds, **outcome.final,
            "conv_algorithms": outcome.network.conv_algorithms(),   # {layer index: im2col|winograd2|4}
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def save_run(path: str | Path, outcome: RunOutcome) -> None:
    """Write model.npz, metrics.csv and config.json into ``path``, each atomically."""
    path = Path(path)
    outcome.network.save(path / "model.npz")
    atomic_write_bytes(path / "metrics.csv", history_csv(outcome.result.history).encode())
    text = json.dumps(run_record(outcome), indent=2, default=_json_default) + "\n"
    atomic_write_bytes(path / "config.json", text.encode())


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def rerun_command(config: TrainConfig) -> str:
    """The ``nnx train`` command line that reproduces ``config``."""
    args = ["nnx", "train"]
    for name, value in config.to_dict().items():
        if value is None or name == "extra":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        elif name == "hidden":
            args += [flag, format_hidden(value).replace("x", ",")]
        else:
            args += [flag, str(value)]
    return " ".join(args)


