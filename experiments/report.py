"""`nnx report`: one self-contained HTML page per run or sweep.

The page holds the command that reruns it, the full config, the environment it
ran in (as recorded then; "not recorded" for runs of an older nnx), its results
as tables that sort when a header is clicked, and every figure nnx can draw for
it, embedded as data: URIs. Nothing is loaded from anywhere: no script, style
or font from outside, no file beside it, so it opens offline in any browser and
can be mailed or archived as one file. A figure that cannot be drawn for this
run (decision regions of a CIFAR-10 model) is named with the reason instead.
"""
from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

import mlp
from experiments import plots
from experiments.boundary import NotDrawableError
from experiments.config import OPTIONS, format_conv_algorithms, format_option
from experiments.environment import ENVIRONMENT_FIELDS
from experiments.errors import DataError
from experiments.store import ENVIRONMENT, GROUP_COLUMNS

REPORT = "report.html"
REPORT_FRAMES = 60          # an animation in a report: enough to watch, small enough to embed
HISTORY_ROWS = 40           # a run's per-epoch table: this many epochs, evenly spread


@dataclass
class Figure:
    """One figure of the page: its title, and the image (``data``: a data: URI) or why
    there is none (``missing``)."""

    title: str
    caption: str
    data: str | None = None
    missing: str | None = None


def write_report(path, out=None, log: Callable[[str], None] | None = None) -> Path:
    """Write the report of the run or sweep in ``path`` to ``out`` (default
    ``path``/report.html); WrongKindError for a folder that is neither."""
    folder = plots.check_dir(path)
    out = Path(out) if out is not None else folder / REPORT
    page = sweep_page(folder, log) if plots.is_sweep_dir(folder) else run_page(folder, log)
    plots.write_output(out, page.encode())
    return out


# ---- figures --------------------------------------------------------------------
def draw_figure(title: str, caption: str, draw: Callable[[Path], object], suffix: str = ".png",
                log: Callable[[str], None] | None = None) -> Figure:
    """Call ``draw(path)`` to write one image into a temporary folder and embed it;
    a refusal becomes the figure's ``missing`` reason."""
    if log:
        log(f"drawing {title}")
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / f"figure{suffix}"
        try:
            draw(target)
        except (NotDrawableError, DataError) as exc:
            return Figure(title, caption, missing=str(exc))
        mime = {".png": "image/png", ".gif": "image/gif"}[suffix]
        data = base64.b64encode(target.read_bytes()).decode("ascii")
    return Figure(title, caption, data=f"data:{mime};base64,{data}")


def run_figures(folder: Path, record: dict, log) -> list[Figure]:
    config = record.get("config") or {}
    image = config.get("data") == "cifar10"
    figures = [draw_figure("Learning curves", "Loss and accuracy per epoch, train solid and validation "
                           "dashed; the star marks the epoch of highest validation accuracy.",
                           lambda p: plots.plot_curves(folder, p), log=log)]
    if image:
        figures.append(draw_figure("First-layer filters", "The first conv layer's filters, each "
                                   "scaled to its own range.",
                                   lambda p: plots.plot_filters(plots.load_model(folder), p), log=log))
        figures.append(Figure("Confusion matrix", "", missing="evaluating a CIFAR-10 model takes "
                              f"minutes; draw it with nnx evaluate {folder} --plot confusion.png"))
        return figures
    figures.append(draw_figure("Decision regions", "The final network's predicted class over the "
                               "data's range, with the training points.",
                               lambda p: plots.plot_run_boundary(folder, p), log=log))
    if (folder / "snapshots.npz").is_file():
        from experiments.animation import animate_run
        figures.append(draw_figure("Training as an animation", f"The regions at {REPORT_FRAMES} of "
                                   "the snapshots, beside the loss up to that epoch.",
                                   lambda p: animate_run(folder, p, max_frames=REPORT_FRAMES),
                                   suffix=".gif", log=log))
    split = "val" if (config.get("val_size") or 0) > 0 else "train"
    figures.append(draw_figure(f"Confusion matrix ({split} split)", "Rows: true class; columns: "
                               "predicted; colour: the fraction of the row.",
                               lambda p: confusion(folder, split, p), log=log))
    return figures


def confusion(folder: Path, split: str, path: Path) -> None:
    from experiments.evaluate import evaluate
    result = evaluate(plots.load_model(folder), split)
    plots.plot_confusion(result.confusion, result.class_names, path)


def sweep_figures(folder: Path, results: pd.DataFrame, log) -> list[Figure]:
    axes = plots.varying_options(results)
    image = (results["data"] == "cifar10").any()
    figures = [draw_figure("Learning curves", "One panel per configuration: mean over seeds with a "
                           "band of +-1 std, train solid and validation dashed, a star at the epoch "
                           "of highest mean validation accuracy.",
                           lambda p: plots.plot_curves(folder, p), log=log)]
    if not image:
        figures.append(draw_figure("Decision regions", "The first seed's final networks, one panel "
                                   "per configuration.",
                                   lambda p: plots.plot_sweep_boundaries(folder, p), log=log))
        if (folder / "snapshots").is_dir():
            from experiments.animation import animate_sweep
            figures.append(draw_figure("Training as an animation", "The first seed's regions forming, "
                                       "each panel titled with its training loss at that epoch.",
                                       lambda p: animate_sweep(folder, p, max_frames=REPORT_FRAMES),
                                       suffix=".gif", log=log))
    if results["seed"].nunique() > 1 and axes:
        line = axes[1] if len(axes) > 1 else "data"
        figures.append(draw_figure("Spread across seeds", f"Final training loss of every seed against "
                                   f"{axes[0]}, and its standard deviation across seeds.",
                                   lambda p: plots.plot_variance(folder, p, x=axes[0], line=line),
                                   log=log))
    if len(axes) >= 2:
        for metric, what in (("mean_final_val_acc", "at the last epoch"),
                             ("mean_best_val_acc", "at each trial's best validation epoch")):
            figures.append(draw_figure(f"Heatmap: {metric}", f"Mean validation accuracy {what}, over "
                                       "seeds.", lambda p, m=metric: plots.plot_sweep(
                                           folder, p, x=axes[1], y=axes[0], metric=m), log=log))
    return figures


# ---- pages ------------------------------------------------------------------------
def run_page(folder: Path, log=None) -> str:
    record = plots.read_run_record(folder)
    if record.get("config") is None and (folder / "model.npz").is_file():
        record = {"config": plots.load_model(folder).metadata.get("config") or {}}
    config = record.get("config") or {}
    command = record.get("command")
    rerun = command
    outcome = {name: record.get(name) for name in (
        "status", "epochs_run", "stopped_early", "seconds", "final_train_loss", "final_train_acc",
        "final_val_loss", "final_val_acc", "best_epoch", "best_val_acc", "best_val_loss", "finished")
        if name in record}
    if record.get("conv_algorithms"):
        # how each conv computed (and so rounded), as --conv-algorithms takes it
        outcome["conv_algorithms"] = format_conv_algorithms(record["conv_algorithms"])
    sections = [section("Rerun", command_block(rerun, "the run records no command (written by an "
                                               "older nnx); its config is below")),
                section("Outcome", key_value_table(outcome) if outcome else
                        "<p>not recorded (the run did not finish, or an older nnx wrote it)</p>"),
                figures_section(run_figures(folder, record, log)),
                section("History", history_table(folder)),
                section("Config", key_value_table({k: config_cell(k, v) for k, v in config.items()})),
                section("Environment", environment_table([record["environment"]]
                                                         if record.get("environment") else []))]
    return page(f"run {folder.name}", f"nnx train run in {folder}", sections)


def sweep_page(folder: Path, log=None) -> str:
    results = plots.read_results(folder)
    summary = pd.read_csv(folder / "summary.csv") if (folder / "summary.csv").is_file() else None
    axes = plots.varying_options(results)
    rerun = f"nnx sweep --config {folder / 'sweep.toml'} --out {folder}"
    counts = results["status"].value_counts()
    overview = {"trials": len(results), **{s: int(counts.get(s, 0)) for s in ("ok", "diverged", "failed")},
                "axes": ", ".join(axes + ["seed"]) if results["seed"].nunique() > 1 else ", ".join(axes)}
    sweep_file = folder / "sweep.toml"
    sections = [section("Rerun", command_block(rerun, "") + "<p>Running it again resumes: finished "
                        "trials are kept.</p>"),
                section("Overview", key_value_table(overview)),
                section("Summary over seeds", summary_table(summary, axes) if summary is not None
                        else "<p>no summary.csv yet (written when the sweep finishes)</p>"),
                figures_section(sweep_figures(folder, results, log)),
                section("Trials", trials_table(results, axes)),
                section("Config", config_of_trials(results) + (
                    f"<h3>sweep.toml</h3><pre>{esc(sweep_file.read_text())}</pre>"
                    if sweep_file.is_file() else "")),
                section("Environment", environment_table(read_environments(folder)))]
    return page(f"sweep {folder.name}", f"nnx sweep in {folder}", sections)


def read_environments(folder: Path) -> list[dict]:
    try:
        sessions = json.loads((folder / ENVIRONMENT).read_text())
    except (OSError, ValueError):
        return []
    return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []


# ---- tables -----------------------------------------------------------------------
def esc(value) -> str:
    return html.escape(str(value), quote=True)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value) -> str:
    """How a cell reads: numbers to 4 significant digits, a missing value as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def td(value, text: str | None = None) -> str:
    """A cell; a number keeps its exact value in data-value, which the sort uses."""
    if is_number(value) and not (isinstance(value, float) and math.isnan(value)):
        return f'<td class="num" data-value="{value!r}">{esc(text or shown(value))}</td>'
    return f"<td>{esc(text or shown(value))}</td>"


def sortable_table(columns: list[str], rows: list[list], table_id: str) -> str:
    head = "".join(f'<th tabindex="0" title="click to sort">{esc(c)}</th>' for c in columns)
    body = "".join("<tr>" + "".join(td(v) for v in row) + "</tr>" for row in rows)
    return (f'<div class="wide"><table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def key_value_table(values: dict) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th>{td(v)}</tr>" for k, v in values.items())
    return f'<table class="keys">{rows}</table>'


def numbers(frame: pd.DataFrame, column: str) -> list:
    values = pd.to_numeric(frame[column], errors="coerce") if column in frame else [math.nan] * len(frame)
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def summary_table(summary: pd.DataFrame, axes: list[str]) -> str:
    metrics = ["mean_final_val_acc", "std_final_val_acc", "mean_best_val_acc", "mean_best_epoch",
               "mean_final_train_acc", "mean_final_train_loss", "std_final_train_loss", "mean_seconds"]
    metrics = [m for m in metrics
               if m in summary and pd.to_numeric(summary[m], errors="coerce").notna().any()]
    columns = [*axes, "n_ok", *metrics]
    rows = list(zip(*([list(summary[a].astype(str)) for a in axes]
                      + [numbers(summary, c) for c in ["n_ok", *metrics]]), strict=True))
    return sortable_table(columns, [list(r) for r in rows], "summary")


def trials_table(results: pd.DataFrame, axes: list[str]) -> str:
    metrics = ["final_val_acc", "best_val_acc", "best_epoch", "final_train_acc", "final_train_loss",
               "epochs_run", "seconds"]
    metrics = [m for m in metrics if m in results and results[m].notna().any()]
    columns = ["trial_key", *axes, "seed", "status", *metrics]
    rows = list(zip(*([list(results[c].astype(str)) for c in ["trial_key", *axes, "seed", "status"]]
                      + [numbers(results, c) for c in metrics]), strict=True))
    return sortable_table(columns, [list(r) for r in rows], "trials")


def history_table(folder: Path) -> str:
    """The run's metrics.csv at HISTORY_ROWS epochs spread over the run, the best and the last."""
    if not (folder / "metrics.csv").is_file():
        return "<p>no metrics.csv</p>"
    curve = plots.read_curve(folder / "metrics.csv")
    if curve.empty:
        return "<p>no epochs recorded</p>"
    step = max(1, math.ceil(len(curve) / HISTORY_ROWS))
    keep = set(range(0, len(curve), step)) | {len(curve) - 1}
    if curve["val_acc"].notna().any():
        keep.add(int(curve["val_acc"].to_numpy().argmax()) if curve["val_acc"].notna().all()
                 else int(curve["val_acc"].idxmax()))
    part = curve.iloc[sorted(keep)]
    columns = [c for c in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
               if c in part and part[c].notna().any()]
    rows = [[None if pd.isna(v) else (int(v) if c == "epoch" else float(v)) for c, v in zip(columns, r,
                                                                                         strict=True)]
            for r in part[columns].itertuples(index=False)]
    note = f"<p>{len(part)} of {len(curve)} epochs; every epoch is in metrics.csv.</p>" \
        if len(part) < len(curve) else ""
    return note + sortable_table(columns, rows, "history")


def config_cell(name: str, value) -> str:
    if value is None:
        return "none"
    try:
        return format_option(name, value) if name in OPTIONS else str(value)
    except (TypeError, ValueError):
        return str(value)


def config_of_trials(results: pd.DataFrame) -> str:
    """Every option: its value when all trials share it, else the values it takes."""
    values = {}
    for name in (*GROUP_COLUMNS, "seed"):
        if name not in results:
            continue
        distinct = plots.axis_values(results, name)
        text = distinct[0] if len(distinct) == 1 else "varies: " + ", ".join(distinct)
        values[name] = text if text != "" else "none"
    return key_value_table(values)


def environment_table(sessions: list[dict]) -> str:
    """The recorded environments, one column each (a sweep resumed on another machine has
    two); "not recorded" when the run or sweep was written by an nnx that did not."""
    if not sessions:
        return "<p>not recorded (written by an nnx older than this report)</p>"
    names = [n for n in ENVIRONMENT_FIELDS if any(n in s for s in sessions)]
    names += [n for s in sessions for n in s if n not in names]
    head = "".join(f"<th>session {i + 1}</th>" for i in range(len(sessions))) if len(sessions) > 1 else ""
    rows = "".join(f"<tr><th>{esc(ENVIRONMENT_FIELDS.get(n, n))}</th>"
                   + "".join(td(s.get(n), shown(s.get(n)) if s.get(n) is not None else "not recorded")
                             for s in sessions) + "</tr>" for n in names)
    return f'<table class="keys">{"<tr><th></th>" + head + "</tr>" if head else ""}{rows}</table>'


# ---- the page ---------------------------------------------------------------------
def section(title: str, body: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def command_block(command: str | None, missing: str) -> str:
    return f"<pre><code>{esc(command)}</code></pre>" if command else f"<p>{esc(missing)}</p>"


def figures_section(figures: list[Figure]) -> str:
    parts = []
    for fig in figures:
        if fig.data:
            parts.append(f'<figure><h3>{esc(fig.title)}</h3><img src="{fig.data}" alt="{esc(fig.title)}">'
                         f"<figcaption>{esc(fig.caption)}</figcaption></figure>")
        else:
            parts.append(f'<figure class="missing"><h3>{esc(fig.title)}</h3>'
                         f"<p>not drawn: {esc(fig.missing)}</p></figure>")
    return section("Figures", "".join(parts))


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1200px; margin: 0 auto; padding: 1.5em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; }
header p { color: #555; margin-top: 0; } nav a { margin-right: 1em; }
pre { background: #f5f5f7; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
div.wide { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; background: #f5f5f7; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
table.keys th { background: #f5f5f7; font-weight: 600; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } figure.missing p { color: #8a6d00; }
"""

# Click (or Enter on) a header: sort the rows by that column, numbers by value
# (data-value), text alphabetically, missing values last; again to reverse.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    function sort() {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[column];
        if (cell.dataset.value !== undefined) return parseFloat(cell.dataset.value);
        var text = cell.textContent;
        return text === "\\u2013" ? null : text;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        var order = (typeof x === "number" && typeof y === "number") ? x - y
          : String(x).localeCompare(String(y), undefined, {numeric: true});
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") sort(); });
  });
});
"""


def page(title: str, subtitle: str, sections: list[str]) -> str:
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    nav = "".join(f'<a href="#{t.lower().replace(" ", "-")}">{t}</a>' for t in (
        "Rerun", "Figures", "Config", "Environment"))
    # (every page has these sections; the tables' sections sit between them)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>nnx report: {esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>nnx report: {esc(title)}</h1><p>{esc(subtitle)}; written {made} by "
            f"nnx {esc(mlp.__version__)}</p><nav>{nav}</nav></header>"
            + "".join(sections) + f"<script>{SCRIPT}</script></body></html>\n")

