"""Every figure nnx draws, from run directories (``nnx train``) and sweep
directories (``nnx sweep``).

Each ``plot_*`` function builds a matplotlib Figure, saves it to ``path``
(PNG, SVG or PDF by the file's extension) and returns it, so tests can read
the plotted numbers back from the artists. Figures are built without pyplot:
no global figure list to leak from a long-running process.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # headless: nnx draws to files, never to a window

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap, to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FormatStrFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
)

from experiments.boundary import (  # noqa: E402
    DEFAULT_MARGIN,
    DEFAULT_RESOLUTION,
    NotDrawableError,
    Regions,
    WrongKindError,
    check_2d,
    decision_regions,
)
from experiments.config import TrainConfig, parse_hidden  # noqa: E402
from experiments.errors import ConfigError, NotWritableError  # noqa: E402
from experiments.files import check_output_file  # noqa: E402
from experiments.stats import over_seeds  # noqa: E402
from experiments.store import (  # noqa: E402
    BEST_COLUMNS,
    FINAL_COLUMNS,
    GROUP_COLUMNS,
    METRIC_COLUMNS,
    OPTION_COLUMNS,
    SweepStore,
    best_of_history,
    cell,
    summarize,
)
from mlp.network import FILE_MODE, ModelFileError, Network  # noqa: E402

# Okabe & Ito's colour-blind-safe palette (black left out: it marks edges and text).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999")
FORMATS = ("png", "svg", "pdf")
DPI = 120


def colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def save(fig: Figure, path: str | Path) -> Figure:
    """Write ``fig`` to ``path`` (format from the extension), creating its folder; the
    file appears whole or not at all. NotWritableError when it cannot be written."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError("out", f"{path}: choose a .png, .svg or .pdf file name")
    check_output_file(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight")
    write_output(path, buf.getvalue())
    return fig


def write_output(path: Path, data: bytes) -> None:
    """``data`` to ``path`` (``output_file``); NotWritableError naming the file and the
    reason when that fails."""
    with output_file(path) as tmp:
        Path(tmp).write_bytes(data)


@contextlib.contextmanager
def output_file(path: Path):
    """A temporary file in ``path``'s folder (created if need be) to write, renamed to
    ``path`` when the block ends without error and removed otherwise: the output
    appears whole or not at all, with the permissions the umask gives a new file.
    OSError becomes NotWritableError naming the file and the reason."""
    path = Path(path)
    make_folder_for(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        os.close(fd)
        yield tmp
        os.chmod(tmp, FILE_MODE)            # mkstemp's file is private; a figure is not
        os.replace(tmp, path)
    except OSError as exc:
        raise NotWritableError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def make_folder_for(path: Path) -> None:
    """Create the folder ``path`` goes in; NotWritableError when that cannot be done."""
    blocking = next((p for p in Path(path).parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise NotWritableError(f"cannot write {path}: {blocking} is a file, not a folder")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NotWritableError(f"cannot write {path}: {exc.strerror or exc}") from None


# ---- reading runs and sweeps ------------------------------------------------------
def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / "results.csv").is_file()


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "metrics.csv").is_file() or (Path(path) / "model.npz").is_file()


def check_dir(path: str | Path, want: str = "run or sweep") -> Path:
    """``path`` as a Path if it is a directory of the wanted kind, else NotDrawableError."""
    path = Path(path)
    if not path.exists():
        raise NotDrawableError(f"{path}: no such directory")
    if not path.is_dir():
        raise WrongKindError(f"{path} is a file; give a {want} directory")
    sweep, run = is_sweep_dir(path), is_run_dir(path)
    if (want == "sweep" and not sweep) or (want == "run" and not run) or not (sweep or run):
        what = {"sweep": "results.csv (written by nnx sweep)",
                "run": "metrics.csv or model.npz (written by nnx train)"}.get(
            want, "metrics.csv (nnx train) or results.csv (nnx sweep)")
        raise WrongKindError(f"{path} is not a {want} directory: it has no {what}")
    return path


def read_table(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    """A CSV file nnx wrote, as strings; NotDrawableError naming the file when it is not
    one (empty, binary, torn, other columns)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise NotDrawableError(f"{path} is empty; it is not a {what}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise NotDrawableError(f"{path} is not a {what} ({reason})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise NotDrawableError(f"{path} is not a {what}: it has no {', '.join(missing)} column")
    return frame


# Columns of results.csv files written by nnx 0.1, read under today's names.
OLD_RESULT_COLUMNS = {"trial": "trial_key", "model": "arch", "gamma": "lr_decay"}


def read_results(sweep_dir: str | Path) -> pd.DataFrame:
    """results.csv with option columns as written (strings) and metrics as numbers."""
    path = check_dir(sweep_dir, "sweep")
    frame = read_table(path / "results.csv", (), "results table written by nnx sweep")
    frame = frame.rename(columns={old: new for old, new in OLD_RESULT_COLUMNS.items()
                                  if old in frame.columns and new not in frame.columns})
    if "val_fraction" in frame.columns:         # nnx 0.1 kept both; 2D sweeps read the fraction
        frame = frame.drop(columns="val_size").rename(columns={"val_fraction": "val_size"})
    missing = [c for c in ("trial_key", "status", *FINAL_COLUMNS) if c not in frame.columns]
    if missing:
        raise NotDrawableError(f"{path / 'results.csv'} is not a results table written by nnx sweep: "
                               f"it has no {', '.join(missing)} column")
    if frame.empty:
        raise NotDrawableError(f"{path}: the sweep has no finished trials yet")
    if not set(BEST_COLUMNS) <= set(frame.columns):
        frame = with_best_columns(frame, SweepStore(path))
    for column in frame.columns:
        if column in METRIC_COLUMNS or column.startswith(("final_", "best_")):
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def with_best_columns(results: pd.DataFrame, store: SweepStore) -> pd.DataFrame:
    """results.csv written before the best_* columns, with them computed from the curves
    (as ``nnx sweep`` does when it upgrades the file; the file itself is left alone)."""
    best = [best_of_history(store.read_history(key)) if status != "failed" else {}
            for key, status in zip(results["trial_key"], results["status"], strict=True)]
    return results.assign(**{name: [cell(name, b.get(name, math.nan)) for b in best]
                             for name in BEST_COLUMNS})


def varying_options(results: pd.DataFrame, include_seed: bool = False) -> list[str]:
    """The option columns whose value differs between trials: the sweep's axes."""
    names = OPTION_COLUMNS if include_seed else GROUP_COLUMNS
    return [c for c in names if c in results and results[c].nunique() > 1]


def sort_key(name: str, text: str):
    """Order axis values as numbers (hidden by its sizes), not as text."""
    if name == "hidden":
        try:
            sizes = parse_hidden(text)
            return (len(sizes), sizes)
        except ValueError:
            return (math.inf, text)
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


def axis_values(results: pd.DataFrame, name: str) -> list[str]:
    return sorted(results[name].unique(), key=lambda v: sort_key(name, v))


def check_axis(results: pd.DataFrame, name: str, option: str) -> None:
    """A usage error (ConfigError naming ``option``) unless ``name`` is an option column."""
    if name not in results.columns or name not in OPTION_COLUMNS:
        raise ConfigError(option, f"{name!r} is not an option of this sweep; its varying options "
                                  f"are {', '.join(varying_options(results, True)) or 'none'}")


def check_metric(table: pd.DataFrame, name: str, option: str = "metric") -> None:
    """A usage error unless ``name`` is a metric column of ``table``."""
    metrics = [c for c in table.columns if c not in OPTION_COLUMNS and c not in
               ("trial_key", "status", "error", "nnx_version", "finished")]
    if name not in metrics:
        means = [c for c in metrics if c.startswith("mean_")]
        choices = f"{', '.join(means)} (or their std_, min_, max_)" if means else ", ".join(metrics)
        raise ConfigError(option, f"{name!r} is not a metric column here; choose from {choices}")


def settings_label(row, names: list[str]) -> str:
    return " ".join(f"{n}={row[n]}" for n in names)


def read_run_record(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_model(path: str | Path) -> Network:
    """A model file, or the model.npz of a run directory; refusals as NotDrawableError."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.npz"
    try:
        return Network.load(path)
    except ModelFileError as exc:
        raise NotDrawableError(str(exc)) from None


def training_points(net: Network) -> tuple[np.ndarray, np.ndarray]:
    """The 2D training set ``net`` was trained on, regenerated from its stored config.
    -> X: (N, 2), y: (N,)."""
    check_2d(net)
    from experiments.runner import load_data
    stored = net.metadata.get("config")
    if not stored:
        raise NotDrawableError("the model does not record the data it was trained on")
    data = load_data(TrainConfig.from_dict(stored))
    return data.X_train, data.y_train


# ---- decision regions -------------------------------------------------------------
@dataclass
class Panel:
    """One decision-region plot: the regions, the training points and a title."""

    regions: Regions
    X: np.ndarray
    y: np.ndarray
    title: str


def draw_regions(ax, panel: Panel, num_classes: int) -> None:
    """Regions in light class colours, training points in full colour on top."""
    light = [tuple(0.55 + 0.45 * c for c in to_rgb(colour(k))) for k in range(num_classes)]
    ax.imshow(panel.regions.labels, origin="lower", extent=panel.regions.extent, aspect="auto",
              cmap=ListedColormap(light), vmin=-0.5, vmax=num_classes - 0.5, interpolation="nearest")
    for k in range(num_classes):
        members = panel.y == k
        ax.scatter(panel.X[members, 0], panel.X[members, 1], s=14, color=colour(k),
                   edgecolors="black", linewidths=0.5, label=f"class {k}")
    ax.set_xlim(panel.regions.extent[:2])
    ax.set_ylim(panel.regions.extent[2:])
    ax.set_title(panel.title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_panels(panels: list[list[Panel | None]], path, row_label: str = "", col_label: str = "",
                suptitle: str = "") -> Figure:
    """A grid of decision-region panels, rows x columns; None leaves a cell empty."""
    rows, cols = len(panels), max(len(r) for r in panels)
    num_classes = 1 + max(int(p.y.max()) for r in panels for p in r if p is not None)
    fig = Figure(figsize=(3.2 * cols, 3.1 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, row in enumerate(panels):
        for j in range(cols):
            panel = row[j] if j < len(row) else None
            if panel is None:
                axes[i, j].set_axis_off()
                axes[i, j].text(0.5, 0.5, "no trial", ha="center", transform=axes[i, j].transAxes)
            else:
                draw_regions(axes[i, j], panel, num_classes)
    if suptitle:
        fig.suptitle(suptitle)
    return save(fig, path)


def boundary_title(settings: str, train_acc: float, complexity: float) -> str:
    acc = "n/a" if math.isnan(train_acc) else f"{train_acc:.1%}"
    return f"{settings}\ntrain acc {acc} · complexity {complexity:.4f}"


def run_panel(run_dir: Path, resolution: int, margin: float) -> Panel:
    """The panel of one ``nnx train`` run directory."""
    net = load_model(run_dir)
    X, y = training_points(net)
    regions = decision_regions(net, X, resolution, margin)
    record = read_run_record(run_dir)
    acc = record.get("final_train_acc")
    acc = float(net.loss_and_accuracy(X, y)[1]) if acc is None else float(acc)
    config = record.get("config") or net.metadata.get("config", {})
    from experiments.config import format_hidden
    settings = f"{config.get('data')} hidden={format_hidden(config.get('hidden'))} reg={config.get('reg')}"
    return Panel(regions, X, y, boundary_title(settings, acc, regions.complexity))


def plot_run_boundary(run_dir, path, resolution: int = DEFAULT_RESOLUTION,
                      margin: float = DEFAULT_MARGIN) -> Figure:
    """One run's decision regions with its training points."""
    return plot_panels([[run_panel(check_dir(run_dir, "run"), resolution, margin)]], path)


def sweep_panel(sweep_dir: Path, row, settings: str, resolution: int, margin: float) -> Panel:
    net = load_model(sweep_dir / "models" / f"{row['trial_key']}.npz")
    X, y = training_points(net)
    regions = decision_regions(net, X, resolution, margin)
    return Panel(regions, X, y, boundary_title(settings, float(row["final_train_acc"]),
                                               regions.complexity))


def layout_axes(results: pd.DataFrame, rows: str | None = None, cols: str | None = None,
                spare: int = 0) -> tuple[str | None, str | None, list[str]]:
    """The options a grid of panels is laid out by: ``rows`` and ``cols`` as given, else
    the options ``results`` varies (seed aside), in column order (hidden before reg);
    a sweep of one axis gets it as columns. Up to ``spare`` more options are returned
    for the caller to show inside a panel (as colours); any further one is refused
    with the --where that pins it. -> (rows or None, cols or None, spare options)."""
    for name, option in ((rows, "rows"), (cols, "cols")):
        if name is not None:
            check_axis(results, name, option)
    free = [n for n in varying_options(results) if n not in (rows, cols)]
    if rows is None and cols is None and len(free) == 1:
        cols = free.pop(0)
    if rows is None and free:
        rows = free.pop(0)
    if cols is None and free:
        cols = free.pop(0)
    inside, free = free[:spare], free[spare:]
    if free:
        raise NotDrawableError(f"the sweep also varies {', '.join(free)}; pick one value with "
                               f"--where {free[0]}=VALUE or make it an axis with --rows/--cols")
    return rows, cols, inside


def levels(results: pd.DataFrame, name: str | None) -> list[str | None]:
    """The values of a grid axis in order; [None] for no axis (one row or column)."""
    return [None] if name is None else axis_values(results, name)


def matching(results: pd.DataFrame, pairs: list[tuple[str | None, str | None]]) -> pd.DataFrame:
    """The rows whose option ``name`` is ``value`` for each (name, value); a name of
    None (no such axis) matches every row."""
    for name, value in pairs:
        if name is not None:
            results = results[results[name] == value]
    return results


def cell_label(pairs: list[tuple[str | None, str | None]], default: str = "") -> str:
    """'hidden=3 reg=0.01' for the (name, value) pairs of a grid cell that have a name."""
    return " ".join(f"{n}={v}" for n, v in pairs if n is not None) or default


def select_trials(results: pd.DataFrame, rows: str | None, cols: str | None, seed: str | None,
                  where: dict[str, str] | None = None) -> tuple[pd.DataFrame, str | None, str | None]:
    """The ok trials of one seed (the first by default) that match ``where``, and the
    rows and columns to lay them out by (``layout_axes``); refuse a selection that
    still has two trials in one (rows, cols) cell."""
    for name, option in ((rows, "rows"), (cols, "cols"), *((n, "where") for n in where or {})):
        if name is not None:
            check_axis(results, name, option)
    chosen = results[results["status"] == "ok"]
    if chosen.empty:
        raise NotDrawableError("the sweep has no trial that trained without diverging")
    if "seed" not in (rows, cols):
        seed = axis_values(chosen, "seed")[0] if seed is None else str(seed)
        chosen = chosen[chosen["seed"] == seed]
    for name, value in (where or {}).items():
        chosen = chosen[[sort_key(name, v) == sort_key(name, value) for v in chosen[name]]]
    if chosen.empty:
        raise NotDrawableError(f"no ok trial with seed {seed}" + (f" and {where}" if where else ""))
    rows, cols, _ = layout_axes(chosen, rows, cols)
    return chosen, rows, cols


def trial_grid(chosen: pd.DataFrame, rows: str | None, cols: str | None) -> list[list]:
    """The trial (a results row) of each (row value, column value) cell, or None."""
    grid = []
    for r in levels(chosen, rows):
        line = []
        for c in levels(chosen, cols):
            match = matching(chosen, [(rows, r), (cols, c)])
            line.append(None if match.empty else match.iloc[0])
        grid.append(line)
    return grid


def plot_sweep_boundaries(sweep_dir, path, rows: str | None = None, cols: str | None = None,
                          seed: str | None = None, where: dict[str, str] | None = None,
                          resolution: int = DEFAULT_RESOLUTION, margin: float = DEFAULT_MARGIN,
                          ) -> Figure:
    """Panels of one seed's decision regions: rows by ``rows``, columns by ``cols``
    (by default the options the sweep varies, ``layout_axes``)."""
    sweep_dir = check_dir(sweep_dir, "sweep")
    chosen, rows, cols = select_trials(read_results(sweep_dir), rows, cols, seed, where)
    grid = [[None if trial is None else sweep_panel(
                sweep_dir, trial, cell_label([(rows, trial.get(rows)), (cols, trial.get(cols))],
                                             "every trial alike"), resolution, margin)
             for trial in line] for line in trial_grid(chosen, rows, cols)]
    data = chosen["data"].iloc[0] if "data" in chosen else ""
    seeds = "" if "seed" in (rows, cols) else f", seed {chosen['seed'].iloc[0]}"
    return plot_panels(grid, path, suptitle=f"{data}: decision regions{seeds}")


# ---- variance across seeds -------------------------------------------------------
def seed_spread(results: pd.DataFrame, x: str, line: str, metric: str) -> pd.DataFrame:
    """mean and std (ddof 0, as summary.csv) of ``metric`` over seeds, per (line, x)."""
    ok = results[results["status"] == "ok"]
    stats = over_seeds(ok, [line, x], [metric], ("mean", "std", "count"))
    return stats.rename(columns=lambda c: c.split("_", 1)[0]).reset_index()


def plot_variance(sweep_dir, path, x: str = "hidden", line: str = "reg",
                  metric: str = "final_train_loss") -> Figure:
    """Left: ``metric`` of every seed against ``x`` (points plus a box per size and line
    value), one line through the means per ``line`` value. Right: the std across seeds."""
    results = read_results(sweep_dir)
    check_axis(results, x, "x")
    check_axis(results, line, "line")
    check_metric(results, metric)
    xs, lines = axis_values(results, x), axis_values(results, line)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_points, ax_std = fig.subplots(1, 2)
    spread = seed_spread(results, x, line, metric)
    width = 0.7 / len(lines)
    for k, value in enumerate(lines):
        offsets = np.arange(len(xs)) + (k - (len(lines) - 1) / 2) * width
        draw_strips(ax_points, results, x, xs, line, value, metric, offsets, width, colour(k))
        part = spread[spread[line] == value].set_index(x).reindex(xs)
        ax_points.plot(offsets, part["mean"].to_numpy(), "-", color=colour(k), label=f"{line}={value}")
        ax_std.plot(np.arange(len(xs)), part["std"].to_numpy(), "o-", color=colour(k),
                    label=f"{line}={value}")
    for ax in (ax_points, ax_std):
        ax.set_xticks(np.arange(len(xs)), xs)
        ax.set_xlabel(x)
        ax.legend(fontsize=8)
    ax_points.set_ylabel(metric)
    ax_points.set_title(f"{metric} of every seed (box: quartiles; line: mean)")
    ax_std.set_ylabel(f"std of {metric} across seeds")
    ax_std.set_title("spread across seeds")
    return save(fig, path)


def draw_strips(ax, results, x, xs, line, value, metric, offsets, width, color) -> None:
    """One box and one strip of seed points per ``x`` value, for one ``line`` value.
    The points carry gid "seeds" so tests can find them among the artists."""
    jitter = np.random.default_rng(0)       # fixed: the same figure every time
    boxes, positions = [], []
    ok = results[(results["status"] == "ok") & (results[line] == value)]
    for pos, v in zip(offsets, xs, strict=True):
        values = ok.loc[ok[x] == v, metric].to_numpy(dtype=float)
        if not len(values):
            continue
        boxes.append(values)
        positions.append(pos)
        points = ax.scatter(pos + jitter.uniform(-0.25, 0.25, len(values)) * width, values,
                            s=12, color=color, edgecolors="black", linewidths=0.4, zorder=3)
        points.set_gid("seeds")
    if boxes:
        ax.boxplot(boxes, positions=positions, widths=width * 0.8, showfliers=False,
                   manage_ticks=False, medianprops={"color": "black"})


# ---- learning curves -------------------------------------------------------------
# Loss is drawn on a log scale when its largest value is this many times its smallest:
# a decade or more, where a linear axis flattens everything after the first epochs.
LOG_SCALE_RATIO = 10.0
SPLIT_STYLES = {"train": "-", "val": "--"}
SPLIT_NAMES = {"train": "train", "val": "validation"}
# Without a colour axis: train blue, validation vermilion (Okabe & Ito).
SPLIT_COLOURS = {"train": OKABE_ITO[4], "val": OKABE_ITO[5]}
METRICS = ("loss", "acc")
METRIC_NAMES = {"loss": "loss", "acc": "accuracy"}


def read_curve(path: Path) -> pd.DataFrame:
    """A metrics.csv (or a sweep's curve): one row per epoch, numbers."""
    frame = read_table(path, ("epoch", "train_loss"), "learning curve written by nnx")
    frame = frame.apply(pd.to_numeric, errors="coerce")
    if frame["epoch"].isna().any():
        raise NotDrawableError(f"{path} is not a learning curve written by nnx (an epoch that is "
                               "not a number)")
    return frame


def curve_band(curves: list[pd.DataFrame], column: str) -> pd.DataFrame:
    """Per epoch: mean and std (ddof 0) of ``column`` over the seeds' curves that reach it."""
    frame = pd.concat([c[["epoch", column]] for c in curves])
    stats = over_seeds(frame, ["epoch"], [column], ("mean", "std")).sort_index()
    return stats.rename(columns=lambda c: c.split("_", 1)[0])


def has_values(curves: list[pd.DataFrame], column: str) -> bool:
    return any(column in c and c[column].notna().any() for c in curves)


def loss_scale(curves: list[pd.DataFrame]) -> str:
    """"log" when the losses of ``curves`` span LOG_SCALE_RATIO or more, else "linear"."""
    values = np.concatenate([c[col].to_numpy(dtype=float) for c in curves
                             for col in ("train_loss", "val_loss") if col in c])
    values = values[np.isfinite(values) & (values > 0)]
    return "log" if values.size and values.max() >= LOG_SCALE_RATIO * values.min() else "linear"


def set_loss_scale(axes, curves: list[pd.DataFrame]) -> None:
    """Linear or log (``loss_scale``) on every loss plot of ``axes``; on a log scale the
    limits follow the mean curves, not the bands (mean - std may reach zero)."""
    scale = loss_scale(curves)
    for ax in axes:
        ax.set_yscale(scale)
        if scale == "log":      # plain numbers at 1, 2 and 5 times powers of ten, in the tick size
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    if scale == "log":
        values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for ax in axes
                                 for line in ax.get_lines()] or [np.array([])])
        values = values[np.isfinite(values) & (values > 0)]
        if values.size:
            for ax in axes:
                ax.set_ylim(values.min() / 1.3, values.max() * 1.3)


def best_point(band: pd.DataFrame) -> tuple[float, float] | None:
    """(epoch, value) of the first highest mean of a validation accuracy band."""
    mean = band["mean"]
    if not mean.notna().any():
        return None
    epoch = mean.idxmax()         # the first on ties, as the trainer's best epoch
    return float(epoch), float(mean[epoch])


def draw_band(ax, curves: list[pd.DataFrame], column: str, color: str, style: str, label: str):
    """The mean of ``column`` over ``curves`` per epoch, with a +-1 std band when there
    are several; the line carries gid ``column`` and ``label``. -> the band's frame."""
    band = curve_band(curves, column)
    epochs, mean, std = band.index.to_numpy(), band["mean"].to_numpy(), band["std"].to_numpy()
    ax.plot(epochs, mean, style, color=color, linewidth=1.2, label=label, gid=column)
    if len(curves) > 1:
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    return band


def mark_best(ax_loss, ax_acc, curves: list[pd.DataFrame], acc_band, color: str) -> None:
    """A star at the epoch of highest (mean) validation accuracy, on the accuracy curve
    and on the validation loss curve at that epoch; both carry gid "best"."""
    best = best_point(acc_band)
    if best is None:
        return
    epoch, acc = best
    marker = dict(marker="*", markersize=9, color=color, markeredgecolor="black",
                  markeredgewidth=0.5, linestyle="none", gid="best", zorder=4)
    if ax_acc is not None:
        ax_acc.plot([epoch], [acc], **marker)
    if ax_loss is not None and has_values(curves, "val_loss"):
        loss = curve_band(curves, "val_loss")["mean"]
        if epoch in loss.index:
            ax_loss.plot([epoch], [loss[epoch]], **marker)


def draw_curves(axes: dict, curves: list[pd.DataFrame], color_of, label: str = "") -> None:
    """Train (solid) and validation (dashed) mean curves of ``curves`` on the axes of
    ``axes`` ({"loss": ax, "acc": ax}, either may be missing), a best-epoch star."""
    acc_band = None
    for metric, ax in axes.items():
        for split, style in SPLIT_STYLES.items():
            column = f"{split}_{metric}"
            if has_values(curves, column):
                band = draw_band(ax, curves, column, color_of(split), style,
                                 f"{label} {split}".strip())
                if column == "val_acc":
                    acc_band = band
    if acc_band is None and has_values(curves, "val_acc"):
        acc_band = curve_band(curves, "val_acc")
    if acc_band is not None:
        mark_best(axes.get("loss"), axes.get("acc"), curves, acc_band, color_of("val"))


def plot_curves_groups(groups: dict[str, list[pd.DataFrame]], path, title: str = "") -> Figure:
    """Loss (left) and accuracy (right) per epoch; one line per group, the mean over its
    curves with a band of +-1 std when it has more than one. Train solid, validation
    dashed, a star at the best validation epoch; loss on a log scale when it spans a
    decade or more."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for k, (label, curves) in enumerate(groups.items()):
        def color_of(split, k=k):
            return SPLIT_COLOURS[split] if len(groups) == 1 else colour(k)
        draw_curves({"loss": ax_loss, "acc": ax_acc}, curves, color_of,
                    label if len(groups) > 1 else "")
    set_loss_scale([ax_loss], [c for g in groups.values() for c in g])
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy")
    validated = any(has_values(g, "val_acc") for g in groups.values())
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = ax.get_legend_handles_labels()
        if validated:      # a run without a validation split has no best epoch to mark
            handles, labels = handles + [best_handle()], labels + ["best validation epoch"]
        ax.legend(handles, labels, fontsize=7)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def best_handle() -> Line2D:
    return Line2D([], [], marker="*", markersize=9, color="grey", markeredgecolor="black",
                  markeredgewidth=0.5, linestyle="none")


def plot_sweep_curves(sweep_dir, path, rows: str | None = None, cols: str | None = None,
                      where: dict[str, str] | None = None, metrics: tuple[str, ...] = METRICS
                      ) -> Figure:
    """Small multiples: one panel per configuration, rows by ``rows`` and columns by
    ``cols`` (by default the options the sweep varies, ``layout_axes``), a third
    varying option as the colour of the lines in each panel. Each panel has a loss and
    an accuracy plot (``metrics``), with the mean over seeds and a band of +-1 std,
    train solid and validation dashed, a star at the epoch of the highest mean
    validation accuracy. Axes are shared: x everywhere, y per metric."""
    sweep_dir = check_dir(sweep_dir, "sweep")
    results = read_results(sweep_dir)
    ok = results[results["status"] == "ok"]
    for name, value in (where or {}).items():
        check_axis(results, name, "where")
        ok = ok[[sort_key(name, v) == sort_key(name, value) for v in ok[name]]]
    if ok.empty:
        raise NotDrawableError(f"{sweep_dir}: no trial trained without diverging"
                               + (f" with {where}" if where else ""))
    rows, cols, inside = layout_axes(ok, rows, cols, spare=1)
    hue = inside[0] if inside else None
    hues = levels(ok, hue)
    curves = {key: read_curve(sweep_dir / "curves" / f"{key}.csv") for key in ok["trial_key"]
              if (sweep_dir / "curves" / f"{key}.csv").is_file()}
    if not any(len(c) for c in curves.values()):
        raise NotDrawableError(f"{sweep_dir}: no epochs recorded")
    row_values, col_values = levels(ok, rows), levels(ok, cols)
    n_rows, n_cols, n_metrics = len(row_values), len(col_values), len(metrics)
    fig = Figure(figsize=(2.7 * n_cols + 1.2, 1.9 * n_metrics * n_rows + 1.3), layout="constrained")
    fig.get_layout_engine().set(hspace=0.06)     # room between a loss plot's lowest tick and the next
    axes = fig.subplots(n_rows * n_metrics, n_cols, squeeze=False, sharex=True)
    for m in range(n_metrics):        # y shared by every plot of one metric
        first = axes[m, 0]
        for ax in axes[m::n_metrics].ravel():
            if ax is not first:
                ax.sharey(first)
    for i, r in enumerate(row_values):
        for j, c in enumerate(col_values):
            panel = {metric: axes[i * n_metrics + m, j] for m, metric in enumerate(metrics)}
            cell = matching(ok, [(rows, r), (cols, c)])
            settings = cell_label([(rows, r), (cols, c)], "every trial")
            for metric, ax in panel.items():
                ax.set_label(f"{settings} {metric}")
            if cell.empty:
                for ax in panel.values():
                    ax.text(0.5, 0.5, "no trial", ha="center", va="center", transform=ax.transAxes,
                            color="grey")
                continue
            for k, h in enumerate(hues):
                seeds = [curves[t] for t in matching(cell, [(hue, h)])["trial_key"] if t in curves]
                if seeds:
                    def color_of(split, k=k):
                        return colour(k) if hue else SPLIT_COLOURS[split]
                    draw_curves(panel, seeds, color_of, cell_label([(hue, h)]))
    if "loss" in metrics:
        set_loss_scale(axes[metrics.index("loss")::n_metrics].ravel(), list(curves.values()))
    label_grid(fig, axes, metrics, rows, row_values, cols, col_values)
    legend_for(fig, hue, hues, ok)
    by = [n for n in (rows, cols, hue) if n is not None]
    n_seeds = ok.groupby(by).size() if by else pd.Series([len(ok)])
    seeds = f"{n_seeds.min()}" if n_seeds.min() == n_seeds.max() else f"{n_seeds.min()}-{n_seeds.max()}"
    pinned = "".join(f", {n}={v}" for n, v in (where or {}).items())
    fig.suptitle(f"{sweep_dir.name}: mean over {seeds} seed(s), band +-1 std{pinned}")
    return save(fig, path)


def label_grid(fig, axes, metrics, rows, row_values, cols, col_values) -> None:
    """Column values above the top row, row value and metric left of the first column,
    epoch under the bottom row; inner tick labels hidden (the axes are shared). The
    legend goes under the grid (``legend_for``): constrained layout keeps a figure
    legend clear of the axes but not of a suptitle or supxlabel on the same side."""
    n_metrics = len(metrics)
    for j, c in enumerate(col_values):
        if cols is not None:
            axes[0, j].set_title(f"{cols}={c}", fontsize=9)
    for i, r in enumerate(row_values):
        for m, metric in enumerate(metrics):
            name = METRIC_NAMES[metric]
            axes[i * n_metrics + m, 0].set_ylabel(f"{rows}={r}\n{name}" if rows is not None and m == 0
                                                  else name, fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    for ax in axes.ravel():
        ax.tick_params(which="both", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.label_outer()


def legend_for(fig, hue: str | None, hues: list, ok: pd.DataFrame) -> None:
    """One legend under the grid: the split line styles (and colours without a colour
    axis), the colour of each value of ``hue``, the best-epoch star."""
    handles, labels = [], []
    for split, style in SPLIT_STYLES.items():
        handles.append(Line2D([], [], linestyle=style, color="black" if hue else SPLIT_COLOURS[split]))
        labels.append(SPLIT_NAMES[split])
    for k, h in enumerate(hues if hue else []):
        handles.append(Line2D([], [], linewidth=6, color=colour(k)))
        labels.append(f"{hue}={h}")
    handles.append(best_handle())
    labels.append("highest mean validation accuracy")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8,
               frameon=False)


def plot_curves(run_or_sweep_dir, path, rows: str | None = None, cols: str | None = None,
                where: dict[str, str] | None = None) -> Figure:
    """Learning curves of a run (metrics.csv: loss and accuracy side by side) or of a
    sweep (``plot_sweep_curves``: small multiples, one panel per configuration)."""
    path_in = check_dir(run_or_sweep_dir)
    if is_sweep_dir(path_in):
        return plot_sweep_curves(path_in, path, rows=rows, cols=cols, where=where)
    if not (path_in / "metrics.csv").is_file():
        raise NotDrawableError(f"{path_in}: no metrics.csv to draw")
    curve = read_curve(path_in / "metrics.csv")
    if curve.empty:
        raise NotDrawableError(f"{path_in}: no epochs recorded")
    return plot_curves_groups({"run": [curve]}, path, path_in.name)


# ---- sweep heatmap ---------------------------------------------------------------
def read_summary(sweep_dir) -> pd.DataFrame:
    read_results(sweep_dir)                 # summary.csv is only as good as results.csv
    path = check_dir(sweep_dir, "sweep") / "summary.csv"
    if not path.is_file():
        raise NotDrawableError(f"{path.parent}: no summary.csv yet (written when the sweep finishes)")
    summary = read_table(path, ("mean_final_train_loss",), "summary table written by nnx sweep")
    if f"mean_{BEST_COLUMNS[0]}" not in summary:     # written before the best_* columns
        results = read_results(sweep_dir)
        older = [c for c in GROUP_COLUMNS if c not in results]      # options added since
        summary = summarize(results.assign(**dict.fromkeys(older, ""))).drop(columns=older).astype(str)
    return summary


def heatmap_table(summary: pd.DataFrame, x: str, y: str, metric: str) -> pd.DataFrame:
    """``metric`` (numbers) indexed by y values (rows) and x values (columns), in axis order."""
    check_axis(summary, x, "x")
    check_axis(summary, y, "y")
    check_metric(summary, metric)
    extra = [n for n in varying_options(summary) if n not in (x, y)]
    if extra:
        raise NotDrawableError(f"the sweep also varies {', '.join(extra)}; the heatmap shows two axes")
    values = pd.to_numeric(summary[metric], errors="coerce")
    table = pd.DataFrame({x: summary[x], y: summary[y], metric: values})
    table = table.pivot_table(index=y, columns=x, values=metric, aggfunc="first", dropna=False)
    return table.reindex(index=axis_values(summary, y), columns=axis_values(summary, x))


def plot_sweep(sweep_dir, path, x: str = "reg", y: str = "hidden",
               metric: str = "mean_final_val_acc") -> Figure:
    """A heatmap of ``metric`` from summary.csv over two axes, each cell annotated."""
    summary = read_summary(sweep_dir)
    if metric == "mean_final_val_acc" and pd.to_numeric(summary.get(metric), errors="coerce").isna().all():
        metric = "mean_final_train_acc"     # a sweep without validation data
    table = heatmap_table(summary, x, y, metric)
    if table.isna().all().all():
        raise NotDrawableError(f"{metric} is empty in every configuration" + (
            " (the sweep had no validation data: --val-size)" if "val" in metric else ""))
    fig = Figure(figsize=(1.3 * len(table.columns) + 2.5, 0.8 * len(table.index) + 1.8),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(table.to_numpy(dtype=float), cmap="viridis", aspect="auto", origin="lower")
    annotate(ax, table.to_numpy(dtype=float), "{:.3f}")
    ax.set_xticks(np.arange(len(table.columns)), table.columns)
    ax.set_yticks(np.arange(len(table.index)), table.index)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{metric} over seeds")
    fig.colorbar(image, ax=ax, label=metric)
    return save(fig, path)


def annotate(ax, values: np.ndarray, fmt: str) -> None:
    """Write each cell's value on it, dark on light cells and light on dark ones."""
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), v in np.ndenumerate(values):
        text = "n/a" if not np.isfinite(v) else fmt.format(v)
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="black" if np.isfinite(v) and v > middle else "white")


# ---- image models ----------------------------------------------------------------
def first_conv_weights(net: Network) -> np.ndarray:
    """The first conv layer's W: (F, C, HH, WW), or NotDrawableError."""
    for layer in net.layers:
        if layer.kind == "conv2d":
            return np.asarray(layer.params["W"], dtype=float)
    raise WrongKindError("the model has no conv layer, so it has no filters to draw "
                           "(train one with --data cifar10)")


def filter_tiles(W: np.ndarray) -> np.ndarray:
    """W: (F, C, HH, WW) -> (F, HH, WW, 3) for C == 3, else (F * C, HH, WW); each tile
    scaled to [0, 1] on its own so weak filters stay visible."""
    tiles = W.transpose(0, 2, 3, 1) if W.shape[1] == 3 else W.reshape(-1, *W.shape[2:])
    axes = tuple(range(1, tiles.ndim))
    low, high = tiles.min(axis=axes, keepdims=True), tiles.max(axis=axes, keepdims=True)
    return (tiles - low) / np.maximum(high - low, 1e-12)


def plot_filters(net: Network, path, title: str = "") -> Figure:
    """The first conv layer's filters, one tile each, in a near-square grid."""
    tiles = filter_tiles(first_conv_weights(net))
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    fig = Figure(figsize=(1.0 * cols + 0.5, 1.0 * rows + 0.7), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, tile in zip(axes.ravel(), tiles, strict=False):
        ax.imshow(tile, cmap=None if tile.ndim == 3 else "gray", interpolation="nearest")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(title or f"first conv layer: {len(tiles)} filters")
    return save(fig, path)


def plot_confusion(matrix, class_names: list[str], path) -> Figure:
    """A confusion matrix: (K, K) counts, rows true class, columns predicted; each
    cell annotated with its count, colour by the fraction of its row."""
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 1.0 + 0.6 * len(class_names)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    return save(fig, path)
