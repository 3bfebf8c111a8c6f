"""The plots draw the numbers in the CSVs: every test reads them back from the artists."""
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import conv_net, flat, one_error_line, unwritable_path
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.text import Text
from typer.testing import CliRunner

from cli.app import app
from experiments import plots
from experiments.boundary import boundary_complexity, decision_regions, grid_axes
from experiments.config import TrainConfig
from experiments.errors import ConfigError
from experiments.runner import run, save_run
from experiments.sweep import Sweep, run_sweep
from mlp.network import build_mlp

runner = CliRunner()
QUICK = {"data": "moons", "points": 20, "optimizer": "adam", "lr": 0.05, "batch_size": 0,
         "epochs": 30, "val_size": 0.25}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A real nnx sweep: hidden 3,8 x reg 0.001,0.1 x seeds 0-2."""
    spec = Sweep(dict(QUICK), {"hidden": [[3], [8]], "reg": [0.001, 0.1], "seed": [0, 1, 2]})
    return run_sweep(spec, tmp_path_factory.mktemp("sweep") / "sweep", workers=1).out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real nnx train run directory."""
    path = tmp_path_factory.mktemp("run")
    save_run(path, run(TrainConfig(hidden=[5], **QUICK)))
    return path


def results(sweep_dir):
    return pd.read_csv(sweep_dir / "results.csv")


def summary(sweep_dir):
    return pd.read_csv(sweep_dir / "summary.csv")


# ---- the complexity metric ------------------------------------------------------
def test_complexity_of_one_straight_cut_is_two_columns_of_cells():
    labels = np.zeros((10, 20), dtype=int)
    labels[:, 8:] = 1
    assert boundary_complexity(labels) == pytest.approx(2 * 10 / 200)


def test_complexity_is_zero_for_one_class_and_one_for_a_checkerboard():
    assert boundary_complexity(np.zeros((5, 5), dtype=int)) == 0
    assert boundary_complexity(np.indices((6, 6)).sum(axis=0) % 2) == 1


def test_grid_covers_the_data_plus_the_margin_on_each_side():
    X = np.array([[0.0, -1.0], [2.0, 1.0]])
    xs, ys = grid_axes(X, resolution=11, margin=0.5)
    assert (xs[0], xs[-1], ys[0], ys[-1]) == (-1.0, 3.0, -2.0, 2.0)
    assert len(xs) == len(ys) == 11


def test_regions_are_the_networks_predictions_on_the_grid():
    net = build_mlp(2, [4], 2, seed=1)
    regions = decision_regions(net, np.array([[-1.0, -1.0], [1.0, 1.0]]), resolution=7)
    assert regions.labels[2, 5] == net.predict(np.array([[regions.xs[5], regions.ys[2]]]))[0]


# ---- decision regions -----------------------------------------------------------
def title_acc(title: str) -> float:
    return float(re.search(r"train acc ([\d.]+)%", title).group(1)) / 100


def test_run_boundary_is_one_panel_titled_with_the_runs_train_accuracy(run_dir, tmp_path):
    fig = plots.plot_run_boundary(run_dir, tmp_path / "b.png", resolution=30)
    assert (tmp_path / "b.png").stat().st_size > 0
    assert len(fig.axes) == 1
    record = json.loads((run_dir / "config.json").read_text())
    assert title_acc(fig.axes[0].get_title()) == pytest.approx(record["final_train_acc"], abs=5e-4)


def test_run_boundary_draws_every_training_point(run_dir, tmp_path):
    fig = plots.plot_run_boundary(run_dir, tmp_path / "b.png", resolution=20)
    drawn = np.concatenate([c.get_offsets() for c in fig.axes[0].collections])
    X, _ = plots.training_points(plots.load_model(run_dir))
    assert sorted(map(tuple, drawn)) == sorted(map(tuple, X))


def test_sweep_boundary_has_one_panel_per_hidden_and_reg(sweep_dir, tmp_path):
    fig = plots.plot_sweep_boundaries(sweep_dir, tmp_path / "grid.png", seed="1", resolution=20)
    assert len(fig.axes) == 4
    rows = results(sweep_dir)
    for ax in fig.axes:
        hidden, reg = re.search(r"hidden=(\S+) reg=(\S+)", ax.get_title()).groups()
        row = rows[(rows.hidden.astype(str) == hidden) & (rows.reg == float(reg)) & (rows.seed == 1)]
        assert title_acc(ax.get_title()) == pytest.approx(row.final_train_acc.item(), abs=5e-4)


def test_sweep_boundary_with_other_axes_swapped(sweep_dir, tmp_path):
    fig = plots.plot_sweep_boundaries(sweep_dir, tmp_path / "g.svg", rows="reg", cols="seed",
                                      where={"hidden": "8"}, resolution=10)
    assert len(fig.axes) == 2 * 3
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml")


def test_sweep_boundary_refuses_an_axis_left_open(sweep_dir, tmp_path):
    with pytest.raises(plots.NotDrawableError, match="also varies reg"):
        plots.plot_sweep_boundaries(sweep_dir, tmp_path / "g.png", rows="hidden", cols="seed")


# ---- variance across seeds ------------------------------------------------------
def test_variance_points_are_every_seeds_final_train_loss(sweep_dir, tmp_path):
    fig = plots.plot_variance(sweep_dir, tmp_path / "v.png")
    ax = fig.axes[0]
    drawn = np.concatenate([np.asarray(c.get_offsets())[:, 1] for c in ax.collections
                            if c.get_gid() == "seeds"])
    table = results(sweep_dir)
    assert np.sort(drawn) == pytest.approx(np.sort(table.final_train_loss[table.status == "ok"].to_numpy()))


def test_variance_std_lines_equal_summary_csv(sweep_dir, tmp_path):
    fig = plots.plot_variance(sweep_dir, tmp_path / "v.pdf")
    assert (tmp_path / "v.pdf").read_bytes().startswith(b"%PDF")
    table = summary(sweep_dir)
    std_lines = fig.axes[1].get_lines()
    assert len(std_lines) == 2                         # one per reg
    for line, reg in zip(std_lines, [0.001, 0.1], strict=True):
        expected = table[table.reg == reg].set_index("hidden").loc[[3, 8], "std_final_train_loss"]
        assert line.get_ydata() == pytest.approx(expected.to_numpy())


# ---- learning curves ------------------------------------------------------------
def test_run_curves_are_metrics_csv(run_dir, tmp_path):
    fig = plots.plot_curves(run_dir, tmp_path / "c.png")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    loss = next(line for line in fig.axes[0].get_lines() if line.get_gid() == "train_loss")
    assert loss.get_ydata() == pytest.approx(metrics.train_loss.to_numpy())
    val = next(line for line in fig.axes[1].get_lines() if line.get_gid() == "val_acc")
    assert val.get_ydata() == pytest.approx(metrics.val_acc.to_numpy())


def panel(fig, label: str):
    """The axes of one small multiple, by its label ("hidden=3 reg=0.001 loss")."""
    return next(ax for ax in fig.axes if ax.get_label() == label)


def line_of(ax, gid: str):
    return next(line for line in ax.get_lines() if line.get_gid() == gid)


def test_sweep_curves_are_one_panel_per_configuration_with_the_mean_over_seeds(sweep_dir, tmp_path):
    fig = plots.plot_curves(sweep_dir, tmp_path / "c.png")
    assert len(fig.axes) == 2 * 2 * 2                    # hidden x reg, a loss and an accuracy plot each
    table = results(sweep_dir)
    for hidden, reg in [(3, 0.001), (8, 0.1)]:
        trials = table[(table.hidden == hidden) & (table.reg == reg)].trial_key
        curves = [pd.read_csv(sweep_dir / "curves" / f"{t}.csv") for t in trials]
        loss = panel(fig, f"hidden={hidden} reg={reg} loss")
        acc = panel(fig, f"hidden={hidden} reg={reg} acc")
        for ax, column in ((loss, "train_loss"), (loss, "val_loss"), (acc, "train_acc"), (acc, "val_acc")):
            values = np.array([c[column] for c in curves])
            assert line_of(ax, column).get_ydata() == pytest.approx(values.mean(axis=0))
            band = next(c for c in ax.collections if np.allclose(c.get_facecolor()[0][:3],
                                                                  to_rgb(line_of(ax, column).get_color())))
            top = band.get_paths()[0].vertices[:, 1].max()
            assert top == pytest.approx((values.mean(axis=0) + values.std(axis=0)).max())
        assert len(loss.collections) == len(acc.collections) == 2     # a band per line


def test_the_star_marks_the_first_peak_of_the_mean_validation_accuracy(sweep_dir, tmp_path):
    fig = plots.plot_curves(sweep_dir, tmp_path / "c.png")
    table = results(sweep_dir)
    trials = table[(table.hidden == 8) & (table.reg == 0.001)].trial_key
    mean = np.mean([pd.read_csv(sweep_dir / "curves" / f"{t}.csv").val_acc for t in trials], axis=0)
    star = line_of(panel(fig, "hidden=8 reg=0.001 acc"), "best")
    assert star.get_xdata()[0] == 1 + int(np.argmax(mean))
    assert star.get_ydata()[0] == pytest.approx(mean.max())
    on_loss = line_of(panel(fig, "hidden=8 reg=0.001 loss"), "best")
    assert on_loss.get_xdata()[0] == star.get_xdata()[0]


def test_small_multiples_share_x_everywhere_and_y_per_metric(sweep_dir, tmp_path):
    fig = plots.plot_curves(sweep_dir, tmp_path / "c.png")
    losses = [ax for ax in fig.axes if ax.get_label().endswith("loss")]
    accs = [ax for ax in fig.axes if ax.get_label().endswith("acc")]
    assert len({ax.get_xlim() for ax in fig.axes}) == 1
    assert len({ax.get_ylim() for ax in losses}) == 1 and len({ax.get_ylim() for ax in accs}) == 1
    assert losses[0].get_ylim() != accs[0].get_ylim()


def text_boxes(fig):
    """(text, window extent) of every text drawn on ``fig``: titles, axis labels, legend
    entries, and the tick labels of ticks inside the view (the others are not drawn)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    tick_axis = {id(tick.label1): (tick, axis) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                 for tick in axis.get_major_ticks() + axis.get_minor_ticks()}
    drawn = []
    for text in fig.findobj(lambda a: isinstance(a, Text)):
        if not (text.get_visible() and text.get_text().strip()):
            continue
        if id(text) in tick_axis:
            tick, axis = tick_axis[id(text)]
            low, high = sorted(axis.get_view_interval())
            if not low <= tick.get_loc() <= high:
                continue
        drawn.append((text.get_text(), text.get_window_extent(renderer)))
    return drawn


def overlaps(fig) -> list:
    boxes = text_boxes(fig)
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
            if box_a.x0 < box_b.x1 - 1 and box_b.x0 < box_a.x1 - 1
            and box_a.y0 < box_b.y1 - 1 and box_b.y0 < box_a.y1 - 1]


def test_no_two_labels_of_the_small_multiples_overlap(sweep_dir, tmp_path):
    assert overlaps(plots.plot_curves(sweep_dir, tmp_path / "c.png")) == []


def test_no_two_labels_of_a_runs_curves_overlap(run_dir, tmp_path):
    assert overlaps(plots.plot_curves(run_dir, tmp_path / "c.png")) == []


@pytest.fixture(scope="module")
def three_axes_dir(tmp_path_factory):
    """hidden 3,8 x reg 0.001,0.1 x lr 0.01,0.05 x seeds 0,1."""
    spec = Sweep(dict(QUICK, epochs=12), {"hidden": [[3], [8]], "reg": [0.001, 0.1], "lr": [0.01, 0.05],
                                          "seed": [0, 1]})
    return run_sweep(spec, tmp_path_factory.mktemp("three") / "sweep", workers=1).out


def test_a_third_axis_colours_the_lines_of_each_panel(three_axes_dir, tmp_path):
    fig = plots.plot_curves(three_axes_dir, tmp_path / "c.png")
    ax = panel(fig, "hidden=3 reg=0.1 loss")
    train = [line for line in ax.get_lines() if line.get_gid() == "train_loss"]
    assert sorted(line.get_label() for line in train) == ["lr=0.01 train", "lr=0.05 train"]
    assert len({line.get_color() for line in train}) == 2
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "lr=0.01" in legend and "lr=0.05" in legend and "validation" in legend
    table = results(three_axes_dir)
    keys = table[(table.hidden == 3) & (table.reg == 0.1) & (table.lr == 0.05)].trial_key
    mean = np.mean([pd.read_csv(three_axes_dir / "curves" / f"{k}.csv").train_loss for k in keys], axis=0)
    drawn = next(line for line in train if line.get_label() == "lr=0.05 train")
    assert drawn.get_ydata() == pytest.approx(mean)


def test_rows_and_cols_choose_the_grid_and_where_pins_the_rest(three_axes_dir, tmp_path):
    fig = plots.plot_curves(three_axes_dir, tmp_path / "c.png", rows="lr", cols="hidden",
                            where={"reg": "0.1"})
    assert sorted(ax.get_label() for ax in fig.axes if ax.get_label().endswith("loss")) == [
        f"lr={lr} hidden={h} loss" for lr in ("0.01", "0.05") for h in ("3", "8")]


def test_a_fourth_varying_option_must_be_pinned(three_axes_dir, tmp_path):
    with pytest.raises(plots.NotDrawableError, match="also varies lr; pick one value with --where lr="):
        plots.plot_curves(three_axes_dir, tmp_path / "c.png", rows="hidden", cols="seed")


def test_loss_goes_on_a_log_scale_when_it_spans_a_decade():
    def curve(losses):
        return pd.DataFrame({"epoch": range(1, len(losses) + 1), "train_loss": losses,
                             "val_loss": [np.nan] * len(losses)})
    assert plots.loss_scale([curve([1.0, 0.3, 0.11])]) == "linear"
    assert plots.loss_scale([curve([1.0, 0.3, 0.1])]) == "log"
    assert plots.loss_scale([curve([1.0, 0.5]), curve([0.09])]) == "log"      # over every panel


def test_run_curves_mark_the_best_epoch_of_config_json(run_dir, tmp_path):
    fig = plots.plot_curves(run_dir, tmp_path / "c.png")
    record = json.loads((run_dir / "config.json").read_text())
    star = line_of(fig.axes[1], "best")
    assert star.get_xdata()[0] == record["best_epoch"]
    assert star.get_ydata()[0] == pytest.approx(record["best_val_acc"])


def test_run_curves_without_a_validation_split_mark_no_best_epoch(run_dir, tmp_path):
    """A run trained on every example (--val-size 0) has train curves only: no star, no
    legend entry for one, and whole epochs on the x axis."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    metrics = pd.read_csv(copy / "metrics.csv")
    metrics[["val_loss", "val_acc"]] = np.nan
    metrics.to_csv(copy / "metrics.csv", index=False)
    fig = plots.plot_curves(copy, tmp_path / "c.png")
    FigureCanvasAgg(fig).draw()
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train"]
        assert all(line.get_gid() != "best" for line in ax.get_lines())
        assert all(float(tick).is_integer() for tick in ax.get_xticks())


# ---- heatmap ---------------------------------------------------------------------
def test_heatmap_cells_are_mean_val_acc_from_summary_csv(sweep_dir, tmp_path):
    fig = plots.plot_sweep(sweep_dir, tmp_path / "h.png")
    image = fig.axes[0].get_images()[0].get_array()
    table = summary(sweep_dir).pivot(index="hidden", columns="reg", values="mean_final_val_acc")
    assert np.asarray(image) == pytest.approx(table.loc[[3, 8], [0.001, 0.1]].to_numpy())
    texts = sorted(float(t.get_text()) for t in fig.axes[0].texts)
    assert texts == pytest.approx(sorted(np.round(table.to_numpy().ravel(), 3)))


def test_heatmap_of_the_best_validation_accuracy_is_summary_csvs_column(sweep_dir, tmp_path):
    fig = plots.plot_sweep(sweep_dir, tmp_path / "h.png", metric="mean_best_val_acc")
    image = fig.axes[0].get_images()[0].get_array()
    table = summary(sweep_dir).pivot(index="hidden", columns="reg", values="mean_best_val_acc")
    assert np.asarray(image) == pytest.approx(table.loc[[3, 8], [0.001, 0.1]].to_numpy())
    assert (table.to_numpy() >= summary(sweep_dir).pivot(
        index="hidden", columns="reg", values="mean_final_val_acc").to_numpy() - 1e-12).all()


def test_a_sweep_written_before_the_best_columns_is_drawn_without_upgrading_it(tmp_path):
    import shutil
    from pathlib import Path
    old = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "data" / "sweep-results-schema-2", old)
    before = (old / "results.csv").read_bytes()
    results = plots.read_results(old)
    with_val = results[results.val_size == "0.25"]
    for _, row in with_val.iterrows():
        curve = pd.read_csv(old / "curves" / f"{row.trial_key}.csv")
        assert row.best_val_acc == curve.val_acc.max()
        assert row.best_epoch == curve.epoch[curve.val_acc.idxmax()]
    assert results[results.val_size == "0"].best_val_acc.isna().all()
    fig = plots.plot_sweep(old, tmp_path / "h.png", x="val_size", y="hidden", metric="mean_best_val_acc")
    drawn = np.asarray(fig.axes[0].get_images()[0].get_array())
    assert drawn[0, 1] == pytest.approx(with_val.best_val_acc.mean())
    assert (old / "results.csv").read_bytes() == before


def test_heatmap_refuses_an_unknown_axis_as_a_usage_error(sweep_dir, tmp_path):
    with pytest.raises(ConfigError, match="'width' is not an option") as refused:
        plots.plot_sweep(sweep_dir, tmp_path / "h.png", x="width")
    assert refused.value.option == "x"


# ---- image models ----------------------------------------------------------------
def test_filters_are_one_tile_per_filter_of_the_first_conv_layer(tmp_path):
    net = conv_net(6)
    fig = plots.plot_filters(net, tmp_path / "f.png")
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(images) == 6
    W = net.layers[0].params["W"][2].transpose(1, 2, 0)
    expected = (W - W.min()) / (W.max() - W.min())
    assert np.asarray(images[2].get_array()) == pytest.approx(expected, abs=1e-6)


def test_filters_refuse_a_model_without_conv_layers(tmp_path):
    with pytest.raises(plots.NotDrawableError, match="no conv layer"):
        plots.plot_filters(build_mlp(2, [3], 2), tmp_path / "f.png")


def test_confusion_cells_are_the_counts_coloured_by_row_fraction(tmp_path):
    matrix = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 7]])
    fig = plots.plot_confusion(matrix, ["a", "b", "c"], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 0
    ax = fig.axes[0]
    assert [int(t.get_text()) for t in ax.texts] == matrix.ravel().tolist()
    assert np.asarray(ax.get_images()[0].get_array())[1] == pytest.approx([0.5, 0.5, 0])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]


# ---- the commands -----------------------------------------------------------------
@pytest.mark.parametrize("command, name", [("plot-boundary", "boundary"), ("plot-curves", "curves")])
def test_run_commands_write_next_to_the_run(run_dir, command, name):
    result = runner.invoke(app, [command, str(run_dir), "--format", "svg"])
    assert result.exit_code == 0, result.output
    assert (run_dir / f"{name}.svg").is_file()


@pytest.mark.parametrize("command", ["plot-boundary", "plot-variance", "plot-curves", "plot-sweep"])
def test_sweep_commands_write_the_file_asked_for(sweep_dir, tmp_path, command):
    out = tmp_path / f"{command}.png"
    args = [command, str(sweep_dir), "--out", str(out)]
    result = runner.invoke(app, args + (["--resolution", "10"] if command == "plot-boundary" else []))
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


@pytest.mark.parametrize("command", ["plot-boundary", "plot-variance", "plot-curves", "plot-sweep"])
def test_commands_refuse_a_missing_directory_in_one_line(tmp_path, command):
    line = one_error_line(runner.invoke(app, [command, str(tmp_path / "nowhere")]))
    assert "no such directory" in line


def test_boundary_refuses_an_image_model_in_one_line(tmp_path):
    folder = tmp_path / "cifar-run"
    folder.mkdir()
    conv_net().save(folder / "model.npz")
    line = one_error_line(runner.invoke(app, ["plot-boundary", str(folder)]), code=2)
    assert "2D points" in line and "cifar10" in line


def test_sweep_only_commands_refuse_a_run_directory(run_dir):
    line = one_error_line(runner.invoke(app, ["plot-variance", str(run_dir)]), code=2)
    assert "not a sweep directory" in line


def test_filters_command_draws_a_conv_model_and_refuses_an_mlp(tmp_path, run_dir):
    conv_net().save(tmp_path / "conv.npz")
    result = runner.invoke(app, ["plot-filters", str(tmp_path / "conv.npz")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "filters.png").is_file()
    assert "no conv layer" in one_error_line(runner.invoke(app, ["plot-filters", str(run_dir)]), code=2)


def test_a_bad_format_is_a_usage_error(run_dir):
    result = runner.invoke(app, ["plot-curves", str(run_dir), "--format", "gif"])
    assert result.exit_code == 2


@pytest.mark.parametrize("where", ["file/out.png", "/proc/nnx-figure.png"])
@pytest.mark.parametrize("command", ["plot-boundary", "plot-variance", "plot-curves", "plot-sweep",
                                     "plot-filters", "evaluate"])
def test_an_unwritable_output_file_is_refused_before_drawing(sweep_dir, run_dir, tmp_path, command, where):
    target = unwritable_path(tmp_path, where)
    option = "--plot" if command == "evaluate" else "--out"
    if command == "plot-filters":
        conv_net().save(tmp_path / "conv.npz")
        args = [command, str(tmp_path / "conv.npz"), option, target]
    elif command == "evaluate":
        args = [command, str(run_dir), "--split", "train", option, target]
    else:
        args = [command, str(sweep_dir), option, target]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and isinstance(result.exception, (SystemExit, type(None)))
    text = flat(result.output)
    assert f"Invalid value for '{option}'" in text and ("is a file" in text or "cannot" in text)


def test_a_figure_that_cannot_be_written_after_drawing_is_one_line_and_exit_1(run_dir, tmp_path,
                                                                              monkeypatch):
    """A disk that fills up (or a folder removed) between the check and the write."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(plots.os, "replace", full)
    line = one_error_line(runner.invoke(app, ["plot-curves", str(run_dir), "--out",
                                              str(tmp_path / "c.png")]))
    assert line == f"Error: cannot write {tmp_path / 'c.png'}: No space left on device"
    assert list(tmp_path.iterdir()) == []            # no partial file, no temporary one
