"""`nnx report`: one self-contained HTML page per run or sweep (read back with the
standard library's HTML parser; tests/test_report_browser.py opens it in Chromium)."""
import base64
import io
import json
import re
from html.parser import HTMLParser

import pandas as pd
import pytest
from helpers import flat, make_batches, one_error_line, unwritable_path, write_batches
from PIL import Image
from typer.testing import CliRunner

import mlp
from cli.app import app
from experiments.environment import environment
from experiments.sweep import Sweep, run_sweep

runner = CliRunner()
QUICK = {"data": "moons", "points": 40, "optimizer": "adam", "lr": 0.05, "batch_size": 0, "epochs": 12,
         "val_size": 0.25}


class Page(HTMLParser):
    """What a report holds: its images' sources, every href/src, the tables' cells by id."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.links, self.scripts, self.tables = [], [], [], {}
        self.headings, self._table, self._row, self._cell = [], None, None, None
        self._in_heading = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("href", "src") if k in attrs]
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.scripts.append((tag, attrs))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        if tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        if tag in ("td", "th") and self._row is not None:
            self._cell = {"text": "", "value": attrs.get("data-value")}
            self._row.append(self._cell)
        self._in_heading = tag in ("h2", "h3")
        if self._in_heading:
            self.headings.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if tag in ("td", "th"):
            self._cell = None
        if tag in ("h2", "h3"):
            self._in_heading = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._in_heading:
            self.headings[-1] += data


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "run"
    args = ["train", "--data", "moons", "--points", "40", "--hidden", "8", "--epochs", "12",
            "--val-size", "0.25", "--snapshot-every", "3", "--out", str(path)]
    assert runner.invoke(app, args).exit_code == 0
    return path


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    spec = Sweep(dict(QUICK, snapshot_every=4), {"hidden": [[3], [8]], "reg": [0.001, 0.1], "seed": [0, 1]})
    return run_sweep(spec, tmp_path_factory.mktemp("sweep") / "sweep", workers=0).out


def report(path, *args) -> tuple[str, Page]:
    result = runner.invoke(app, ["report", str(path), *args])
    assert result.exit_code == 0, result.output
    out = next(a for a in [*args[1::2], str(path / "report.html")] if a.endswith(".html"))
    text = open(out, encoding="utf-8").read()
    return text, Page(text)


def key_values(page: Page) -> dict:
    """The rows of the page's two-column tables (outcome, config, environment) as a dict."""
    return {row[0]["text"]: row[1]["text"] for table in page.tables.values() for row in table
            if len(row) == 2}


def decoded(src: str) -> Image.Image:
    header, data = src.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/gif;base64")
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_a_run_report_holds_the_rerun_command_config_environment_and_figures(run_dir):
    text, page = report(run_dir)
    record = json.loads((run_dir / "config.json").read_text())
    assert record["command"] in text.replace("&#x27;", "'")
    keys = key_values(page)
    assert keys["hidden"] == "8" and keys["epochs"] == "12"
    assert keys["optimizer"] == record["config"]["optimizer"]
    assert keys["NumPy"] == environment()["numpy"] and keys["nnx"] == mlp.__version__
    assert keys["BLAS kernel"] == (environment()["blas_kernel"] or "not recorded")
    assert keys["NNX_ settings"] == record["environment"]["nnx_settings"]   # "none" unless set
    assert keys["best_epoch"] == str(record["best_epoch"])
    assert {"Learning curves", "Decision regions", "Training as an animation",
            "Confusion matrix (val split)"} <= set(page.headings)
    images = [decoded(src) for src in page.images]
    assert len(images) == 4 and all(im.width > 100 and im.height > 100 for im in images)
    assert [im.format for im in images].count("GIF") == 1 and images[-1].format == "PNG"


def test_a_report_loads_nothing_from_outside(run_dir, sweep_dir):
    for path in (run_dir, sweep_dir):
        _, page = report(path)
        assert all(link.startswith(("data:", "#")) for link in page.links), page.links
        assert [tag for tag, attrs in page.scripts] == ["script"]        # the one inline sorter
        assert all("src" not in attrs for _, attrs in page.scripts)


def test_the_history_table_is_metrics_csv_thinned_with_the_best_and_last_epochs(run_dir):
    _, page = report(run_dir)
    rows = page.tables["history"]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert [c["text"] for c in rows[0]] == list(metrics.columns)
    epochs = [int(r[0]["value"]) for r in rows[1:]]
    record = json.loads((run_dir / "config.json").read_text())
    assert epochs[-1] == len(metrics) and record["best_epoch"] in epochs
    for row in rows[1:]:
        expected = metrics[metrics.epoch == int(row[0]["value"])].iloc[0]
        assert float(row[1]["value"]) == expected.train_loss           # exact, in data-value


def test_a_sweep_report_tables_are_summary_csv_and_results_csv(sweep_dir):
    text, page = report(sweep_dir)
    assert f"nnx sweep --config {sweep_dir / 'sweep.toml'} --out {sweep_dir}" in text
    summary = pd.read_csv(sweep_dir / "summary.csv")
    head, *rows = page.tables["summary"]
    columns = [c["text"] for c in head]
    assert columns[:3] == ["hidden", "reg", "n_ok"] and "mean_best_val_acc" in columns
    assert len(rows) == len(summary) == 4
    for row in rows:
        cells = {name: cell for name, cell in zip(columns, row, strict=True)}
        match = summary[(summary.hidden.astype(str) == cells["hidden"]["text"])
                        & (summary.reg.astype(str) == cells["reg"]["text"])].iloc[0]
        assert float(cells["mean_best_val_acc"]["value"]) == match.mean_best_val_acc
    results = pd.read_csv(sweep_dir / "results.csv")
    assert len(page.tables["trials"]) - 1 == len(results) == 8
    assert {"Learning curves", "Decision regions", "Training as an animation", "Spread across seeds",
            "Heatmap: mean_final_val_acc", "Heatmap: mean_best_val_acc"} <= set(page.headings)
    assert all(decoded(src).width > 100 for src in page.images)


def test_the_environment_of_a_sweep_is_recorded_per_session(sweep_dir):
    sessions = json.loads((sweep_dir / "environment.json").read_text())
    assert len(sessions) == 1 and sessions[0]["workers"] == 0
    assert sessions[0]["numpy"] == environment()["numpy"]
    _, page = report(sweep_dir)
    assert key_values(page)["worker processes"] == "0"
    assert key_values(page)["NumPy"] == environment()["numpy"]


def test_an_older_run_says_its_environment_was_not_recorded(run_dir, tmp_path):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    record = json.loads((old / "config.json").read_text())
    del record["environment"]
    (old / "config.json").write_text(json.dumps(record))
    text, _ = report(old)
    assert re.search(r"Environment</h2><p>not recorded", text)


def test_a_cifar_run_report_has_its_filters_and_says_why_no_regions(tmp_path):
    write_batches(tmp_path / "data", make_batches(seed=1, per_batch=12))
    args = ["train", "--data", "cifar10", "--arch", "conv4x3-pool2-fc10", "--data-dir",
            str(tmp_path / "data"), "--val-size", "10", "--epochs", "1", "--batch-size", "10",
            "--out", str(tmp_path / "run")]
    assert runner.invoke(app, args).exit_code == 0
    text, page = report(tmp_path / "run")
    assert "<th>conv_algorithms</th><td>0:im2col</td>" in text    # as --conv-algorithms takes it
    assert {"Learning curves", "First-layer filters"} <= set(page.headings)
    assert "Decision regions" not in page.headings and "nnx evaluate" in text
    assert len(page.images) == 2


# ---- refusals -------------------------------------------------------------------------
def test_a_folder_that_is_neither_a_run_nor_a_sweep_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    line = one_error_line(runner.invoke(app, ["report", str(tmp_path)]), code=2)
    assert "not a run or sweep directory" in line
    assert not (tmp_path / "report.html").exists()


def test_a_missing_folder_is_one_line(tmp_path):
    assert "no such directory" in one_error_line(runner.invoke(app, ["report", str(tmp_path / "nowhere")]))


@pytest.mark.parametrize("where", ["file/report.html", "/proc/nnx-report.html"])
def test_an_unwritable_report_file_is_refused_before_drawing(run_dir, tmp_path, where):
    target = unwritable_path(tmp_path, where)
    result = runner.invoke(app, ["report", str(run_dir), "--out", target])
    assert result.exit_code == 2 and "Invalid value for '--out'" in flat(result.output)


def test_the_report_file_must_be_html(run_dir, tmp_path):
    result = runner.invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "r.png")])
    assert result.exit_code == 2 and "--out" in result.output
