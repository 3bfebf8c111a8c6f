"""Training as an animation: a 2D network's decision regions forming, from the
snapshots a run (``nnx train --snapshot-every N``) or a sweep kept.

A run's animation shows the regions with the training points on the left and
the loss curve drawn up to the current epoch on the right; a sweep's is a grid
of such region panels, one per configuration (rows and columns as
``plot-boundary`` lays them out), each titled with its loss at that epoch.
Every frame shares one colour scale (class k is always the same colour) and
fixed axes. The figure is built once; each frame only swaps the region image's
data, the curve's data and the title text, and each panel's regions come from
one ``predict`` over the whole grid per snapshot.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.figure import Figure

from experiments.boundary import NotDrawableError, WrongKindError, check_2d, grid_axes
from experiments.checkpoint import read_snapshot_arrays
from experiments.plots import (
    SPLIT_COLOURS,
    SPLIT_NAMES,
    SPLIT_STYLES,
    cell_label,
    check_dir,
    colour,
    load_model,
    loss_scale,
    output_file,
    read_curve,
    read_results,
    read_run_record,
    select_trials,
    training_points,
    trial_grid,
)
from experiments.runner import SNAPSHOTS
from mlp.network import Network

ANIMATION_FORMATS = ("gif", "mp4")
DEFAULT_FPS = 20
MAX_FRAMES = 200         # a longer snapshot series is thinned to this many frames
RESOLUTION = 120         # grid points per axis: the panels are a few hundred pixels wide
FRAME_DPI = 80


@dataclass
class Movie:
    """One panel's frames: the snapshot epochs, the predicted class on the grid at each,
    the training points. epochs: (S,), labels: (S, R, R) [snapshot, y, x], X: (N, 2), y: (N,)."""

    epochs: np.ndarray
    labels: np.ndarray
    extent: tuple[float, float, float, float]
    X: np.ndarray
    y: np.ndarray
    curve: pd.DataFrame      # the per-epoch history (metrics.csv or the trial's curve)
    title: str

    def frame_at(self, epoch: int) -> int:
        """The index of the last snapshot taken at or before ``epoch``."""
        return max(0, int(np.searchsorted(self.epochs, epoch, side="right")) - 1)


def read_snapshots(path: Path) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The (epoch, parameters) frames of a snapshots .npz file; NotDrawableError if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            frames = read_snapshot_arrays(data)
    except (OSError, ValueError) as exc:
        raise NotDrawableError(f"{path}: not a snapshots file ({exc})") from None
    if not frames:
        raise NotDrawableError(f"{path}: holds no snapshots")
    return frames


def region_labels(net: Network, snapshots, X: np.ndarray, resolution: int, margin: float
                  ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The class ``net`` predicts over the grid covering X with each snapshot's parameters,
    one forward pass over the whole grid per snapshot. -> labels: (S, R, R) uint8, extent."""
    xs, ys = grid_axes(X, resolution, margin)
    gx, gy = np.meshgrid(xs, ys)
    points = np.c_[gx.ravel(), gy.ravel()]
    params = net.params
    labels = np.empty((len(snapshots), len(ys), len(xs)), dtype=np.uint8)
    for i, (_, values) in enumerate(snapshots):
        for name, target in params.items():
            target[...] = values[name]
        labels[i] = net.predict(points, batch_size=len(points)).reshape(len(ys), len(xs))
    return labels, (float(xs[0]), float(xs[-1]), float(ys[0]), float(ys[-1]))


def make_movie(model: Path, snapshots: Path, curve: pd.DataFrame, title: str, resolution: int,
               margin: float) -> Movie:
    net = load_model(model)
    check_2d(net)
    frames = read_snapshots(snapshots)
    X, y = training_points(net)
    labels, extent = region_labels(net, frames, X, resolution, margin)
    return Movie(np.array([e for e, _ in frames]), labels, extent, X, y, curve, title)


def frame_epochs(movies: list[Movie], max_frames: int) -> np.ndarray:
    """The epochs to show: every snapshot epoch of any panel, thinned evenly to
    ``max_frames`` (the first and the last kept)."""
    epochs = np.unique(np.concatenate([m.epochs for m in movies]))
    if len(epochs) > max_frames:
        epochs = epochs[np.unique(np.linspace(0, len(epochs) - 1, max_frames).round().astype(int))]
    return epochs


# ---- drawing ------------------------------------------------------------------
def region_cmap(num_classes: int) -> ListedColormap:
    """The light class colours of ``plots.draw_regions``: class k is one colour in every frame."""
    return ListedColormap([tuple(0.55 + 0.45 * c for c in to_rgb(colour(k))) for k in range(num_classes)])


class RegionPanel:
    """The artists of one region panel; ``show(epoch)`` swaps in that epoch's frame.
    ``animated``: the artists a frame redraws (the regions, the points on top of them,
    the frame around them, the line under the title that says the loss), in drawing
    order. The points are markers of one line per class rather than a scatter: a
    scatter recomputes every marker's extent at each draw (a quarter of the time)."""

    def __init__(self, ax, movie: Movie, num_classes: int, with_loss: bool):
        self.movie = movie
        self.image = ax.imshow(movie.labels[0], origin="lower", extent=movie.extent, aspect="auto",
                               cmap=region_cmap(num_classes), vmin=-0.5, vmax=num_classes - 0.5,
                               interpolation="nearest")
        points = [ax.plot(movie.X[movie.y == k, 0], movie.X[movie.y == k, 1], "o", markersize=3.2,
                          color=colour(k), markeredgecolor="black", markeredgewidth=0.4)[0]
                  for k in range(num_classes)]
        ax.set_xlim(movie.extent[:2])
        ax.set_ylim(movie.extent[2:])
        ax.set_xticks([])
        ax.set_yticks([])
        # Two title lines, the second (the loss) redrawn; laid out with room for both.
        ax.set_title(movie.title + ("\n " if with_loss else ""), fontsize=8)
        self.loss = ax.text(0.5, 1.02, "", transform=ax.transAxes, ha="center", va="bottom",
                            fontsize=8) if with_loss else None
        self.animated = [self.image, *points, *ax.spines.values()] + ([self.loss] if with_loss else [])

    def show(self, epoch: int) -> None:
        self.image.set_data(self.movie.labels[self.movie.frame_at(epoch)])
        if self.loss is not None:
            done = self.movie.curve[self.movie.curve["epoch"] <= epoch]
            self.loss.set_text(f"loss {done['train_loss'].iloc[-1]:.3f}" if len(done) else "untrained")


class LossPanel:
    """Train and validation loss up to the current epoch, on axes fixed to the whole run."""

    def __init__(self, ax, curve: pd.DataFrame):
        self.curve = curve
        self.lines = {}
        for split, style in SPLIT_STYLES.items():
            column = f"{split}_loss"
            if column in curve and curve[column].notna().any():
                self.lines[column], = ax.plot([], [], style, color=SPLIT_COLOURS[split],
                                              label=SPLIT_NAMES[split], gid=column)
        self.cursor = ax.axvline(0, color="grey", linewidth=0.8)
        scale = loss_scale([curve])
        ax.set_yscale(scale)
        values = curve[list(self.lines)].to_numpy(dtype=float)
        finite = values[np.isfinite(values) & (values > 0)]
        if finite.size:
            low, high = finite.min(), finite.max()
            if scale == "log":
                ax.set_ylim(low / 1.2, high * 1.2)
            else:
                ax.set_ylim(max(0.0, low - 0.05 * (high - low)), high + 0.05 * (high - low))
        ax.set_xlim(0, max(1, int(curve["epoch"].max())) if len(curve) else 1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(True, linewidth=0.3, alpha=0.5)
        self.animated = [*self.lines.values(), self.cursor]

    def show(self, epoch: int) -> None:
        done = self.curve[self.curve["epoch"] <= epoch]
        for column, line in self.lines.items():
            line.set_data(done["epoch"].to_numpy(), done[column].to_numpy())
        self.cursor.set_xdata([epoch, epoch])


class FrameRenderer:
    """Frames of ``fig`` as RGB arrays, redrawing only what changes (blitting): the
    layout is computed and the still artists drawn once; each frame restores that
    background and draws the ``animated`` artists over it."""

    def __init__(self, fig: Figure, animated: list):
        for artist in animated:
            artist.set_animated(True)
        self.fig, self.animated = fig, animated
        self.canvas = FigureCanvasAgg(fig)
        fig.set_dpi(FRAME_DPI)
        self.canvas.draw()                      # lays out and draws the still artists
        fig.set_layout_engine("none")           # freeze the layout for every frame
        self.background = self.canvas.copy_from_bbox(fig.bbox)

    def render(self) -> np.ndarray:
        """The figure as it is now. -> (H, W, 3) uint8."""
        self.canvas.restore_region(self.background)
        for artist in self.animated:
            self.fig.draw_artist(artist)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


# ---- writing --------------------------------------------------------------------
def check_animation_path(path) -> str:
    """The format of ``path`` (gif or mp4); WrongKindError for another extension,
    NotDrawableError for an .mp4 without ffmpeg."""
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in ANIMATION_FORMATS:
        raise WrongKindError(f"{path}: an animation is a .gif or an .mp4 file")
    if fmt == "mp4" and ffmpeg() is None:
        raise NotDrawableError("writing an .mp4 needs ffmpeg, which is not installed here; "
                               "install it or write a .gif")
    return fmt


def ffmpeg() -> str | None:
    return shutil.which(matplotlib.rcParams["animation.ffmpeg_path"])


def write_movie(fig: Figure, animated: list, path: Path, epochs: np.ndarray, show, fps: int) -> None:
    """One frame per epoch of ``epochs`` (``show(epoch)`` updates the artists) into
    ``path``, a GIF (Pillow) or an MP4 (H.264 by ffmpeg), written to a temporary file in
    the same folder and renamed, so the file appears whole or not at all."""
    path = Path(path)
    fmt = check_animation_path(path)
    renderer = FrameRenderer(fig, animated)

    def frame_at(epoch) -> np.ndarray:
        show(int(epoch))
        return renderer.render()

    with output_file(path) as tmp:
        (write_gif if fmt == "gif" else write_mp4)(tmp, frame_at, epochs, fps)


PALETTE_SAMPLES = 5


def pack(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) uint32 0xRRGGBB, one number per colour."""
    pixels = pixels.astype(np.uint32)
    return (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]


# The GIF palette's last entry is the transparent "as in the frame before".
UNCHANGED = 255


def gif_palette(frames: list[np.ndarray]) -> np.ndarray:
    """The 255 colours most frequent in ``frames`` (H, W, 3): the flat colours (white,
    the regions, the points, text) exactly, the rarer shades of anti-aliased edges
    left to the nearest of them. -> (255, 3) uint8."""
    colours, counts = np.unique(np.concatenate([pack(f).ravel() for f in frames]), return_counts=True)
    top = colours[np.argsort(counts, kind="stable")[::-1][:UNCHANGED]]
    rgb = np.stack([(top >> 16) & 255, (top >> 8) & 255, top & 255], axis=1).astype(np.uint8)
    return np.resize(rgb, (UNCHANGED, 3))


class Quantizer:
    """Frames (H, W, 3) to palette indices (H, W) of one palette (<= 255, 3): each colour its
    nearest palette entry, exact where it is one, no dithering, so flat stays flat.
    Pillow's own quantize(palette=) rounds colours to a coarse cube first (white came
    out 252, 252, 252), hence the search here. Each colour is looked up in a table of
    all 2**24 (32 MB while a GIF is written), filled in as colours first appear: the
    anti-aliased shades of the still text and lines recur in every frame."""

    def __init__(self, palette: np.ndarray):
        self.palette = palette
        self.table = np.full(1 << 24, -1, dtype=np.int16)     # packed colour -> palette index

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        packed = pack(frame).ravel()
        index = self.table[packed]
        unknown = index < 0
        if unknown.any():
            self.learn(np.unique(packed[unknown]))
            index = self.table[packed]
        return index.astype(np.uint8).reshape(frame.shape[:2])

    def learn(self, colours: np.ndarray) -> None:
        """Enter packed ``colours`` with the index of their nearest palette entry."""
        rgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=1)
        distance = ((rgb[:, None, :].astype(np.int32) - self.palette[None].astype(np.int32)) ** 2).sum(axis=2)
        self.table[colours] = distance.argmin(axis=1)


def write_gif(path: str, frame_at, epochs: np.ndarray, fps: int) -> None:
    """The frames ``frame_at(epoch)`` -> (H, W, 3) uint8 as a looping GIF. Every frame
    uses one palette (``gif_palette`` of a few frames spread over the run: the colours
    do not change, only where they are), and each pixel that is as in the frame before
    is written as the transparent UNCHANGED (frames are drawn over the one before), so
    the still parts compress to nearly nothing: 16 panels, 200 frames took 12.8 MB
    with whole frames, 1.1 MB so."""
    from PIL import Image
    samples = epochs[np.linspace(0, len(epochs) - 1, min(PALETTE_SAMPLES, len(epochs))).round().astype(int)]
    quantize = Quantizer(gif_palette([frame_at(e) for e in samples]))
    palette = np.concatenate([quantize.palette, np.full((1, 3), 255, np.uint8)]).ravel().tolist()

    def frames():
        before = None
        for epoch in epochs:
            index = quantize(frame_at(epoch))
            changes = index.copy()
            if before is not None:
                changes[index == before] = UNCHANGED
            before = index
            image = Image.fromarray(changes, mode="P")
            image.putpalette(palette)
            yield image

    images = frames()
    next(images).save(path, format="GIF", save_all=True, append_images=images, duration=round(1000 / fps),
                      loop=0, transparency=UNCHANGED, disposal=1, optimize=False)


def write_mp4(path: str, frame_at, epochs: np.ndarray, fps: int) -> None:
    """The frames ``frame_at(epoch)`` -> (H, W, 3) uint8, H and W even, as H.264 in
    yuv420p (what browsers and players expect), piped raw to ffmpeg."""
    first = frame_at(epochs[0])
    height, width, _ = first.shape
    command = [ffmpeg(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264",
               "-pix_fmt", "yuv420p", "-f", "mp4", path]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(first.tobytes())
        for epoch in epochs[1:]:
            proc.stdin.write(frame_at(epoch).tobytes())
        proc.stdin.close()
    except BrokenPipeError:       # ffmpeg stopped early; its message says why
        pass
    message = proc.stderr.read().decode(errors="replace").strip().splitlines()
    if proc.wait() != 0:
        raise NotDrawableError("ffmpeg could not write the .mp4: "
                               f"{message[-1] if message else f'exit code {proc.returncode}'}")


def even_size(fig: Figure) -> None:
    """Make the frame's pixel size even: H.264 in yuv420p needs even width and height."""
    w, h = fig.get_size_inches() * FRAME_DPI
    fig.set_size_inches((2 * round(w / 2)) / FRAME_DPI, (2 * round(h / 2)) / FRAME_DPI)


# ---- runs and sweeps -------------------------------------------------------------
def animate_run(run_dir, path, resolution: int = RESOLUTION, margin: float = 0.1,
                fps: int = DEFAULT_FPS, max_frames: int = MAX_FRAMES) -> Path:
    """A run's decision regions at every snapshot beside its loss curve up to that epoch."""
    run_dir = check_dir(run_dir, "run")
    check_animation_path(path)
    record = read_run_record(run_dir)
    config = record.get("config") or {}
    if config.get("data") == "cifar10" or config.get("arch"):
        raise WrongKindError(f"{run_dir} trained on {config.get('data')} images; an animation shows "
                             "the decision regions of a network of 2D points")
    check_2d(load_model(run_dir))
    if not (run_dir / SNAPSHOTS).is_file():
        raise NotDrawableError(f"{run_dir} has no {SNAPSHOTS}: train it with --snapshot-every N "
                               "(e.g. 10) to keep the frames of an animation")
    curve = read_curve(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() \
        else pd.DataFrame({"epoch": [], "train_loss": []})
    from experiments.config import format_hidden
    title = (f"{config.get('data')} hidden={format_hidden(config.get('hidden'))} "
             f"reg={config.get('reg')}")
    movie = make_movie(run_dir, run_dir / SNAPSHOTS, curve, "decision regions, training points",
                       resolution, margin)
    fig = Figure(figsize=(9.6, 4.3), layout="constrained")
    ax_regions, ax_loss = fig.subplots(1, 2, width_ratios=[1.0, 1.25])
    regions = RegionPanel(ax_regions, movie, 1 + int(movie.y.max()), with_loss=False)
    loss = LossPanel(ax_loss, curve)
    heading = fig.suptitle(f"{title}: epoch {movie.epochs[-1]}")
    even_size(fig)

    def show(epoch: int) -> None:
        regions.show(epoch)
        loss.show(epoch)
        heading.set_text(f"{title}: epoch {epoch}")

    write_movie(fig, [*regions.animated, *loss.animated, heading], Path(path),
                frame_epochs([movie], max_frames), show, fps)
    return Path(path)


def animate_sweep(sweep_dir, path, rows: str | None = None, cols: str | None = None,
                  seed: str | None = None, where: dict[str, str] | None = None,
                  resolution: int = RESOLUTION, margin: float = 0.1, fps: int = DEFAULT_FPS,
                  max_frames: int = MAX_FRAMES) -> Path:
    """One seed's configurations side by side (rows and columns as ``plot-boundary``),
    each panel's regions at every snapshot, its loss at that epoch in its title."""
    sweep_dir = check_dir(sweep_dir, "sweep")
    check_animation_path(path)
    results = read_results(sweep_dir)
    if (results["data"] == "cifar10").any():
        raise WrongKindError(f"{sweep_dir} trained on cifar10 images; an animation shows the "
                             "decision regions of networks of 2D points")
    chosen, rows, cols = select_trials(results, rows, cols, seed, where)
    grid = trial_grid(chosen, rows, cols)
    missing = [t["trial_key"] for line in grid for t in line
               if t is not None and not (sweep_dir / "snapshots" / f"{t['trial_key']}.npz").is_file()]
    if missing:
        raise NotDrawableError(f"{sweep_dir}: {len(missing)} trial(s) kept no snapshots; run the "
                               "sweep with --snapshot-every N (e.g. 10) to keep the frames")
    movies = [[None if t is None else make_movie(
                   sweep_dir / "models" / f"{t['trial_key']}.npz",
                   sweep_dir / "snapshots" / f"{t['trial_key']}.npz",
                   read_curve(sweep_dir / "curves" / f"{t['trial_key']}.csv"),
                   cell_label([(rows, t.get(rows)), (cols, t.get(cols))], "every trial alike"),
                   resolution, margin)
               for t in line] for line in grid]
    present = [m for line in movies for m in line if m is not None]
    num_classes = 1 + max(int(m.y.max()) for m in present)
    n_rows, n_cols = len(movies), len(movies[0])
    fig = Figure(figsize=(2.4 * n_cols, 2.5 * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    panels = []
    for i, line in enumerate(movies):
        for j, movie in enumerate(line):
            if movie is None:
                axes[i, j].set_axis_off()
                axes[i, j].text(0.5, 0.5, "no trial", ha="center", transform=axes[i, j].transAxes)
            else:
                panels.append(RegionPanel(axes[i, j], movie, num_classes, with_loss=True))
    data = chosen["data"].iloc[0]
    seeds = "" if "seed" in (rows, cols) else f", seed {chosen['seed'].iloc[0]}"
    epochs = frame_epochs(present, max_frames)
    heading = fig.suptitle(f"{data}{seeds}: epoch {epochs[-1]}")
    even_size(fig)

    def show(epoch: int) -> None:
        for panel in panels:
            panel.show(epoch)
        heading.set_text(f"{data}{seeds}: epoch {epoch}")

    write_movie(fig, [a for panel in panels for a in panel.animated] + [heading], Path(path),
                epochs, show, fps)
    return Path(path)
