"""CIFAR-10: download, verify, load, split, normalise and augment.

Files live in ``DATA_DIR/cifar-10-batches-py`` exactly as the official
``cifar-10-python.tar.gz`` unpacks. Images are kept NCHW: x: (N, 3, 32, 32),
uint8 on disk and in ``CIFAR10``, float32 once normalised in ``Split``.
Nothing here prints: downloads report through a ``progress`` callback.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

# one error type for every data set (missing, corrupt, or cannot be fetched), so that
# `nnx train` and `nnx evaluate` turn any of them into a one-line message
from experiments.datasets import Dataset, stratified_split
from experiments.errors import ConfigError, DataError

try:                                    # NumPy 2 moved it; pickles may name either module
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
EXPECTED_FILES = (*TRAIN_FILES, TEST_FILE, META_FILE)
MARKER = ".nnx-verified"        # written last, so its presence means the copy is whole
IMAGE_SHAPE = (3, 32, 32)
CHUNK = 1 << 16

Progress = Callable[[int, "int | None"], None]


def default_data_dir() -> Path:
    """``$NNX_DATA_DIR`` if set, else ``~/.cache/nnx``."""
    env = os.environ.get("NNX_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nnx"


def _download_hint(data_dir: Path) -> str:
    return f"run `nnx data download cifar10 --data-dir {data_dir}`"


# ---- download ---------------------------------------------------------------------
def is_verified(data_dir: str | Path, md5: str = CIFAR10_MD5) -> bool:
    """Whether ``data_dir`` holds a copy extracted from an archive with this ``md5``,
    with every expected file still present at the size it had when extracted."""
    batches = Path(data_dir) / BATCHES_DIR
    try:
        marker = json.loads((batches / MARKER).read_text())
        return (marker["md5"] == md5.lower()
                and all((batches / name).stat().st_size == marker["sizes"][name]
                        for name in EXPECTED_FILES))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def download_cifar10(data_dir: str | Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5,
                     progress: Progress | None = None) -> Path:
    """Fetch, verify and extract CIFAR-10 into ``data_dir``; return the batches directory.

    A no-op when ``is_verified``. Otherwise all work happens in a temporary
    directory inside ``data_dir`` (removed whatever happens) and the extracted
    batches are renamed into place only once complete, so an interrupted or
    refused download never leaves a partial copy. ``progress(done, total)`` is
    called per chunk; ``total`` is None when the server does not say.
    """
    data_dir = Path(data_dir)
    target = data_dir / BATCHES_DIR
    if is_verified(data_dir, md5):
        return target
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {data_dir}: {exc.strerror or exc}") from None
    for stale in data_dir.glob(".nnx-download-*"):   # left by a download that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".nnx-download-") as tmp:
        tmp = Path(tmp)
        archive = tmp / "cifar-10-python.tar.gz"
        digest = _fetch(url, archive, progress)
        if digest != md5.lower():
            raise DataError(f"download from {url} is corrupt (MD5 {digest}, expected {md5.lower()}); "
                            "nothing was kept, try again")
        extracted = _extract(archive, tmp / "extracted", url) / BATCHES_DIR
        _write_marker(extracted, md5)
        _move_into_place(extracted, target, tmp)
    return target


def _fetch(url: str, dest: Path, progress: Progress | None) -> str:
    """Stream ``url`` to ``dest``; return the MD5 hex digest of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except urllib.error.HTTPError as exc:
        raise DataError(f"could not download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"could not download {url}: {exc.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # ValueError: a malformed URL; HTTPException: e.g. the connection closed mid-body
        raise DataError(f"could not download {url}: {exc or type(exc).__name__}") from None
    if total is not None and done != total:
        raise DataError(f"download from {url} was cut short ({done} of {total} bytes); try again")
    return digest.hexdigest()


def _extract(archive: Path, dest: Path, url: str) -> Path:
    """Extract the members under ``cifar-10-batches-py/`` into ``dest``, refusing
    anything that could land outside it (absolute paths, ``..``, links, devices)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if _is_batches_member(m, url)]
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kwargs)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"archive from {url} cannot be extracted ({exc}); "
                        "nothing was kept") from None
    missing = [name for name in EXPECTED_FILES if not (dest / BATCHES_DIR / name).is_file()]
    if missing:
        raise DataError(f"archive from {url} lacks {BATCHES_DIR}/{missing[0]}; nothing was kept")
    return dest


def _is_batches_member(member: tarfile.TarInfo, url: str) -> bool:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
        raise DataError(f"archive from {url} has an unsafe member {member.name!r}; nothing was kept")
    return path.parts[:1] == (BATCHES_DIR,)


def _write_marker(batches: Path, md5: str) -> None:
    sizes = {name: (batches / name).stat().st_size for name in EXPECTED_FILES}
    (batches / MARKER).write_text(json.dumps({"md5": md5.lower(), "sizes": sizes}))


def _move_into_place(new: Path, target: Path, tmp: Path) -> None:
    """Rename ``new`` to ``target``; an older copy is first moved into ``tmp`` (and
    dies with it), because a directory cannot be renamed over a non-empty one."""
    if target.exists() or target.is_symlink():
        os.replace(target, tmp / "previous")
    os.replace(new, target)


# ---- load ---------------------------------------------------------------------------
@dataclass
class CIFAR10:
    """The official batches as read. X_*: (N, 3, 32, 32) uint8, y_*: (N,) int64."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only plain containers and NumPy arrays, so a tampered batch file
    fails to load instead of running whatever its pickle names."""

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _read_pickle(path: Path, data_dir: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR-10 not found in {path.parent} ({path.name} is missing): "
                        f"{_download_hint(data_dir)}")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any failure to parse means the file is damaged
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise _corrupt(path, f"holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(f"{path} is corrupt ({why}): delete it and run `nnx data download cifar10 "
                     f"--data-dir {path.parent.parent}`")


def _read_batch(path: Path, data_dir: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (x: (N, 3, 32, 32) uint8, y: (N,) int64), checked."""
    batch = _read_pickle(path, data_dir)
    if "data" not in batch or "labels" not in batch:
        raise _corrupt(path, "no data or labels")
    data, labels = batch["data"], np.asarray(batch["labels"])
    size = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != size:
        shape = getattr(data, "shape", None)
        raise _corrupt(path, f"data is {getattr(data, 'dtype', type(data).__name__)} {shape}, "
                             f"expected uint8 (N, {size})")
    if labels.shape != (len(data),) or (labels.size and labels.dtype.kind not in "iu"):
        raise _corrupt(path, f"{labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(path, f"labels outside 0..{num_classes - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def _read_class_names(data_dir: Path) -> list[str]:
    path = data_dir / BATCHES_DIR / META_FILE
    names = _read_pickle(path, data_dir).get("label_names")
    if not isinstance(names, list) or not names \
            or not all(isinstance(n, (bytes, str)) for n in names):
        raise _corrupt(path, "no list of label_names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def load_cifar10(data_dir: str | Path) -> CIFAR10:
    """Read ``data_dir/cifar-10-batches-py``: the five training batches in order,
    the test batch and the class names. Raises DataError naming the fix."""
    data_dir = Path(data_dir)
    batches = data_dir / BATCHES_DIR
    if not batches.is_dir():
        raise DataError(f"CIFAR-10 not found in {batches}: {_download_hint(data_dir)}")
    class_names = _read_class_names(data_dir)
    train = [_read_batch(batches / name, data_dir, len(class_names)) for name in TRAIN_FILES]
    X_test, y_test = _read_batch(batches / TEST_FILE, data_dir, len(class_names))
    return CIFAR10(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   X_test, y_test, class_names)


# ---- split and normalise --------------------------------------------------------------
@dataclass
class Split:
    """Arrays ready for training. X_*: (N, 3, 32, 32) float32, normalised per channel
    with ``mean``/``std``: (3,) float32 measured on X_train only; y_*: (N,) int64."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    class_names: list[str]


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of images: (N, C, H, W) uint8 -> two (C,) float32.

    Counted from a 256-bin histogram per channel: exact, and no float copy of the
    whole set. A constant channel gets std 1 so normalising leaves its scale alone.
    """
    if images.dtype != np.uint8:
        raise TypeError(f"channel_stats takes uint8 images, not {images.dtype}")
    values = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256)
        m = counts @ values / counts.sum()
        mean.append(m)
        std.append(np.sqrt(counts @ (values - m) ** 2 / counts.sum()))
    std = np.asarray(std)
    return np.asarray(mean, np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """(images - mean) / std per channel. images: (N, C, H, W); mean, std: (C,) -> float32."""
    mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    if mean.size != images.shape[1] or std.size != images.shape[1]:
        raise ValueError(f"mean/std have {mean.size}/{std.size} channels, images {images.shape[1]}")
    out = images.astype(np.float32)     # in-place below: no second full-size temporary
    out -= mean
    out /= std
    return out


def split_and_normalize(data: CIFAR10, val_size: int | float = 5000, seed: int = 0,
                        limit: int | None = None) -> Split:
    """Carve ``val_size`` validation images (a count or a fraction) out of the training
    batches, each class in proportion (``stratified_split`` with ``seed``),
    keep the first ``limit`` of the remaining training images (batch order), and
    normalise train, validation and test with the training split's statistics.

    The validation set does not depend on ``limit``, so quick runs are scored on
    the same images as full ones.
    """
    if limit is not None and limit < 1:
        raise ConfigError("limit", f"must be at least 1, not {limit}")
    is_val = stratified_split(data.y_train, val_size, seed)
    train_idx = np.flatnonzero(~is_val)[:limit]
    X_train = data.X_train[train_idx]
    mean, std = channel_stats(X_train)
    return Split(normalize(X_train, mean, std), data.y_train[train_idx],
                 normalize(data.X_train[is_val], mean, std), data.y_train[is_val],
                 normalize(data.X_test, mean, std), data.y_test.copy(),
                 mean, std, list(data.class_names))


def load_cifar10_split(data_dir: str | Path | None = None, val_size: int | float = 5000,
                       seed: int = 0, limit: int | None = None) -> Split:
    """``load_cifar10`` then ``split_and_normalize``; ``data_dir`` defaults to ``default_data_dir()``."""
    data = load_cifar10(default_data_dir() if data_dir is None else data_dir)
    return split_and_normalize(data, val_size, seed, limit)


def load_cifar10_dataset(config):
    """The ``experiments.datasets.Dataset`` a resolved TrainConfig with data cifar10 asks for;
    its metadata carries ``mean``/``std`` so they are saved with the model."""
    s = load_cifar10_split(config.data_dir, config.val_size, config.data_seed, config.limit)
    return Dataset("cifar10", s.X_train, s.y_train, s.X_val, s.y_val, len(s.class_names),
                   s.class_names, s.X_test, s.y_test,
                   metadata={"kind": "image", "mean": s.mean.tolist(), "std": s.std.tolist()})


# ---- augmentation --------------------------------------------------------------------
FLIPS = ("random", "alternating")
PADS = ("zero", "reflect")


@dataclass(frozen=True)
class FlipShift:
    """Training augmentation: left-right flips and shifts of up to ``shift`` pixels.

    flip: "random" mirrors each image with p = 0.5, drawn anew every epoch (the
    ConvNetJS demo's); "alternating" is airbench's derandomised flip: a random
    half of the images (fixed by ``seed``) is mirrored in even epochs and the
    other half in odd ones, so every image is seen both ways every two epochs.
    pad: the fill of the pixels a shift uncovers, "zero" or "reflect" (the
    mirror image of the border, as airbench pads). Each image's shift in y and
    x is uniform in [-shift, shift], drawn from the epoch's ``rng``.
    """

    flip: str = "random"
    pad: str = "zero"
    shift: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.flip not in FLIPS or self.pad not in PADS or self.shift < 0:
            raise ValueError(f"flip must be one of {FLIPS}, pad one of {PADS} and shift >= 0")

    def __call__(self, xb: np.ndarray, rng: np.random.Generator, *, epoch: int = 0,
                 index: np.ndarray | None = None) -> np.ndarray:
        """xb: (N, C, H, W), rows ``index`` of the training set -> a new array, same shape
        and dtype; xb is not modified."""
        n, _, h, w = xb.shape
        if self.flip == "alternating":
            index = np.arange(n) if index is None else np.asarray(index)
            flip = _half(self.seed, index) ^ bool(epoch % 2)
        else:
            flip = rng.random(n) < 0.5
        oy = rng.integers(0, 2 * self.shift + 1, size=n)
        ox = rng.integers(0, 2 * self.shift + 1, size=n)
        flipped = np.where(flip[:, None, None, None], xb[..., ::-1], xb)
        if self.shift == 0:
            return flipped
        p = self.shift
        padded = np.pad(flipped, ((0, 0), (0, 0), (p, p), (p, p)),
                        mode="constant" if self.pad == "zero" else "reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))
        # windows: (N, C, 2p+1, 2p+1, H, W); one (oy, ox) per image gives (N, C, H, W)
        return windows[np.arange(n), :, oy, ox]


def _half(seed: int, index: np.ndarray) -> np.ndarray:
    """A fixed random half of the examples (True for about half of them), by example:
    a hash of (seed, example index), so it does not depend on how batches are cut."""
    salt = np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)     # splitmix64's constants
    mixed = index.astype(np.uint64) + salt               # array arithmetic wraps mod 2**64
    mixed ^= mixed >> np.uint64(31)
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    mixed ^= mixed >> np.uint64(29)
    return (mixed & np.uint64(1)).astype(bool)
