"""The full description of one training run: every option, defined once.

Each ``TrainConfig`` field carries an ``Option``: its help text, its help panel,
and the one parser and formatter of its values. ``nnx train`` builds its
command-line options from them, ``nnx sweep`` parses ``--set``/``--grid`` and
sweep files with them, and the rerun command, ``config.json`` and the CSV
columns write values with them: one name and one syntax per thing. Field names
are the option names (``batch_size`` is ``--batch-size``), the sweep's axis
names and the CSV column names. Fields left as None take the data set's
default when resolved, so ``config.json`` records the values a run really used.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from experiments.datasets import FIXED_CLASSES, GENERATORS
from experiments.errors import ConfigError
from mlp.arch import parse_arch, resolve_arch
from mlp.init import INIT_SCHEMES
from mlp.kernels.conv import ALGORITHMS as CONV_ALGORITHMS
from mlp.layers import ACTIVATIONS
from mlp.losses import LOSSES
from mlp.optim import OPTIMIZERS, SCHEDULES

IMAGE_DATASETS = ("cifar10",)
DATASETS = (*GENERATORS, *IMAGE_DATASETS)
DTYPES = ("auto", "float32", "float64")
RECIPE, DATA, MODEL, OPTIM, RUN = "Recipe", "Data", "Model", "Optimisation", "Run"

# Bounds that keep an absurd value (a typo, an exponent) from reaching NumPy.
MAX_COUNT = 10**9           # epochs, iterations, points, sizes
MAX_SEED = 2**63 - 1


# ---- values: one parser and one formatter per kind ------------------------------------
def parse_int(option: str, text: str) -> int:
    try:
        return int(text.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(option, f"{text!r} is not a whole number") from None


def parse_float(option: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(option, f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(option, f"must be a finite number, got {text.strip()}")
    return value


def parse_bool(option: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        raise ConfigError(option, f"{text!r} is not true or false")
    return lowered in ("true", "yes", "1", "on")


def parse_hidden(text: str, option: str = "hidden") -> list[int]:
    """'100' -> [100]; '64x64' (or '64,64') -> [64, 64]; 'none' -> [] (a linear classifier)."""
    text = text.strip().lower()
    if text in ("none", "linear"):
        return []
    try:
        sizes = [int(p) for p in text.replace(",", "x").split("x")]
    except ValueError:
        raise ConfigError(option, f"{text!r} is not a list of layer sizes such as 100 or 64x64 "
                                  "(or none for a linear classifier)") from None
    for size in sizes:
        if not 0 < size <= MAX_COUNT:
            raise ConfigError(option, f"hidden sizes must be between 1 and {MAX_COUNT:,}, got {size}")
    return sizes


def format_hidden(sizes: list[int] | None) -> str:
    """[64, 64] -> '64x64'; [] -> 'none': the text ``parse_hidden`` reads back."""
    return "none" if not sizes else "x".join(map(str, sizes))


def parse_duration(text: str, option: str = "time_budget") -> float:
    """'90s', '45m', '1.5h' or a plain number of seconds -> seconds."""
    text = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise ConfigError(option, f"{text!r} is not a duration such as 90s, 45m or 1.5h") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(option, f"a duration must be positive and finite, got {text!r}")
    return seconds


def parse_size(option: str, text: str) -> int | float:
    """A held-out size as scikit-learn's test_size: a whole number counts examples,
    a number with a point (0.2) is a fraction of each class."""
    text = text.strip()
    if text.replace("_", "").isdigit():
        return parse_int(option, text)
    value = parse_float(option, text)
    return 0 if value == 0 else value       # 0.0 and 0 both hold out nothing: one value


# Named recipes: option values a recipe gives to the options not given. airbench94 is
# Keller Jordan's airbench94 (arXiv 2404.00498) in nnx's terms: its lr 11.5 per 1024
# examples with Nesterov 0.85 is 11.5 / (1 + 1 / 0.15) = 1.5 on a batch-mean loss, and
# its weight decay 0.0153 per 1024 examples is 0.0153 * 1024 / (1024 * (1 + 1 / 0.15))
# = 0.0020 per step; the lr rises from 0.2x to its peak at 23 % of the run
# and falls to 0.07x at the end (the share holds whatever the number of epochs a time
# budget plans).
RECIPES = {
    "airbench94": {
        "data": "cifar10", "arch": "airbench94", "activation": "gelu", "init": "dirac",
        "augment": True, "flip": "alternating", "pad": "reflect", "shift": 2,
        "bn_decay": 0.6, "bn_eps": 1e-12, "bn_scale": False, "bn_bias_lr": 64.0,
        "whiten_bias_epochs": 3, "label_smoothing": 0.2, "reg": 0.0,
        "optimizer": "nesterov", "lr": 1.5, "momentum": 0.85, "weight_decay": 0.0153 / (1 + 1 / 0.15),
        "schedule": "linear", "warmup_share": 0.23, "warmup_from": 0.2, "min_lr": 0.07 * 1.5,
        "epochs": 10, "batch_size": 1024, "ema_decay": 0.95, "ema_every": 5, "ema_start": 3.0,
        "dtype": "float32",
    },
}


@dataclass(frozen=True)
class Option:
    """How one TrainConfig field is written and read, everywhere.

    ``kind`` is int, float, str, bool, size, duration or hidden; ``choices``
    limits a str; ``low``/``high`` bound a number (``open_low``/``open_high``:
    strictly). ``optional`` fields take none (the data set's default, or off);
    ``default_help`` says what a None default becomes.
    """

    help: str
    panel: str
    kind: str = "str"
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False
    default_help: str = ""
    metavar: str = ""

    def parse(self, name: str, text: str) -> Any:
        """A value from command-line text; ConfigError naming ``name`` if it is bad."""
        if not isinstance(text, str):
            raise ConfigError(name, f"{text!r} is not text")
        if self.optional and self.kind != "hidden" and text.strip().lower() in ("none", "null"):
            return None
        value = {"int": parse_int, "float": parse_float, "bool": parse_bool, "size": parse_size,
                 "str": lambda option, t: t.strip(),
                 "duration": lambda option, t: parse_duration(t, option),
                 "hidden": lambda option, t: parse_hidden(t, option)}[self.kind](name, text)
        self.check(name, value)
        return value

    def coerce(self, name: str, value: Any) -> Any:
        """A typed value (from TOML, JSON or Python) as this field holds it: text is
        parsed, 1 for a float field is 1.0 (so equal configs hash to equal keys)."""
        if isinstance(value, str):
            return self.parse(name, value)
        if value is None:
            return None
        kind, ok = self.kind, False
        if kind == "hidden":
            sizes = [value] if isinstance(value, int) and not isinstance(value, bool) else value
            if isinstance(sizes, (list, tuple)) and all(_is_int(s) for s in sizes):
                value, ok = [int(s) for s in sizes], True
        elif kind in ("float", "duration") and _is_number(value):
            value, ok = float(value), True
        elif kind in ("int", "size") and _is_int(value):
            value, ok = int(value), True
        elif kind == "size" and _is_number(value):
            value, ok = (0 if value == 0 else float(value)), True
        elif kind == "bool" and isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(name, f"{value!r} is not a valid {kind} value")
        self.check(name, value)
        return value

    def check(self, name: str, value: Any) -> None:
        """Bounds and choices; None (a data set default) always passes."""
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise ConfigError(name, f"{value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.kind == "hidden":
            for size in value:
                if not 0 < size <= MAX_COUNT:
                    raise ConfigError(name, f"hidden sizes must be between 1 and {MAX_COUNT:,}, "
                                            f"got {size}")
            return
        if not _is_number(value):
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value}")
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            raise ConfigError(name, f"must be {'>' if self.open_low else '>='} {self.low:g}, got {value}")
        if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
            raise ConfigError(name, f"must be {'<' if self.open_high else '<='} {self.high:g}, "
                                    f"got {value}")

    def format(self, value: Any) -> str:
        """The text ``parse`` reads back to ``value``: floats round-trip, hidden is
        64x64, None is none."""
        if value is None:
            return "none"
        if self.kind == "hidden":
            return format_hidden(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def option(default, help: str, panel: str, **kwargs) -> Any:
    """A dataclass field with its Option; a list default becomes a factory."""
    meta = {"option": Option(help, panel, optional=default is None, **kwargs)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- data
    recipe: str | None = option(None, "A named set of defaults for the other options (each can still "
                                "be given); airbench94: the one-hour CIFAR-10 recipe (README).",
                                RECIPE, choices=tuple(RECIPES))
    data: str = option("spiral", "Data set.", DATA, choices=DATASETS)
    points: int = option(100, "2D data: points per class.", DATA, kind="int", low=1, high=MAX_COUNT)
    classes: int = option(3, "2D data: classes (spiral and blobs; the others have 2).", DATA,
                          kind="int", low=2, high=1000)
    noise: float | None = option(None, "2D data: std of the noise that moves the points.", DATA,
                                 kind="float", low=0, default_help="per data set, spiral 0.2")
    val_size: int | float | None = option(
        None, "Held out for validation, from each class in proportion: a fraction such as 0.2, "
        "or a number of examples such as 5000.", DATA, kind="size", low=0,
        default_help="0 for 2D data, 5000 for cifar10")
    data_seed: int = option(0, "Seed of the data generator and the validation split.", DATA,
                            kind="int", low=0, high=MAX_SEED)
    data_dir: str | None = option(None, "CIFAR-10: where `nnx data download` put it "
                                  "(also $NNX_DATA_DIR).", DATA, default_help="~/.cache/nnx",
                                  metavar="DIR")
    limit: int | None = option(None, "CIFAR-10: use only the first N training images (quick runs).",
                               DATA, kind="int", low=1, high=MAX_COUNT)
    augment: bool = option(False, "CIFAR-10: flips and shifts of the training images (--flip, --pad, "
                           "--shift).", DATA, kind="bool")
    flip: str = option("random", "--augment: random (each image p=0.5, every epoch) or alternating "
                       "(a fixed random half mirrored in even epochs, the other half in odd ones).",
                       DATA, choices=("random", "alternating"))
    pad: str = option("zero", "--augment: fill of the pixels a shift uncovers: zero or reflect.",
                      DATA, choices=("zero", "reflect"))
    shift: int = option(2, "--augment: shifts of up to this many pixels in y and x.", DATA,
                        kind="int", low=0, high=16)
    # ---- model
    arch: str | None = option(None, "ConvNet architecture: a preset or a spec such as "
                              "conv16x5-pool2-fc10 (see README).", MODEL,
                              default_help="convnetjs for cifar10; an MLP otherwise", metavar="ARCH")
    conv_algorithms: str = option("auto", "ConvNets: auto (each conv's algorithm chosen by timing) or "
                                  "layers pinned, such as 0:im2col2,3:winograd4 (numbered as "
                                  "config.json numbers them; the rest auto). A run's recorded "
                                  "command pins what it chose, to give its numbers again.", MODEL,
                                  metavar="PINS")
    hidden: list[int] | None = option(None, "MLP hidden sizes: 100, 64x64 (two layers), or none for "
                                      "a linear classifier.", MODEL, kind="hidden",
                                      default_help="100", metavar="SIZES")
    activation: str = option("relu", "MLP activation.", MODEL, choices=tuple(ACTIVATIONS))
    init: str = option("auto", "Weight init: auto (He for ReLU, Xavier for tanh/sigmoid), he, "
                       "xavier, or normal (std --weight-scale).", MODEL, choices=("auto", *INIT_SCHEMES))
    weight_scale: float = option(1e-2, "Std of --init normal.", MODEL, kind="float", low=0)
    dropout: float = option(0.0, "Drop probability after each hidden layer (inverted dropout).",
                            MODEL, kind="float", low=0, high=1, open_high=True)
    loss: str = option("softmax", "softmax (cross-entropy) or svm (multiclass hinge).", MODEL,
                       choices=tuple(LOSSES))
    reg: float | None = option(None, "L2 strength: adds 0.5 * reg * sum(W**2) over weights (not "
                               "biases), gradient reg * W.", MODEL, kind="float", low=0,
                               default_help="1e-3; cifar10 5e-4")
    bn_decay: float = option(0.9, "BatchNorm: the fraction of its running mean and variance kept "
                             "at each training step (PyTorch's momentum is 1 - bn_decay).", MODEL,
                             kind="float", low=0, high=1)
    bn_eps: float = option(1e-5, "BatchNorm: added to the variance before its square root.", MODEL,
                           kind="float", low=0, open_low=True, high=1)
    bn_scale: bool = option(True, "BatchNorm learns its scale (gamma); --no-bn-scale keeps it at 1.",
                            MODEL, kind="bool")
    bn_bias_lr: float = option(1.0, "BatchNorm's biases (beta) learn this many times faster than "
                               "the other parameters.", MODEL, kind="float", low=0, open_low=True,
                               high=1e4)
    whiten_bias_epochs: int | None = option(None, "The whitening layer's bias trains for this many "
                                            "epochs, then stays.", MODEL, kind="int", low=0,
                                            high=MAX_COUNT, default_help="throughout")
    label_smoothing: float = option(0.0, "Softmax label smoothing.", MODEL, kind="float", low=0,
                                    high=1, open_high=True)
    dtype: str = option("auto", "auto (float64 for MLPs, float32 for ConvNets), float32 or float64.",
                        MODEL, choices=DTYPES)
    # ---- optimisation
    optimizer: str | None = option(None, "Update rule.", OPTIM, choices=tuple(OPTIMIZERS),
                                   default_help="sgd; cifar10 nesterov")
    lr: float | None = option(None, "Learning rate.", OPTIM, kind="float", low=0, open_low=True,
                              default_help="1.0 for 2D data, 0.02 for cifar10")
    momentum: float = option(0.9, "Momentum of momentum and nesterov.", OPTIM, kind="float", low=0,
                             high=1, open_high=True)
    weight_decay: float = option(0.0, "Weight decay: every step shrinks each parameter (biases too) by "
                                 "this fraction at the base --lr, whatever --lr is (airbench's "
                                 "parametrisation); unlike --reg it is not part of the loss.", OPTIM,
                                 kind="float", low=0, high=1, open_high=True)
    schedule: str | None = option(None, "constant, step (x lr-decay every step-size epochs), cosine "
                                  "or linear (both after --warmup epochs).", OPTIM, choices=SCHEDULES,
                                  default_help="constant; cifar10 cosine")
    step_size: int = option(10, "Step schedule: epochs between decays.", OPTIM, kind="int", low=1,
                            high=MAX_COUNT)
    lr_decay: float = option(0.1, "Step schedule: the factor the lr is multiplied by at each decay.",
                             OPTIM, kind="float", low=0, open_low=True, high=1)
    warmup: float | None = option(None, "Cosine and linear schedules: warm-up epochs.", OPTIM,
                                  kind="float", low=0, high=MAX_COUNT, default_help="0; cifar10 0.5")
    warmup_share: float | None = option(None, "Cosine and linear schedules: the warm-up as this "
                                        "share of the planned epochs (moving with a time budget's "
                                        "plan), instead of --warmup.", OPTIM, kind="float", low=0,
                                        high=1, open_high=True)
    warmup_from: float = option(0.0, "The warm-up starts at this fraction of --lr.", OPTIM,
                                kind="float", low=0, high=1)
    min_lr: float = option(0.0, "Cosine and linear schedules: final learning rate.", OPTIM,
                           kind="float", low=0)
    ema_decay: float = option(0.0, "Lookahead: every --ema-every updates from epoch --ema-start, the "
                              "weights move to their moving average of decay ema_decay**every * "
                              "progress**3 (airbench: 0.95); 0 = off.", OPTIM, kind="float", low=0,
                              high=1, open_high=True)
    ema_every: int = option(5, "Lookahead: updates between pulls.", OPTIM, kind="int", low=1,
                            high=MAX_COUNT)
    ema_start: float = option(3.0, "Lookahead: the epoch it starts.", OPTIM, kind="float", low=0,
                              high=MAX_COUNT)
    epochs: int | None = option(None, "Epochs.", OPTIM, kind="int", low=1, high=10**7,
                                default_help="10000 for 2D data, 10 for cifar10")
    iterations: int | None = option(None, "Train for this many updates instead of --epochs.", OPTIM,
                                    kind="int", low=1, high=MAX_COUNT)
    batch_size: int | None = option(None, "Minibatch size; 0 = full batch.", OPTIM, kind="int",
                                    low=0, high=MAX_COUNT, default_help="0 for 2D data, 128 for cifar10")
    patience: int | None = option(None, "Early stopping: epochs without a better validation "
                                  "accuracy.", OPTIM, kind="int", low=1, high=MAX_COUNT)
    time_budget: float | None = option(None, "Fit the epochs and the schedule to this wall time "
                                       "(90s, 45m, 1.5h), measured from the first batches' speed.",
                                       OPTIM, kind="duration", metavar="DURATION")
    seed: int = option(0, "Seed of initialisation, shuffling and dropout.", OPTIM, kind="int",
                       low=0, high=MAX_SEED)
    # ---- run
    checkpoint_every: int | None = option(None, "Write checkpoint.npz every N epochs; 0 = never.",
                                          RUN, kind="int", low=0, high=MAX_COUNT,
                                          default_help="1 for cifar10, 0 for 2D data")
    snapshot_every: int = option(0, "2D data: keep the network every N epochs (and before the "
                                 "first) in snapshots.npz, for `nnx plot-boundary --animate`; "
                                 "0 = never.", RUN, kind="int", low=0, high=MAX_COUNT)

    @property
    def is_image(self) -> bool:
        return self.data in IMAGE_DATASETS

    @property
    def is_conv(self) -> bool:
        return self.arch is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from stored values (config.json, a model file, a sweep file):
        typed and checked by each field's Option; the names of older nnx versions
        are read as today's (``RENAMED``)."""
        values = upgrade_names(values)
        unknown = sorted(set(values) - set(OPTIONS))
        if unknown:
            raise ConfigError(unknown[0], f"unknown option {unknown[0]!r}")
        return cls(**{name: OPTIONS[name].coerce(name, value) for name, value in values.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(TrainConfig)}

# Names of older nnx versions still found in users' files (config.json of a run,
# the config stored in model.npz, sweep.toml): old name -> today's.
RENAMED = {"model": "arch", "val_fraction": "val_size", "gamma": "lr_decay"}
DROPPED = ("extra",)       # always empty; nothing read it


def upgrade_names(values: dict) -> dict:
    """Stored option values with older names renamed; a value under both names is
    refused. nnx 0.1 stored both val_fraction and val_size and read only one: the
    fraction for 2D data, the count for images."""
    values = {k: v for k, v in values.items() if k not in DROPPED}
    if "val_fraction" in values and "val_size" in values:
        del values["val_size" if values.get("data", "spiral") not in IMAGE_DATASETS else "val_fraction"]
    for old, new in RENAMED.items():
        if old in values:
            if new in values:
                raise ConfigError(new, f"{old!r} is the old name of {new!r}; give it once")
            values[new] = values.pop(old)
    return values


def option_names() -> tuple[str, ...]:
    return tuple(OPTIONS)


def check_option(name: str) -> str:
    """``name`` (dashes allowed, old names read as new) if it is an option; else ConfigError."""
    import difflib
    name = name.strip().replace("-", "_")
    name = RENAMED.get(name, name)
    if name not in OPTIONS:
        close = difflib.get_close_matches(name, OPTIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see nnx train --help)"
        raise ConfigError(name, f"unknown option {name!r}{hint}")
    return name


def parse_option(name: str, text: str) -> Any:
    return OPTIONS[name].parse(name, text)


def format_option(name: str, value: Any) -> str:
    return OPTIONS[name].format(value)


# Defaults per data set for the fields left as None. The 2D defaults are the
# cs231n notes' spiral run: full-batch gradient descent, lr 1, reg 1e-3.
DEFAULTS_2D = {"hidden": [100], "reg": 1e-3, "optimizer": "sgd", "lr": 1.0, "epochs": 10000,
               "batch_size": 0, "val_size": 0, "checkpoint_every": 0,
               "schedule": "constant", "warmup": 0.0}
# Measured on CIFAR-10 with the convnetjs preset and --augment, 10 epochs: this
# recipe reached 71.2 % validation accuracy where the ConvNetJS demo's Adadelta
# (lr 1, reg 1e-4, batch 128) reached 59.9 %.
DEFAULTS_IMAGE = {"arch": "convnetjs", "reg": 5e-4, "optimizer": "nesterov", "lr": 0.02,
                  "epochs": 10, "batch_size": 128, "val_size": 5000, "checkpoint_every": 1,
                  "schedule": "cosine", "warmup": 0.5}


def apply_recipe(values: dict) -> dict:
    """Option values as given (by name), completed by the named recipe among them: the
    options given keep their values, the recipe fills in the others."""
    name = values.get("recipe")
    if name is None:
        return dict(values)
    if name not in RECIPES:
        raise ConfigError("recipe", f"{name!r} is not one of {', '.join(RECIPES)}")
    return {**RECIPES[name], **values}


def resolve(config: TrainConfig) -> TrainConfig:
    """A copy with every None default filled in for its data set, validated."""
    validate(config)
    values = config.to_dict()
    defaults = dict(DEFAULTS_IMAGE if config.is_image else DEFAULTS_2D)
    if config.is_image and config.hidden is not None:
        defaults.pop("arch")  # an explicit --hidden on images asks for an MLP
    if config.optimizer is not None and config.optimizer != defaults["optimizer"]:
        # the data set's lr belongs to its optimizer; another takes its own default
        defaults["lr"] = OPTIMIZERS[config.optimizer].default_lr
    for name, value in defaults.items():
        if values.get(name) is None:
            values[name] = value
    if values["dtype"] == "auto":
        values["dtype"] = "float32" if values.get("arch") else "float64"
    if config.data in FIXED_CLASSES:
        values["classes"] = FIXED_CLASSES[config.data]
    pins = conv_algorithm_pins(config.conv_algorithms)
    if pins and values.get("arch") is None:     # known once the data set's default arch is in
        raise ConfigError("conv_algorithms", "pins the conv layers of a ConvNet; this run trains an "
                                             "MLP (give --arch)")
    values["conv_algorithms"] = format_conv_algorithms(pins)    # one spelling, one trial key
    resolved = TrainConfig(**values)
    validate(resolved)
    return resolved


def conv_algorithm_pins(text: str) -> dict[int, str]:
    """--conv-algorithms as {layer index: algorithm}: {} for auto; ConfigError naming the
    option for anything else that is not LAYER:ALGORITHM pairs, comma-separated."""
    if text.strip().lower() == "auto":
        return {}
    pins = {}
    for pair in text.split(","):
        layer, colon, algorithm = pair.strip().partition(":")
        layer, algorithm = layer.strip(), algorithm.strip().lower()
        if not colon or not layer.isdigit():
            raise ConfigError("conv_algorithms", f"{pair.strip()!r} is not LAYER:ALGORITHM (write auto, "
                                                 "or pairs such as 0:im2col2,3:winograd4)")
        if algorithm not in CONV_ALGORITHMS:
            raise ConfigError("conv_algorithms", f"{algorithm!r} is not one of {', '.join(CONV_ALGORITHMS)}")
        if int(layer) in pins:
            raise ConfigError("conv_algorithms", f"layer {int(layer)} is pinned twice")
        pins[int(layer)] = algorithm
    return pins


def format_conv_algorithms(algorithms: dict) -> str:
    """{layer index: algorithm} (as ``Network.conv_algorithms()`` gives them) as the text
    --conv-algorithms reads back; auto for none."""
    return ",".join(f"{layer}:{name}" for layer, name in algorithms.items()) or "auto"


def validate(c: TrainConfig) -> None:
    """Raise ConfigError naming the first bad option: each field's own bounds, then
    the rules that tie fields together."""
    for name, opt in OPTIONS.items():
        opt.check(name, getattr(c, name))
    conv_algorithm_pins(c.conv_algorithms)
    if c.arch is not None:
        if not c.is_image:
            raise ConfigError("arch", "ConvNets need image data (--data cifar10); use --hidden for "
                                      "2D data")
        try:
            parse_arch(resolve_arch(c.arch))
        except ValueError as exc:
            raise ConfigError("arch", str(exc)) from None
    if isinstance(c.val_size, float) and c.val_size >= 1:
        raise ConfigError("val_size", f"a fraction must be below 1, got {c.val_size} (write a number "
                                      "of examples without a point, e.g. 5000)")
    if c.snapshot_every and (c.is_image or c.arch is not None):
        raise ConfigError("snapshot_every", "snapshots are for animating 2D decision regions; "
                                            "this run trains on images")
    if c.label_smoothing and c.loss != "softmax":
        raise ConfigError("label_smoothing", "applies to the softmax loss only")

