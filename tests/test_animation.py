"""`nnx plot-boundary --animate`: the decision regions at every snapshot, as a GIF or MP4."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import conv_net, flat, one_error_line, unwritable_path
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from experiments import animation
from experiments.boundary import decision_regions
from experiments.checkpoint import read_snapshot_arrays
from experiments.plots import load_model, training_points
from experiments.sweep import Sweep, run_sweep
from mlp.network import Network

runner = CliRunner()
TRAIN = ["train", "--data", "moons", "--points", "40", "--hidden", "8", "--optimizer", "adam",
         "--lr", "0.05", "--batch-size", "0", "--val-size", "0.25"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run of 20 epochs with a snapshot every 2: 11 frames, epochs 0, 2, ..., 20."""
    path = tmp_path_factory.mktemp("run")
    result = runner.invoke(app, [*TRAIN, "--epochs", "20", "--snapshot-every", "2", "--out", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """hidden 3,8 x reg 0.001,0.1 x seeds 0,1, a snapshot every 5 of 15 epochs."""
    spec = Sweep({"data": "moons", "points": 40, "optimizer": "adam", "lr": 0.05, "batch_size": 0,
                  "epochs": 15, "snapshot_every": 5},
                 {"hidden": [[3], [8]], "reg": [0.001, 0.1], "seed": [0, 1]})
    return run_sweep(spec, tmp_path_factory.mktemp("sweep") / "sweep", workers=0).out


def snapshots(path):
    with np.load(path, allow_pickle=False) as data:
        return read_snapshot_arrays(data)


def gif_frames(path) -> list[np.ndarray]:
    """Every frame of a GIF as the viewer shows it (each drawn over the one before)."""
    image = Image.open(path)
    frames = []
    for i in range(image.n_frames):
        image.seek(i)
        frames.append(np.asarray(image.convert("RGB")))
    return frames


def test_each_frames_regions_are_the_network_of_that_snapshot(run_dir):
    curve = pd.read_csv(run_dir / "metrics.csv")
    movie = animation.make_movie(run_dir, run_dir / "snapshots.npz", curve, "t", resolution=25, margin=0.1)
    frames = snapshots(run_dir / "snapshots.npz")
    assert movie.epochs.tolist() == [epoch for epoch, _ in frames] == list(range(0, 21, 2))
    X, _ = training_points(load_model(run_dir))
    for i in (0, 3, 10):
        net = Network.load(run_dir / "model.npz")
        for name, value in frames[i][1].items():
            net.params[name][...] = value
        np.testing.assert_array_equal(movie.labels[i], decision_regions(net, X, 25, 0.1).labels)
    assert not np.array_equal(movie.labels[0], movie.labels[-1])        # the regions did move


def test_a_frame_shows_the_last_snapshot_at_or_before_its_epoch():
    movie = animation.Movie(np.array([0, 5, 10]), np.zeros((3, 1, 1)), (0, 1, 0, 1), None, None, None, "")
    assert [movie.frame_at(e) for e in (0, 4, 5, 9, 10, 15)] == [0, 0, 1, 1, 2, 2]


def test_frames_are_thinned_evenly_keeping_the_first_and_the_last():
    movie = animation.Movie(np.arange(0, 1001, 5), None, None, None, None, None, "")
    epochs = animation.frame_epochs([movie], 50)
    assert len(epochs) == 50 and epochs[0] == 0 and epochs[-1] == 1000
    assert np.ptp(np.diff(epochs)) <= 5            # even steps, up to rounding to a snapshot


def test_the_gif_has_a_frame_per_snapshot_and_shows_what_was_drawn(run_dir, tmp_path, monkeypatch):
    drawn = []
    render = animation.FrameRenderer.render

    def keep(self):
        frame = render(self)
        drawn.append(frame)
        return frame
    monkeypatch.setattr(animation.FrameRenderer, "render", keep)
    animation.animate_run(run_dir, tmp_path / "a.gif")
    shown = gif_frames(tmp_path / "a.gif")
    assert len(shown) == 11
    drawn = drawn[-11:]                 # the frames written, after those the palette was taken from
    for got, want in zip(shown, drawn, strict=True):
        assert got.shape == want.shape
        exact = np.all(got == want, axis=2)
        assert exact.mean() > 0.99     # only rare anti-aliased shades go to a near palette colour
        assert np.abs(got.astype(int) - want).max() <= 64
    assert not np.array_equal(shown[0], shown[-1])


def test_every_frame_keeps_one_colour_scale_and_fixed_axes(run_dir):
    curve = pd.read_csv(run_dir / "metrics.csv")
    movie = animation.make_movie(run_dir, run_dir / "snapshots.npz", curve, "t", 25, 0.1)
    from matplotlib.figure import Figure
    ax_regions, ax_loss = Figure().subplots(1, 2)
    regions, loss = animation.RegionPanel(ax_regions, movie, 2, False), animation.LossPanel(ax_loss, curve)
    seen = set()
    for epoch in (0, 10, 20):
        regions.show(epoch)
        loss.show(epoch)
        seen.add((regions.image.get_clim(), regions.image.get_cmap().name, ax_regions.get_xlim(),
                  ax_regions.get_ylim(), ax_loss.get_xlim(), ax_loss.get_ylim()))
        train = loss.lines["train_loss"]
        assert train.get_xdata().tolist() == list(range(1, epoch + 1))     # drawn up to this epoch
        assert train.get_ydata() == pytest.approx(curve.train_loss[:epoch])
    assert len(seen) == 1


def test_the_sweep_animation_is_a_grid_of_one_seeds_configurations(sweep_dir, tmp_path):
    result = runner.invoke(app, ["plot-boundary", str(sweep_dir), "--animate", str(tmp_path / "g.gif")])
    assert result.exit_code == 0, result.output
    frames = gif_frames(tmp_path / "g.gif")
    assert len(frames) == 4                            # epochs 0, 5, 10, 15
    one_row = runner.invoke(app, ["plot-boundary", str(sweep_dir), "--animate", str(tmp_path / "h.gif"),
                                  "--cols", "hidden", "--where", "reg=0.1", "--seed", "1"])
    assert one_row.exit_code == 0, one_row.output
    (width, height), (one_width, one_height) = (Image.open(tmp_path / f).size for f in ("g.gif", "h.gif"))
    assert one_width == width and one_height < 0.6 * height


@pytest.mark.slow
def test_a_200_frame_gif_stays_under_10_mb(tmp_path):
    """The README's default network on the spiral, a snapshot every epoch: 201 frames,
    thinned to 200; and a 2 x 2 sweep grid of the same."""
    args = ["--data", "spiral", "--epochs", "200", "--snapshot-every", "1", "--optimizer", "sgd",
            "--lr", "1", "--batch-size", "0", "--val-size", "0.2"]
    trained = runner.invoke(app, ["train", "--hidden", "100", *args, "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["plot-boundary", str(tmp_path / "run"), "--animate",
                                 str(tmp_path / "a.gif")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "a.gif").n_frames == 200
    assert (tmp_path / "a.gif").stat().st_size < 10e6
    sweep = ["sweep", "--grid", "hidden=6,100", "--grid", "reg=0.0001,0.01", "--seeds", "0",
             *args, "--workers", "0", "--out", str(tmp_path / "sweep")]
    assert runner.invoke(app, sweep).exit_code == 0
    result = runner.invoke(app, ["plot-boundary", str(tmp_path / "sweep"), "--animate",
                                 str(tmp_path / "g.gif")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "g.gif").n_frames == 200
    assert (tmp_path / "g.gif").stat().st_size < 10e6


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_an_mp4_is_h264_with_a_frame_per_snapshot(run_dir, tmp_path):
    result = runner.invoke(app, ["plot-boundary", str(run_dir), "--animate", str(tmp_path / "a.mp4")])
    assert result.exit_code == 0, result.output
    data = (tmp_path / "a.mp4").read_bytes()
    assert data[4:8] == b"ftyp" and b"avc1" in data
    if shutil.which("ffprobe"):
        import subprocess
        probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                                "-show_entries", "stream=nb_read_frames,codec_name", "-of", "json",
                                str(tmp_path / "a.mp4")], capture_output=True, text=True, check=True)
        stream = json.loads(probe.stdout)["streams"][0]
        assert stream["codec_name"] == "h264" and int(stream["nb_read_frames"]) == 11


# ---- refusals -------------------------------------------------------------------------
def test_an_mp4_without_ffmpeg_is_one_line(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(animation, "ffmpeg", lambda: None)
    line = one_error_line(runner.invoke(app, ["plot-boundary", str(run_dir), "--animate",
                                              str(tmp_path / "a.mp4")]))
    assert "needs ffmpeg" in line and ".gif" in line
    assert not list(tmp_path.iterdir())


def test_a_run_without_snapshots_says_how_to_take_them(tmp_path):
    assert runner.invoke(app, [*TRAIN, "--epochs", "3", "--out", str(tmp_path / "run")]).exit_code == 0
    line = one_error_line(runner.invoke(app, ["plot-boundary", str(tmp_path / "run"), "--animate",
                                              str(tmp_path / "a.gif")]))
    assert "no snapshots.npz" in line and "--snapshot-every" in line


def test_a_sweep_without_snapshots_says_how_to_take_them(tmp_path):
    spec = Sweep({"data": "moons", "points": 20, "epochs": 2}, {"hidden": [[3], [5]], "seed": [0]})
    out = run_sweep(spec, tmp_path / "sweep", workers=0).out
    result = runner.invoke(app, ["plot-boundary", str(out), "--animate", str(tmp_path / "a.gif")])
    line = one_error_line(result)
    assert "--snapshot-every" in line


def test_an_animation_of_a_cifar_run_is_a_usage_error(tmp_path):
    folder = tmp_path / "cifar-run"
    folder.mkdir()
    conv_net().save(folder / "model.npz")
    (folder / "config.json").write_text(json.dumps({"config": {"data": "cifar10", "arch": "conv6bn"}}))
    line = one_error_line(runner.invoke(app, ["plot-boundary", str(folder), "--animate",
                                              str(tmp_path / "a.gif")]), code=2)
    assert "cifar10" in line and "2D points" in line


def test_an_animation_file_must_be_gif_or_mp4(run_dir, tmp_path):
    result = runner.invoke(app, ["plot-boundary", str(run_dir), "--animate", str(tmp_path / "a.png")])
    assert result.exit_code == 2 and "--animate" in result.output


@pytest.mark.parametrize("where", ["file/a.gif", "/proc/nnx-animation.gif"])
def test_an_unwritable_animation_file_is_refused_before_drawing(run_dir, tmp_path, where):
    target = unwritable_path(tmp_path, where)
    result = runner.invoke(app, ["plot-boundary", str(run_dir), "--animate", target])
    assert result.exit_code == 2 and "Invalid value for '--animate'" in flat(result.output)
