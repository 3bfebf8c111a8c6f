"""The full description of one training run, its defaults and its validation.

Field names are the ``nnx train`` option names (``batch_size`` is
``--batch-size``), the sweep's axis names and the CSV column names: one name
for one thing. Fields left as None take the data set's default when resolved,
so ``config.json`` always records the values a run really used.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields

from experiments.datasets import FIXED_CLASSES, GENERATORS
from experiments.errors import ConfigError
from mlp.arch import parse_arch, resolve_arch
from mlp.init import INIT_SCHEMES
from mlp.layers import ACTIVATIONS
from mlp.losses import LOSSES
from mlp.optim import OPTIMIZERS, SCHEDULES

IMAGE_DATASETS = ("cifar10",)
DATASETS = (*GENERATORS, *IMAGE_DATASETS)
DTYPES = ("auto", "float32", "float64")


@dataclass
class TrainConfig:
    # data
    data: str = "spiral"
    points: int = 100
    classes: int = 3
    noise: float | None = None
    val_fraction: float | None = None
    data_seed: int = 0
    data_dir: str | None = None
    val_size: int = 5000
    limit: int | None = None
    augment: bool = False
    # model
    model: str | None = None
    hidden: list[int] | None = None
    activation: str = "relu"
    init: str = "auto"
    weight_scale: float = 1e-2
    dropout: float = 0.0
    loss: str = "softmax"
    reg: float | None = None
    label_smoothing: float = 0.0
    dtype: str = "auto"
    # optimisation
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    schedule: str | None = None
    step_size: int = 10
    gamma: float = 0.1
    warmup: float | None = None
    min_lr: float = 0.0
    epochs: int | None = None
    iterations: int | None = None
    batch_size: int | None = None
    patience: int | None = None
    time_budget: float | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return self.data in IMAGE_DATASETS

    @property
    def is_conv(self) -> bool:
        return self.model is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(unknown[0], f"unknown option {unknown[0]!r}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Defaults per data set for the fields left as None. The 2D defaults are the
# cs231n notes' spiral run: full-batch gradient descent, lr 1, reg 1e-3.
DEFAULTS_2D = {"hidden": [100], "reg": 1e-3, "optimizer": "sgd", "lr": 1.0, "epochs": 10000,
               "batch_size": 0, "val_fraction": 0.0, "checkpoint_every": 0,
               "schedule": "constant", "warmup": 0.0}
# Measured on CIFAR-10 with the convnetjs preset and --augment, 10 epochs: this
# recipe reached 71.2 % validation accuracy where the ConvNetJS demo's Adadelta
# (lr 1, reg 1e-4, batch 128) reached 59.9 %.
DEFAULTS_IMAGE = {"model": "convnetjs", "reg": 5e-4, "optimizer": "nesterov", "lr": 0.02,
                  "epochs": 10, "batch_size": 128, "val_fraction": 0.0, "checkpoint_every": 1,
                  "schedule": "cosine", "warmup": 0.5}


def resolve(config: TrainConfig) -> TrainConfig:
    """A copy with every None default filled in for its data set, validated."""
    validate(config)
    values = config.to_dict()
    defaults = dict(DEFAULTS_IMAGE if config.is_image else DEFAULTS_2D)
    if config.is_image and config.hidden is not None:
        defaults.pop("model")  # an explicit --hidden on images asks for an MLP
    if config.optimizer is not None and config.optimizer != defaults["optimizer"]:
        # the data set's lr belongs to its optimizer; another takes its own default
        defaults["lr"] = OPTIMIZERS[config.optimizer].default_lr
    for name, value in defaults.items():
        if values.get(name) is None:
            values[name] = value
    if values["dtype"] == "auto":
        values["dtype"] = "float32" if values.get("model") else "float64"
    if config.data in FIXED_CLASSES:
        values["classes"] = FIXED_CLASSES[config.data]
    resolved = TrainConfig(**values)
    validate(resolved)
    return resolved


def _choice(option, value, choices):
    if value not in choices:
        raise ConfigError(option, f"{value!r} is not one of {', '.join(map(str, choices))}")


def _at_least(option, value, low, inclusive=True):
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(option, f"must be a finite number, got {value}")
    if value < low or (not inclusive and value == low):
        raise ConfigError(option, f"must be {'>=' if inclusive else '>'} {low}, got {value}")


def validate(c: TrainConfig) -> None:
    """Raise ConfigError naming the first bad option."""
    _choice("data", c.data, DATASETS)
    _choice("activation", c.activation, tuple(ACTIVATIONS))
    _choice("init", c.init, ("auto", *INIT_SCHEMES))
    _choice("loss", c.loss, tuple(LOSSES))
    if c.schedule is not None:
        _choice("schedule", c.schedule, SCHEDULES)
    _choice("dtype", c.dtype, DTYPES)
    if c.optimizer is not None:
        _choice("optimizer", c.optimizer, tuple(OPTIMIZERS))
    if c.hidden is not None:
        for size in c.hidden:
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ConfigError("hidden", f"hidden sizes must be positive integers, got {size!r}")
    if c.model is not None:
        if not c.is_image:
            raise ConfigError("model", "conv models need image data (--data cifar10); "
                                       "use --hidden for 2D data")
        try:
            parse_arch(resolve_arch(c.model))
        except ValueError as exc:
            raise ConfigError("model", str(exc)) from None
    for option, low in (("points", 1), ("classes", 2), ("epochs", 1), ("iterations", 1),
                        ("step_size", 1), ("patience", 1), ("val_size", 0), ("limit", 1),
                        ("checkpoint_every", 0)):
        _at_least(option, getattr(c, option), low)
    for option in ("noise", "reg", "weight_scale", "dropout", "label_smoothing", "momentum",
                   "warmup", "min_lr", "batch_size", "data_seed", "seed"):
        _at_least(option, getattr(c, option), 0)
    _at_least("lr", c.lr, 0, inclusive=False)
    _at_least("gamma", c.gamma, 0, inclusive=False)
    _at_least("time_budget", c.time_budget, 0, inclusive=False)
    if c.dropout >= 1:
        raise ConfigError("dropout", f"is the drop probability and must be < 1, got {c.dropout}")
    if c.label_smoothing >= 1:
        raise ConfigError("label_smoothing", f"must be < 1, got {c.label_smoothing}")
    if c.val_fraction is not None and not 0 <= c.val_fraction < 1:
        raise ConfigError("val_fraction", f"must be in [0, 1), got {c.val_fraction}")
    if c.label_smoothing and c.loss != "softmax":
        raise ConfigError("label_smoothing", "applies to the softmax loss only")


def parse_hidden(text: str) -> list[int]:
    """'100' -> [100]; '64,64' or '64x64' -> [64, 64]; 'none' -> [] (a linear classifier)."""
    text = text.strip().lower()
    if text in ("none", "linear"):
        return []
    parts = text.replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ConfigError("hidden", f"{text!r} is not a list of layer sizes such as 100 or 64,64 "
                                    "(or none for a linear classifier)") from None
    for size in sizes:
        if size <= 0:
            raise ConfigError("hidden", f"hidden sizes must be positive, got {size}")
    return sizes


def format_hidden(sizes: list[int] | None) -> str:
    return "none" if not sizes else "x".join(map(str, sizes))
