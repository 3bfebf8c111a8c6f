"""Sweeps: a grid of ``nnx train`` options, expanded into trials and run resumably.

A spec is fixed options plus axes (``hidden=3,6,20``, ``reg=0.001,0.1``,
``seed=0-4``); every option name is a TrainConfig field, parsed with that
field's type. Each trial is identified by a hash of its *resolved* config, so
a re-run of the same spec finds the trials it already finished. The driver
(``run_sweep``) is the only process that writes files; workers return records.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import itertools
import json
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from experiments.config import TrainConfig, format_hidden, parse_hidden, resolve
from experiments.errors import ClusterLostError, ConfigError
from experiments.store import SweepStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Part of every trial key: bump it when a result row would mean something else
# for the same config (new columns, different metrics), so old rows re-run.
RESULT_SCHEMA_VERSION = 1
KEY_LENGTH = 16

OPTIONS = {f.name: f for f in fields(TrainConfig) if f.name != "extra"}
SPEC_KEYS = ("name", "seeds", "fixed", "grid")


class SweepError(ConfigError):
    """A bad sweep spec; ``flag`` names where it came from (``--grid reg``, ``--config``)."""

    def __init__(self, option: str, message: str, source: str | None = None):
        super().__init__(option, message)
        self.source = source

    @property
    def flag(self) -> str:
        return self.source or super().flag


@dataclass
class SweepSpec:
    """Fixed options and axes, values typed as TrainConfig fields; ``seed`` is an axis like any other."""

    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    name: str | None = None


@dataclass(frozen=True)
class Trial:
    """One point of the grid: ``params`` are its axis values, ``config`` the resolved run."""

    key: str
    params: dict
    config: TrainConfig

    def describe(self) -> str:
        return describe(self.params)


# ---- values --------------------------------------------------------------------
def _kind(name: str) -> tuple[str, bool]:
    """('int' | 'float' | 'str' | 'bool' | 'list[int]', optional) of a TrainConfig field."""
    annotation = OPTIONS[name].type
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    parts = [p.strip() for p in text.split("|")]
    return next(p for p in parts if p != "None"), "None" in parts


def check_option(name: str, source: str | None = None) -> None:
    if name not in OPTIONS:
        close = difflib.get_close_matches(name, OPTIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see nnx train --help)"
        raise SweepError(name, f"unknown option {name!r}{hint}", source or "--grid")


def parse_value(name: str, text: str) -> Any:
    """One option value from text, with the type of TrainConfig's field ``name``."""
    kind, optional = _kind(name)
    text = text.strip()
    if kind == "list[int]":
        return parse_hidden(text)
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(name, f"{text!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    if kind == "bool":
        if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
            raise ConfigError(name, f"{text!r} is not true or false")
        return text.lower() in ("true", "yes", "1")
    return text


def coerce_value(name: str, value: Any) -> Any:
    """A typed value (from TOML or Python) as TrainConfig's field ``name`` wants it:
    1 for a float field is 1.0, so equal configs hash to equal trial keys."""
    if isinstance(value, str):
        return parse_value(name, value)
    kind, optional = _kind(name)
    if value is None and optional:
        return None
    if kind == "list[int]":
        sizes = [value] if isinstance(value, int) else value
        if isinstance(sizes, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            return parse_hidden(",".join(map(str, sizes)) or "none")
    elif kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind == "bool" and isinstance(value, bool):
        return value
    raise ConfigError(name, f"{value!r} is not a valid {kind} value")


def parse_values(name: str, text: str) -> list:
    """An axis from text: 'V1,V2,...'; integer options also take ranges such as 0-9."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ConfigError(name, "the axis has no values")
    if "" in items:
        raise ConfigError(name, f"empty value in {text!r}")
    values = []
    for item in items:
        low, dash, high = item.partition("-")
        if _kind(name)[0] == "int" and dash and low.isdigit() and high.isdigit():
            if int(high) < int(low):
                raise ConfigError(name, f"range {item!r} is empty")
            values += range(int(low), int(high) + 1)
        else:
            values.append(parse_value(name, item))
    return values


def format_value(name: str, value: Any) -> str:
    """The text ``parse_value`` reads back: hidden as 64x64, None as none."""
    if name == "hidden" and value is not None:
        return format_hidden(value)
    return "none" if value is None else str(value)


def describe(params: dict) -> str:
    return " ".join(f"{name}={format_value(name, value)}" for name, value in params.items())


# ---- specs ---------------------------------------------------------------------
def parse_assignment(text: str, source: str) -> tuple[str, str]:
    """'NAME=VALUE' -> (name, value); dashes in the name count as underscores."""
    name, eq, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not eq or not name:
        raise SweepError(name or text, f"{text!r} is not NAME=VALUE", source)
    check_option(name, source)
    return name, value


def parse_grid(items: Iterable[str]) -> dict[str, list]:
    """['hidden=3,6', 'reg=0.1'] -> {'hidden': [[3], [6]], 'reg': [0.1]}."""
    grid: dict[str, list] = {}
    for item in items:
        name, text = parse_assignment(item, "--grid")
        if name in grid:
            raise SweepError(name, f"axis {name} is given twice", f"--grid {name}")
        grid[name] = _sourced(name, parse_values, name, text)
    return grid


def parse_fixed(items: Iterable[str]) -> dict[str, Any]:
    """['epochs=100', 'patience=none'] -> {'epochs': 100, 'patience': None}."""
    fixed = {}
    for item in items:
        name, text = parse_assignment(item, "--set")
        fixed[name] = _sourced(name, parse_value, name, text, source=f"--set {name}")
    return fixed


def parse_seeds(text: str) -> list[int]:
    """'0-9' or '0,3,5' -> the seed axis."""
    return _sourced("seed", parse_values, "seed", text, source="--seeds")


def _sourced(name, parse, *args, source=None):
    """``parse(*args)``, its ConfigError reworded to say which flag or table it came from."""
    try:
        return parse(*args)
    except ConfigError as exc:
        raise SweepError(name, str(exc), source or f"--grid {name}") from None


def check_name(name, source: str = "--name") -> str | None:
    """A sweep name, which becomes part of a directory name."""
    if name is not None and not (isinstance(name, str) and re.fullmatch(r"[\w.-]+", name)):
        raise SweepError("name", f"{name!r} is not a name (letters, digits, _ . -)", source)
    return name


def load_spec(path: str | Path) -> SweepSpec:
    """A TOML sweep file: ``name``, ``seeds``, a ``[fixed]`` table and a ``[grid]`` table."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SweepError("config", f"cannot read {path}: {exc.strerror}", "--config") from None
    return spec_from_toml(text, str(path))


def spec_from_toml(text: str, where: str = "sweep file") -> SweepSpec:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SweepError("config", f"{where}: {exc}", "--config") from None
    unknown = sorted(set(doc) - set(SPEC_KEYS))
    if unknown:
        raise SweepError("config", f"{where}: unknown key {unknown[0]!r} (a sweep file has "
                                   f"{', '.join(SPEC_KEYS)})", "--config")
    for table in ("fixed", "grid"):
        if not isinstance(doc.get(table, {}), dict):
            raise SweepError("config", f"{where}: {table} must be a table ([{table}])", "--config")
    if "seeds" in doc and "seed" in doc.get("grid", {}):
        raise SweepError("seed", f"{where}: give the seeds once, as seeds or in [grid]", "--config")
    spec = SweepSpec(name=check_name(doc.get("name"), "--config"))
    for name, value in doc.get("fixed", {}).items():
        check_option(name, "--config")
        spec.fixed[name] = _sourced(name, coerce_value, name, value, source=f"--config [fixed] {name}")
    for name, values in doc.get("grid", {}).items():
        check_option(name, "--config")
        spec.grid[name] = _toml_axis(name, values)
    if "seeds" in doc:
        seeds = doc["seeds"]
        spec.grid["seed"] = _toml_axis("seed", seeds if isinstance(seeds, (list, str)) else [seeds])
    return spec


def _toml_axis(name: str, values) -> list:
    source = f"--config [grid] {name}"
    if isinstance(values, str):
        return _sourced(name, parse_values, name, values, source=source)
    values = values if isinstance(values, list) else [values]
    if not values:
        raise SweepError(name, "the axis has no values", source)
    return [_sourced(name, coerce_value, name, v, source=source) for v in values]


def spec_to_toml(spec: SweepSpec) -> str:
    """The spec as a TOML sweep file that ``load_spec`` reads back to the same trials."""
    lines = ["# nnx sweep spec; run it again with: nnx sweep --config sweep.toml --out DIR"]
    if spec.name:
        lines.append(f"name = {json.dumps(spec.name)}")
    lines += ["", "[fixed]"]
    lines += [f"{name} = {_toml_value(name, value)}" for name, value in spec.fixed.items()]
    lines += ["", "[grid]"]
    lines += [f"{name} = [{', '.join(_toml_value(name, v) for v in values)}]"
              for name, values in spec.grid.items()]
    return "\n".join(lines) + "\n"


def _toml_value(name: str, value) -> str:
    if value is None or name == "hidden":
        return json.dumps(format_value(name, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else json.dumps(value)


def build_spec(grid: Iterable[str] = (), seeds: str | None = None, config: str | Path | None = None,
               fixed: dict | None = None, name: str | None = None) -> SweepSpec:
    """The spec the command line asks for: the default grid unless --config or --grid is
    given, overridden by --seeds and the fixed options."""
    fixed = dict(fixed or {})
    axes = parse_grid(grid)
    if seeds is not None:
        if "seed" in axes:
            raise SweepError("seed", "give the seeds once: --seeds or --grid seed=...", "--seeds")
        axes["seed"] = parse_seeds(seeds)
    if config is not None:
        base = load_spec(config)
    elif axes.keys() - {"seed"}:
        base = SweepSpec()
    else:
        base = default_spec()
        if fixed or axes:          # changed: no longer the sweep called "default"
            base.name = None
    return merge_spec(base, fixed, axes, check_name(name))


def merge_spec(base: SweepSpec, fixed: dict, grid: dict, name: str | None = None) -> SweepSpec:
    """``base`` (a file or the default grid) overridden by the command line: an option
    fixed there stops being an axis, and an axis given there stops being fixed."""
    both = sorted(set(fixed) & set(grid))
    if both:
        raise SweepError(both[0], f"{both[0]} is both fixed and a grid axis; give it once",
                         f"--grid {both[0]}")
    merged_grid = {k: v for k, v in base.grid.items() if k not in fixed}
    merged_grid.update(grid)
    merged_fixed = {k: v for k, v in base.fixed.items() if k not in grid}
    merged_fixed.update(fixed)
    if "seed" in merged_grid:      # seeds innermost: one configuration's seeds sit together
        merged_grid["seed"] = merged_grid.pop("seed")
    return SweepSpec(merged_fixed, merged_grid, name or base.name)


# The README's main job: from a 3-unit net that underfits the spiral to a
# 100-unit one, under four L2 strengths from weak to too strong, five seeds each.
# Full-batch gradient descent as in the cs231n notes; the 80 trials take about
# a minute on 2 cores (bench/bench_sweep.py).
DEFAULT_SPEC = SweepSpec(
    fixed={"data": "spiral", "val_fraction": 0.2, "optimizer": "sgd", "lr": 1.0,
           "batch_size": 0, "epochs": 4000},
    grid={"hidden": [[3], [6], [20], [100]], "reg": [0.0001, 0.001, 0.01, 0.1],
          "seed": [0, 1, 2, 3, 4]},
    name="default")


def default_spec() -> SweepSpec:
    return dataclasses.replace(DEFAULT_SPEC, fixed=dict(DEFAULT_SPEC.fixed),
                               grid={k: list(v) for k, v in DEFAULT_SPEC.grid.items()})


# ---- trials --------------------------------------------------------------------
def trial_key(config: TrainConfig) -> str:
    """The hash of a resolved config and the result schema: equal keys, equal results."""
    payload = {"schema": RESULT_SCHEMA_VERSION, "config": config.to_dict()}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def expand(spec: SweepSpec) -> list[Trial]:
    """Every trial of the grid, built and resolved: a bad value anywhere raises
    SweepError before anything runs."""
    for name in [*spec.fixed, *spec.grid]:
        check_option(name)
    for name, values in spec.grid.items():
        if not values:
            raise SweepError(name, "the axis has no values", f"--grid {name}")
    trials, seen = [], {}
    for combo in itertools.product(*spec.grid.values()):
        params = dict(zip(spec.grid, combo, strict=True))
        config = _resolve_trial(spec, params)
        key = trial_key(config)
        if key in seen:
            hint = " (two layers of 64 are written 64x64)" if "hidden" in params else ""
            raise SweepError(next(iter(params), "grid"), f"trials {seen[key]!r} and {describe(params)!r} "
                             f"are the same run; remove the duplicate value{hint}", "--grid")
        seen[key] = describe(params)
        trials.append(Trial(key, params, config))
    return trials


def _resolve_trial(spec: SweepSpec, params: dict) -> TrainConfig:
    try:
        values = {name: coerce_value(name, v) for name, v in {**spec.fixed, **params}.items()}
        return resolve(TrainConfig(**values))
    except ConfigError as exc:
        if exc.option in params:
            raise SweepError(exc.option, f"{exc} (trial {describe(params)})",
                             f"--grid {exc.option}") from None
        raise SweepError(exc.option, str(exc), f"--{exc.option.replace('_', '-')}") from None


def spec_id(trials: list[Trial]) -> str:
    """A short hash of the set of trials: two specs with the same trials are the same sweep."""
    return hashlib.sha256("\n".join(sorted(t.key for t in trials)).encode()).hexdigest()[:8]


def default_out(spec: SweepSpec, trials: list[Trial], root: str | Path = "runs") -> Path:
    """runs/sweep-<name>, or runs/sweep-<data>-<axes>-<id> for an unnamed spec: the same
    command always lands in the same directory, so re-running it resumes."""
    if spec.name:
        return Path(root) / f"sweep-{spec.name}"
    data = trials[0].config.data if trials else "none"
    axes = "-".join(spec.grid) or "single"
    return Path(root) / f"sweep-{data}-{axes}-{spec_id(trials)}"


# ---- running -------------------------------------------------------------------
class SweepCallback:
    """Hooks ``run_sweep`` calls; override what you need."""

    def on_sweep_begin(self, total: int, skipped: int, todo: int, rows: list[dict]) -> None:
        pass

    def on_trial_end(self, trial: Trial, row: dict) -> None:
        pass


@dataclass
class SweepOutcome:
    out: Path
    trials: list[Trial]
    rows: dict               # trial key -> results.csv row (strings), every trial of the sweep
    ran: int
    skipped: int
    seconds: float

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows.values())


def plan(spec: SweepSpec, out: str | Path | None = None) -> tuple[list[Trial], Path]:
    """The validated trials of ``spec`` and the directory they go to."""
    trials = expand(spec)
    return trials, Path(out) if out is not None else default_out(spec, trials)


def run_sweep(spec: SweepSpec, out: str | Path | None = None, *, workers: int | None = None,
              scheduler: str | None = None, retry_failed: bool = False, force: bool = False,
              callback: SweepCallback | None = None) -> SweepOutcome:
    """Run every trial of ``spec`` not yet finished in ``out``; write rows as they finish."""
    from experiments.executors import connect, default_workers, execute

    started = time.perf_counter()
    callback = callback or SweepCallback()
    trials, out = plan(spec, out)
    # The cluster first: an unreachable one must leave no directory behind.
    with connect(scheduler) as cluster, SweepStore.open(out) as store:
        _adopt_spec(store, spec, trials, force)
        store.repair(force)
        rows = store.read_rows()
        rerun = {k for k, row in rows.items() if row["status"] == "failed"} if retry_failed else set()
        store.remove_trials(set(rows) - {t.key for t in trials} | rerun)
        rows = store.read_rows()
        # Longest first, so that the last trials to finish are short and no worker idles long.
        todo = sorted((t for t in trials if t.key not in rows), key=lambda t: -_cost(t.config))
        callback.on_sweep_begin(len(trials), len(trials) - len(todo), len(todo), list(rows.values()))
        workers = default_workers() if workers is None else workers
        results = execute([t.config.to_dict() for t in todo], workers, cluster)
        with contextlib.closing(results), _saying_what_is_saved(out, trials, rows):
            for index, record in results:
                row = store.append(todo[index], record)
                rows[row["trial"]] = row
                callback.on_trial_end(todo[index], row)
        store.write_summary([t.key for t in trials])
    return SweepOutcome(out, trials, {t.key: rows[t.key] for t in trials}, len(todo),
                        len(trials) - len(todo), time.perf_counter() - started)


@contextlib.contextmanager
def _saying_what_is_saved(out: Path, trials: list[Trial], rows: dict):
    """A lost cluster's error, completed with what the sweep has (``rows`` as it grows)."""
    try:
        yield
    except ClusterLostError as exc:
        raise ClusterLostError(f"{exc}: {len(trials) - len(rows)} trial(s) unfinished; the "
                               f"{len(rows)} finished are saved in {out}: run the same command "
                               "again to finish the sweep") from None


def _cost(config) -> float:
    """A rough guess of a trial's training time, for ordering only."""
    return (config.epochs or 1) * (1 + sum(config.hidden or [])) * config.points


def _adopt_spec(store: SweepStore, spec: SweepSpec, trials: list[Trial], force: bool) -> None:
    """Write the spec into a new sweep directory; refuse a different one without ``force``."""
    text = spec_to_toml(spec)
    stored = store.read_spec()
    if stored is None and store.has_foreign_files() and not force:
        raise ConfigError("out", f"{store.path} is not empty and holds no sweep; choose another "
                                 "--out or pass --force to use it")
    if stored is not None and stored != text and not force:
        try:
            same = {t.key for t in expand(spec_from_toml(stored))} == {t.key for t in trials}
        except ConfigError:
            same = False
        if not same:
            raise ConfigError("out", f"{store.path} holds a different sweep (see its sweep.toml); "
                                     "choose another --out, or pass --force to replace it (finished "
                                     "trials the two sweeps share are kept)")
    if stored != text:
        store.write_spec(text)
