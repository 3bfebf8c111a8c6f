"""`nnx reproduce cs231n`: the three claims of the cs231n neural-networks notes,
checked by numbers on three small sweeps, with a figure and a report each.

1. Capacity: more hidden units draw more complex decision boundaries.
2. Regularization: a stronger L2 penalty draws smoother ones.
3. Seed variance: the final loss of small nets varies much more across seeds
   than that of large nets.

Complexity is ``experiments.boundary.boundary_complexity`` (fraction of grid
cells next to a cell of another class). One seed's boundary can go either way
between 3 and 6 units, so claims 1 and 2 are judged on the mean over seeds;
the panels show seed 0's boundary, its own complexity and that mean.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import plots
from experiments.boundary import decision_regions
from experiments.files import make_dir
from experiments.stats import over_seeds
from experiments.sweep import Sweep, run_sweep

TARGETS = ("cs231n",)
RESOLUTION = 150     # complexity is compared only between grids of this one resolution


@dataclass
class Settings:
    """Everything the three sweeps use; ``quick()`` is a seconds-long version for tests."""

    data: dict = field(default_factory=lambda: {
        "data": "moons", "points": 40, "noise": 0.35, "data_seed": 0, "val_size": 0})
    train: dict = field(default_factory=lambda: {
        "activation": "tanh", "optimizer": "adam", "lr": 0.02, "batch_size": 0, "epochs": 4000})
    capacity_hidden: tuple = (3, 6, 20)
    capacity_reg: float = 0.0
    reg_hidden: int = 20
    # The notes' 0.001, 0.01, 0.1 are ConvNetJS l2_decay values, whose gradient is divided
    # by its batch size of 10; in nnx's convention (mean loss + 0.5 * reg * sum W**2) the
    # same penalties are ten times smaller.
    regs: tuple = (0.0001, 0.001, 0.01)
    boundary_seeds: int = 5
    variance_hidden: tuple = (3, 6, 20, 100)
    variance_regs: tuple = (0.001, 0.01)
    variance_seeds: int = 20
    variance_epochs: int = 2000
    # ReLU, as in the notes' argument: small ReLU nets stop in different poor minima,
    # while small tanh nets on this data all reach nearly the same loss.
    variance_activation: str = "relu"
    resolution: int = RESOLUTION

    @classmethod
    def quick(cls) -> Settings:
        s = cls()
        s.train = {**s.train, "epochs": 60}
        s.boundary_seeds, s.variance_seeds, s.variance_epochs = 2, 3, 60
        s.variance_hidden, s.variance_regs, s.resolution = (3, 20), (0.001,), 40
        return s


@dataclass
class Claim:
    name: str
    criterion: str
    evidence: str
    held: bool


@dataclass
class Report:
    path: Path
    claims: list[Claim]
    seconds: float


# ---- sweeps and sweep files --------------------------------------------------------------------
def sweeps(s: Settings) -> dict[str, Sweep]:
    """The three sweeps, by the name of their folder."""
    fixed = {**s.data, **s.train}
    seeds = list(range(s.boundary_seeds))
    return {
        "capacity": Sweep({**fixed, "reg": s.capacity_reg},
                              {"hidden": [[h] for h in s.capacity_hidden], "seed": seeds},
                              "cs231n-capacity"),
        "regularization": Sweep({**fixed, "hidden": [s.reg_hidden]},
                                    {"reg": list(s.regs), "seed": seeds}, "cs231n-regularization"),
        "variance": Sweep({**fixed, "epochs": s.variance_epochs,
                               "activation": s.variance_activation},
                              {"hidden": [[h] for h in s.variance_hidden], "reg": list(s.variance_regs),
                               "seed": list(range(s.variance_seeds))}, "cs231n-variance"),
    }


def run_sweeps(s: Settings, runs: Path, workers: int, log: Callable) -> dict[str, Path]:
    folders = {}
    for name, sweep in sweeps(s).items():
        outcome = run_sweep(sweep, runs / name, workers=workers)
        log(f"{name}: {len(outcome.trials)} trials ({outcome.skipped} already done) "
            f"in {outcome.seconds:.1f}s -> {outcome.out}")
        folders[name] = outcome.out
    return folders


# ---- numbers -------------------------------------------------------------------
def complexities(sweep_dir: Path, resolution: int) -> pd.DataFrame:
    """results.csv of the ok trials plus each trial's boundary ``complexity``."""
    results = plots.read_results(sweep_dir)
    results = results[results["status"] == "ok"].copy()
    values = []
    for trial in results["trial_key"]:
        net = plots.load_model(sweep_dir / "models" / f"{trial}.npz")
        X, _ = plots.training_points(net)
        values.append(decision_regions(net, X, resolution).complexity)
    results["complexity"] = values
    return results


def by_axis(table: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Per value of ``axis`` (in axis order): mean and std (ddof 0) of complexity and
    the mean final training accuracy over seeds."""
    stats = over_seeds(table, [axis], ["complexity"], ("mean", "std", "count"))
    stats = stats.join(over_seeds(table, [axis], ["final_train_acc"], ("mean",)))
    stats = stats.rename(columns={"count_complexity": "n_seeds"})
    return stats.reindex(plots.axis_values(table, axis))


def monotone_claim(name: str, stats: pd.DataFrame, axis: str, increasing: bool) -> Claim:
    means = stats["mean_complexity"].to_numpy()
    steps = np.diff(means)
    held = bool(np.all(steps > 0) if increasing else np.all(steps < 0))
    word = "increases" if increasing else "decreases"
    values = ", ".join(f"{axis}={v}: {m:.4f}" for v, m in zip(stats.index, means, strict=True))
    return Claim(name, f"mean boundary complexity over seeds strictly {word} with {axis}",
                 values, held)


def variance_claim(summary: pd.DataFrame, s: Settings) -> Claim:
    """For every reg: std of final_train_loss across seeds of the smallest net > 2x the largest's."""
    small, large = str(min(s.variance_hidden)), str(max(s.variance_hidden))
    parts, held = [], True
    for reg in plots.axis_values(summary, "reg"):
        rows = summary[summary["reg"] == reg].set_index("hidden")["std_final_train_loss"].astype(float)
        ratio = rows[small] / rows[large] if rows[large] > 0 else np.inf
        held &= bool(rows[small] > 2 * rows[large])
        parts.append(f"reg={reg}: std {rows[small]:.4f} (hidden={small}) vs {rows[large]:.4f} "
                     f"(hidden={large}), ratio {ratio:.1f}")
    return Claim("3. Seed variance", f"for every reg, the std across seeds of final_train_loss "
                 f"of hidden={small} is more than 2x that of hidden={large}", "; ".join(parts), held)


# ---- figures -------------------------------------------------------------------
def boundary_figure(table: pd.DataFrame, stats: pd.DataFrame, axis: str, path: Path,
                    title: str, resolution: int):
    """One row of panels, seed 0 (the smallest seed) for each value of ``axis``."""
    seed = plots.axis_values(table, "seed")[0]
    row = []
    for value in stats.index:
        trial = table[(table[axis] == value) & (table["seed"] == seed)].iloc[0]
        sweep_dir = Path(trial["sweep_dir"])
        net = plots.load_model(sweep_dir / "models" / f"{trial['trial_key']}.npz")
        X, y = plots.training_points(net)
        regions = decision_regions(net, X, resolution)
        heading = (f"{axis}={value}\ntrain acc {trial['final_train_acc']:.1%} · complexity "
                   f"{regions.complexity:.4f}\nmean over {int(stats.loc[value, 'n_seeds'])} seeds "
                   f"{stats.loc[value, 'mean_complexity']:.4f}")
        row.append(plots.Panel(regions, X, y, heading))
    return plots.plot_panels([row], path, suptitle=f"{title} (seed {seed})")


# ---- the report ----------------------------------------------------------------
def markdown_table(stats: pd.DataFrame, axis: str) -> str:
    lines = [f"| {axis} | mean complexity | std complexity | mean final_train_acc | seeds |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {v} | {r.mean_complexity:.4f} | {r.std_complexity:.4f} | "
              f"{r.mean_final_train_acc:.3f} | {int(r.n_seeds)} |" for v, r in stats.iterrows()]
    return "\n".join(lines)


def variance_table(summary: pd.DataFrame) -> str:
    lines = ["| hidden | reg | mean final_train_loss | std final_train_loss | seeds |",
             "|---:|---:|---:|---:|---:|"]
    for reg in plots.axis_values(summary, "reg"):
        part = summary[summary["reg"] == reg]
        for hidden in plots.axis_values(part, "hidden"):
            r = part[part["hidden"] == hidden].iloc[0]
            lines.append(f"| {hidden} | {reg} | {float(r['mean_final_train_loss']):.4f} | "
                         f"{float(r['std_final_train_loss']):.4f} | {r['n_ok']} |")
    return "\n".join(lines)


def write_report(out: Path, s: Settings, claims: list[Claim], tables: dict, seconds: float,
                 runs: Path) -> Path:
    verdict = lambda c: "**held**" if c.held else "**did not hold**"  # noqa: E731
    common = ", ".join(f"{k}={v}" for k, v in {**s.data, **s.train}.items())
    text = f"""# cs231n neural-network notes, reproduced with nnx

`nnx reproduce cs231n` ran three sweeps ({seconds:.0f} s) with {common}
(full-batch Adam; data and options as `nnx train` names them). Boundary
complexity is the fraction of the cells of a {s.resolution}x{s.resolution} grid
over the data (10% margin) that have a 4-neighbour of another predicted class.
The sweeps are in `{runs}`; every `nnx plot-*` command works on them.

| claim | criterion | result |
|---|---|---|
""" + "\n".join(f"| {c.name} | {c.criterion} | {verdict(c)} |" for c in claims) + f"""

## 1. Capacity: bigger nets draw more complex boundaries

reg={s.capacity_reg}, {s.boundary_seeds} seeds per size. {claims[0].evidence}: {verdict(claims[0])}.

![capacity](capacity.png)

{tables["capacity"]}

## 2. Regularization: stronger L2 draws smoother boundaries

hidden={s.reg_hidden}, {s.boundary_seeds} seeds per strength. The notes' strengths 0.001, 0.01
and 0.1 are ConvNetJS `l2_decay` values, applied per batch of 10 examples; in nnx's
convention (mean loss plus 0.5 * reg * sum(W**2)) they are reg = {", ".join(map(str, s.regs))}.
{claims[1].evidence}: {verdict(claims[1])}.

![regularization](regularization.png)

{tables["regularization"]}

## 3. Small nets' final loss varies more across seeds

{s.variance_seeds} seeds per (hidden, reg), {s.variance_epochs} epochs, activation
{s.variance_activation}; std over seeds with
ddof 0 as in summary.csv. {claims[2].evidence}: {verdict(claims[2])}.

![variance](variance.png)

{tables["variance"]}
"""
    path = out / "report.md"
    path.write_text(text)
    return path


def reproduce_cs231n(out: str | Path = "docs/cs231n", runs: str | Path | None = None,
                     workers: int = 2, quick: bool = False, settings: Settings | None = None,
                     log: Callable = lambda *_: None) -> Report:
    """Run (or resume) the three sweeps into ``runs`` [default: runs/cs231n, or
    ``out``/runs when quick], draw the three figures and write report.md into ``out``."""
    started = time.perf_counter()
    s = settings or (Settings.quick() if quick else Settings())
    out = Path(out)
    runs = Path(runs) if runs is not None else (out / "runs" if quick else Path("runs/cs231n"))
    make_dir(out)
    make_dir(runs, "out")
    folders = run_sweeps(s, runs, workers, log)
    claims, tables = [], {}
    for name, axis, increasing, label in (("capacity", "hidden", True, "1. Capacity"),
                                          ("regularization", "reg", False, "2. Regularization")):
        table = complexities(folders[name], s.resolution).assign(sweep_dir=str(folders[name]))
        stats = by_axis(table, axis)
        claims.append(monotone_claim(label, stats, axis, increasing))
        tables[name] = markdown_table(stats, axis)
        boundary_figure(table, stats, axis, out / f"{name}.png",
                        f"{s.data['data']}: decision regions by {axis}", s.resolution)
    summary = plots.read_summary(folders["variance"])
    claims.append(variance_claim(summary, s))
    tables["variance"] = variance_table(summary)
    plots.plot_variance(folders["variance"], out / "variance.png")
    seconds = time.perf_counter() - started
    path = write_report(out, s, claims, tables, seconds, runs)
    return Report(path, claims, seconds)
