"""Sweeps: a grid of ``nnx train`` options, expanded into trials and run resumably.

A sweep is fixed options plus axes (``hidden=3,6,20``, ``reg=0.001,0.1``,
``seed=0-4``); every option name is a TrainConfig field, parsed with that
field's type. Each trial is identified by a hash of its *resolved* config, so
a re-run of the same sweep finds the trials it already finished. Compatible
trials train together in stacks (``experiments.stacks``). The driver
(``run_sweep``) is the only process that writes files; workers return records.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.config import OPTIONS, TrainConfig, apply_recipe, format_option, parse_option, resolve
from experiments.config import check_option as config_check_option
from experiments.environment import environment
from experiments.errors import ClusterLostError, ConfigError
from experiments.resources import check_memory
from experiments.stacks import Stack, pack
from experiments.store import SweepStore, trial_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SWEEP_FILE_KEYS = ("name", "seeds", "fixed", "grid")
MAX_AXIS_VALUES = 1_000_000      # a range such as 0-9999999999 is a typo, not a sweep
MAX_TRIALS = 1_000_000


class SweepError(ConfigError):
    """A bad sweep definition; ``flag`` names where it came from (``--grid reg``, ``--config``)."""

    def __init__(self, option: str, message: str, source: str | None = None):
        super().__init__(option, message)
        self.source = source

    @property
    def flag(self) -> str:
        return self.source or super().flag


@dataclass
class Sweep:
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
def check_option(name: str, source: str | None = None) -> str:
    """The option ``name`` (dashes allowed, older names read as today's); SweepError if unknown."""
    try:
        return config_check_option(name)
    except ConfigError as exc:
        raise SweepError(exc.option, str(exc), source or "--grid") from None


def parse_value(name: str, text: str) -> Any:
    """One option value from text: the option's own parser, as ``nnx train`` uses."""
    return parse_option(name, text)


def coerce_value(name: str, value: Any) -> Any:
    """A typed value (from TOML or Python) as the option holds it."""
    return OPTIONS[name].coerce(name, value)


def parse_values(name: str, text: str) -> list:
    """An axis from text: 'V1,V2,...' (a value of several layers is written 64x64);
    whole-number options also take ranges such as 0-9."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ConfigError(name, "the axis has no values")
    if "" in items:
        raise ConfigError(name, f"empty value in {text!r}")
    values = []
    for item in items:
        low, dash, high = item.partition("-")
        if OPTIONS[name].kind == "int" and dash and low.isdigit() and high.isdigit():
            if int(high) < int(low):
                raise ConfigError(name, f"range {item!r} is empty")
            if int(high) - int(low) >= MAX_AXIS_VALUES:
                raise ConfigError(name, f"range {item!r} has more than {MAX_AXIS_VALUES:,} values")
            first, last = parse_value(name, low), parse_value(name, high)
            values += range(first, last + 1)
        else:
            values.append(parse_value(name, item))
    return values


def format_value(name: str, value: Any) -> str:
    """The text ``parse_value`` reads back: hidden as 64x64, None as none."""
    return format_option(name, value)


def describe(params: dict) -> str:
    return " ".join(f"{name}={format_value(name, value)}" for name, value in params.items())


# ---- sweeps and sweep files ------------------------------------------------------
def parse_assignment(text: str, source: str) -> tuple[str, str]:
    """'NAME=VALUE' -> (name, value); dashes in the name count as underscores."""
    name, eq, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not eq or not name:
        raise SweepError(name or text, f"{text!r} is not NAME=VALUE", source)
    return check_option(name, source), value


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


def load_sweep_file(path: str | Path) -> Sweep:
    """A TOML sweep file: ``name``, ``seeds``, a ``[fixed]`` table and a ``[grid]`` table."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SweepError("config", f"cannot read {path}: {exc.strerror}", "--config") from None
    except UnicodeDecodeError:
        raise SweepError("config", f"{path} is not a text file (a TOML sweep file is UTF-8 text)",
                         "--config") from None
    return sweep_from_toml(text, str(path))


def sweep_from_toml(text: str, where: str = "sweep file") -> Sweep:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SweepError("config", f"{where}: {exc}", "--config") from None
    unknown = sorted(set(doc) - set(SWEEP_FILE_KEYS))
    if unknown:
        raise SweepError("config", f"{where}: unknown key {unknown[0]!r} (a sweep file has "
                                   f"{', '.join(SWEEP_FILE_KEYS)})", "--config")
    for table in ("fixed", "grid"):
        if not isinstance(doc.get(table, {}), dict):
            raise SweepError("config", f"{where}: {table} must be a table ([{table}])", "--config")
    if "seeds" in doc and "seed" in doc.get("grid", {}):
        raise SweepError("seed", f"{where}: give the seeds once, as seeds or in [grid]", "--config")
    sweep = Sweep(name=check_name(doc.get("name"), "--config"))
    for name, value in doc.get("fixed", {}).items():
        name = check_option(name, "--config")
        sweep.fixed[name] = _sourced(name, coerce_value, name, value, source=f"--config [fixed] {name}")
    for name, values in doc.get("grid", {}).items():
        name = check_option(name, "--config")
        sweep.grid[name] = _toml_axis(name, values)
    if "seeds" in doc:
        seeds = doc["seeds"]
        sweep.grid["seed"] = _toml_axis("seed", seeds if isinstance(seeds, (list, str)) else [seeds])
    return sweep


def _toml_axis(name: str, values) -> list:
    source = f"--config [grid] {name}"
    if isinstance(values, str):
        return _sourced(name, parse_values, name, values, source=source)
    values = values if isinstance(values, list) else [values]
    if not values:
        raise SweepError(name, "the axis has no values", source)
    return [_sourced(name, coerce_value, name, v, source=source) for v in values]


def sweep_to_toml(sweep: Sweep) -> str:
    """The sweep as a TOML sweep file that ``load_sweep_file`` reads back to the same trials."""
    lines = ["# nnx sweep sweep; run it again with: nnx sweep --config sweep.toml --out DIR"]
    if sweep.name:
        lines.append(f"name = {json.dumps(sweep.name)}")
    lines += ["", "[fixed]"]
    lines += [f"{name} = {_toml_value(name, value)}" for name, value in sweep.fixed.items()]
    lines += ["", "[grid]"]
    lines += [f"{name} = [{', '.join(_toml_value(name, v) for v in values)}]"
              for name, values in sweep.grid.items()]
    return "\n".join(lines) + "\n"


def _toml_value(name: str, value) -> str:
    if value is None or name == "hidden":
        return json.dumps(format_value(name, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else json.dumps(value)


def build_sweep(grid: Iterable[str] = (), seeds: str | None = None, config: str | Path | None = None,
               fixed: dict | None = None, name: str | None = None) -> Sweep:
    """The sweep the command line asks for: the default grid unless --config or --grid is
    given, overridden by --seeds and the fixed options."""
    fixed = dict(fixed or {})
    axes = parse_grid(grid)
    if seeds is not None:
        if "seed" in axes:
            raise SweepError("seed", "give the seeds once: --seeds or --grid seed=...", "--seeds")
        axes["seed"] = parse_seeds(seeds)
    if config is not None:
        base = load_sweep_file(config)
    elif axes.keys() - {"seed"}:
        base = Sweep()
    else:
        base = default_sweep()
        if fixed or axes:          # changed: no longer the sweep called "default"
            base.name = None
    return merge_sweep(base, fixed, axes, check_name(name))


def merge_sweep(base: Sweep, fixed: dict, grid: dict, name: str | None = None) -> Sweep:
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
    return Sweep(merged_fixed, merged_grid, name or base.name)


# The README's main job: from a 3-unit net that underfits the spiral to a
# 100-unit one, under four L2 strengths from weak to too strong, five seeds each.
# Full-batch gradient descent as in the cs231n notes; the 80 trials, in stacks, take
# about 20 s of CPU on 2 cores (bench/bench_sweep.py).
DEFAULT_SWEEP = Sweep(
    fixed={"data": "spiral", "val_size": 0.2, "optimizer": "sgd", "lr": 1.0,
           "batch_size": 0, "epochs": 4000},
    grid={"hidden": [[3], [6], [20], [100]], "reg": [0.0001, 0.001, 0.01, 0.1],
          "seed": [0, 1, 2, 3, 4]},
    name="default")


def default_sweep() -> Sweep:
    return dataclasses.replace(DEFAULT_SWEEP, fixed=dict(DEFAULT_SWEEP.fixed),
                               grid={k: list(v) for k, v in DEFAULT_SWEEP.grid.items()})


# ---- trials --------------------------------------------------------------------
def expand(sweep: Sweep) -> list[Trial]:
    """Every trial of the grid, built and resolved: a bad value anywhere raises
    SweepError before anything runs."""
    for name in [*sweep.fixed, *sweep.grid]:
        check_option(name)
    for name, values in sweep.grid.items():
        if not values:
            raise SweepError(name, "the axis has no values", f"--grid {name}")
    trials, seen = [], {}
    for combo in itertools.product(*sweep.grid.values()):
        params = dict(zip(sweep.grid, combo, strict=True))
        config = _resolve_trial(sweep, params)
        key = trial_key(config)
        if key in seen:
            hint = " (two layers of 64 are written 64x64)" if "hidden" in params else ""
            raise SweepError(next(iter(params), "grid"), f"trials {seen[key]!r} and {describe(params)!r} "
                             f"are the same run; remove the duplicate value{hint}", "--grid")
        seen[key] = describe(params)
        trials.append(Trial(key, params, config))
    return trials


def _resolve_trial(sweep: Sweep, params: dict) -> TrainConfig:
    try:
        values = {name: coerce_value(name, v)
                  for name, v in apply_recipe({**sweep.fixed, **params}).items()}
        config = resolve(TrainConfig(**values))
        check_memory(config)
        return config
    except ConfigError as exc:
        if exc.option in params:
            raise SweepError(exc.option, f"{exc} (trial {describe(params)})",
                             f"--grid {exc.option}") from None
        raise SweepError(exc.option, str(exc), f"--{exc.option.replace('_', '-')}") from None


def sweep_id(trials: list[Trial]) -> str:
    """A short hash of the set of trials: two sweeps with the same trials are the same sweep."""
    return hashlib.sha256("\n".join(sorted(t.key for t in trials)).encode()).hexdigest()[:8]


def default_out(sweep: Sweep, trials: list[Trial], root: str | Path = "runs") -> Path:
    """runs/sweep-<name>, or runs/sweep-<data>-<axes>-<id> for an unnamed sweep: the same
    command always lands in the same directory, so re-running it resumes."""
    if sweep.name:
        return Path(root) / f"sweep-{sweep.name}"
    data = trials[0].config.data if trials else "none"
    axes = "-".join(sweep.grid) or "single"
    return Path(root) / f"sweep-{data}-{axes}-{sweep_id(trials)}"


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


def plan(sweep: Sweep, out: str | Path | None = None) -> tuple[list[Trial], Path]:
    """The validated trials of ``sweep`` and the directory they go to."""
    trials = expand(sweep)
    return trials, Path(out) if out is not None else default_out(sweep, trials)


def run_sweep(sweep: Sweep, out: str | Path | None = None, *, workers: int | None = None,
              scheduler: str | None = None, retry_failed: bool = False, force: bool = False,
              callback: SweepCallback | None = None, stack_size: int | None = None) -> SweepOutcome:
    """Run every trial of ``sweep`` not yet finished in ``out``; write rows as they finish.

    Compatible trials train together, up to ``stack_size`` in a stack
    (``experiments.stacks``; None: the default, 1: each trial alone); the rows
    of a stack are appended when it finishes, one per trial."""
    from experiments.executors import connect, default_workers, execute, run_stack_trials

    started = time.perf_counter()
    callback = callback or SweepCallback()
    trials, out = plan(sweep, out)
    # The cluster first: an unreachable one must leave no directory behind.
    with connect(scheduler) as cluster, SweepStore.open(out) as store:
        _adopt_sweep(store, sweep, trials, force)
        store.repair(force)
        rows = store.read_rows()
        rerun = {k for k, row in rows.items() if row["status"] == "failed"} if retry_failed else set()
        store.remove_trials(set(rows) - {t.key for t in trials} | rerun)
        rows = store.read_rows()
        # Longest first, so that the last trials to finish are short and no worker idles long.
        todo = sorted((t for t in trials if t.key not in rows), key=lambda t: -_cost(t.config))
        callback.on_sweep_begin(len(trials), len(trials) - len(todo), len(todo), list(rows.values()))
        workers = default_workers() if workers is None else workers
        if todo:
            store.record_environment({**environment(), "workers": workers, "scheduler": scheduler,
                                      "stack_size": stack_size})
        if stack_size == 1:
            stacks = [Stack([t], None) for t in todo]
            results = execute([t.config.to_dict() for t in todo], workers, cluster)
        else:
            stacks = pack(trials, todo, stack_size, max(1, workers))
            tasks = [{"configs": [t.config.to_dict() for t in s.trials], "widths": s.widths}
                     for s in stacks]
            results = execute(tasks, workers, cluster, function=run_stack_trials)
        with contextlib.closing(results), _saying_what_is_saved(out, trials, rows):
            for index, result in results:
                stack = stacks[index]
                records = result if isinstance(result, list) else [result] * len(stack.trials)
                for trial, record in zip(stack.trials, records, strict=True):
                    row = store.append(trial, record)
                    rows[row["trial_key"]] = row
                    callback.on_trial_end(trial, row)
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


def _adopt_sweep(store: SweepStore, sweep: Sweep, trials: list[Trial], force: bool) -> None:
    """Write the sweep into a new sweep directory; refuse a different one without ``force``."""
    text = sweep_to_toml(sweep)
    stored = store.read_sweep_file()
    if stored is None and store.has_foreign_files() and not force:
        raise ConfigError("out", f"{store.path} is not empty and holds no sweep; choose another "
                                 "--out or pass --force to use it")
    if stored is not None and stored != text and not force:
        try:
            same = {t.key for t in expand(sweep_from_toml(stored))} == {t.key for t in trials}
        except ConfigError:
            same = False
        if not same:
            raise ConfigError("out", f"{store.path} holds a different sweep (see its sweep.toml); "
                                     "choose another --out, or pass --force to replace it (finished "
                                     "trials the two sweeps share are kept)")
    if stored != text:
        store.write_sweep_file(text)
