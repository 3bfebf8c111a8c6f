"""CIFAR-10 pipeline: download over loopback, load, split, normalise, augment, CLI.

Every test builds its own tiny archive in the official layout; only the last one
reads the real data set, and skips when /work/shared is not there.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import typer
from helpers import PER_BATCH, make_batches, write_batches
from typer.testing import CliRunner

from cli.data import data_app
from experiments.cifar10 import (
    BATCHES_DIR,
    CIFAR10,
    CLASSES,
    DataError,
    FlipShift,
    channel_stats,
    default_data_dir,
    download_cifar10,
    is_verified,
    load_cifar10,
    normalize,
    split_and_normalize,
)
from experiments.datasets import stratified_split
from experiments.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def make_archive(files: dict[str, bytes]) -> bytes:
    """A .tar.gz of ``files`` (archive path -> content), directories implied."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folder = tarfile.TarInfo(BATCHES_DIR)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def batches():
    return make_batches()


@pytest.fixture(scope="module")
def archive(batches):
    return make_archive({f"{BATCHES_DIR}/{name}": pickle.dumps(obj, protocol=2)
                         for name, obj in batches.items()})


# ---- a loopback HTTP server --------------------------------------------------------------
class Server:
    """Serves ``routes`` (path -> bytes) on 127.0.0.1 and counts the requests per path.
    A route whose value is a tuple (content, claimed_length) lies about its length."""

    def __init__(self):
        self.routes: dict[str, bytes | tuple[bytes, int]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                content, length = body if isinstance(body, tuple) else (body, len(body))
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str, content) -> str:
        self.routes[path] = content
        return self.base + path


@pytest.fixture(scope="module")
def server():
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    thread.join(timeout=5)


def closed_port_url() -> str:
    """A loopback URL nobody listens on: the port was just bound and released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def assert_left_clean(data_dir: Path):
    """Nothing but what was there before: no temp files, no partial batches folder."""
    assert not data_dir.exists() or list(data_dir.iterdir()) == []


# ---- download ----------------------------------------------------------------------------
def test_download_verifies_extracts_and_reports_progress(tmp_path, server, archive, batches):
    url = server.url("/ok.tar.gz", archive)
    seen = []
    path = download_cifar10(tmp_path / "data", url=url, md5=md5(archive),
                            progress=lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "data" / BATCHES_DIR
    for name, obj in batches.items():
        assert (path / name).read_bytes() == pickle.dumps(obj, protocol=2)
    assert is_verified(tmp_path / "data", md5(archive))
    assert seen[-1] == (len(archive), len(archive))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # only the batches folder remains: the archive and the temp dir are gone
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [BATCHES_DIR]


def test_second_download_is_a_no_op(tmp_path, server, archive):
    url = server.url("/again.tar.gz", archive)
    download_cifar10(tmp_path, url=url, md5=md5(archive))
    download_cifar10(tmp_path, url=url, md5=md5(archive))
    assert server.requests.count("/again.tar.gz") == 1


def test_a_damaged_copy_is_downloaded_again(tmp_path, server, archive):
    url = server.url("/repair.tar.gz", archive)
    path = download_cifar10(tmp_path, url=url, md5=md5(archive))
    (path / "data_batch_2").unlink()
    assert not is_verified(tmp_path, md5(archive))
    download_cifar10(tmp_path, url=url, md5=md5(archive))
    assert server.requests.count("/repair.tar.gz") == 2
    assert (path / "data_batch_2").is_file()


def test_wrong_bytes_are_refused_and_nothing_is_kept(tmp_path, server, archive):
    damaged = bytearray(archive)
    damaged[len(damaged) // 2] ^= 0xFF
    url = server.url("/damaged.tar.gz", bytes(damaged))
    with pytest.raises(DataError, match="corrupt.*MD5"):
        download_cifar10(tmp_path / "data", url=url, md5=md5(archive))
    assert_left_clean(tmp_path / "data")


def test_wrong_md5_is_refused_and_keeps_an_older_copy(tmp_path, server, archive):
    url = server.url("/good.tar.gz", archive)
    path = download_cifar10(tmp_path, url=url, md5=md5(archive))
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(DataError, match="corrupt"):
        download_cifar10(tmp_path, url=url, md5="0" * 32)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [BATCHES_DIR]


def test_a_cut_short_download_is_refused(tmp_path, server, archive):
    url = server.url("/short.tar.gz", (archive[:100], len(archive)))
    with pytest.raises(DataError, match="short|could not download"):
        download_cifar10(tmp_path / "data", url=url, md5=md5(archive))
    assert_left_clean(tmp_path / "data")


def test_unsafe_archive_members_are_refused(tmp_path, server, batches):
    files = {f"{BATCHES_DIR}/{name}": pickle.dumps(obj) for name, obj in batches.items()}
    evil = make_archive({**files, f"{BATCHES_DIR}/../../escaped": b"boo"})
    url = server.url("/evil.tar.gz", evil)
    with pytest.raises(DataError, match="unsafe member"):
        download_cifar10(tmp_path / "data", url=url, md5=md5(evil))
    assert_left_clean(tmp_path / "data")
    assert not (tmp_path / "escaped").exists()


def test_archive_without_every_batch_is_refused(tmp_path, server, batches):
    partial = make_archive({f"{BATCHES_DIR}/{name}": pickle.dumps(obj)
                            for name, obj in batches.items() if name != "test_batch"})
    url = server.url("/partial.tar.gz", partial)
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/test_batch"):
        download_cifar10(tmp_path / "data", url=url, md5=md5(partial))
    assert_left_clean(tmp_path / "data")


@pytest.mark.parametrize("where", ["closed port", "not a url"])
def test_network_errors_name_the_url(tmp_path, where):
    url = closed_port_url() if where == "closed port" else "not a url"
    with pytest.raises(DataError, match="could not download") as err:
        download_cifar10(tmp_path / "data", url=url)
    assert url in str(err.value)
    assert_left_clean(tmp_path / "data")


def test_http_errors_name_the_status(tmp_path, server):
    with pytest.raises(DataError, match="HTTP 404"):
        download_cifar10(tmp_path, url=server.base + "/missing.tar.gz")


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NNX_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("NNX_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "nnx"


# ---- CLI ---------------------------------------------------------------------------------
@pytest.fixture
def cli():
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    return lambda *args: CliRunner().invoke(app, ["data", "download", *args])


def test_cli_downloads_then_reports_a_verified_copy(tmp_path, server, cli, archive):
    url = server.url("/cli.tar.gz", archive)
    args = ("cifar10", "--data-dir", str(tmp_path), "--url", url, "--md5", md5(archive))
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert str(tmp_path / BATCHES_DIR) in first.stdout
    assert "downloaded" in first.stdout
    second = cli(*args)
    assert second.exit_code == 0, second.output
    assert "already present and verified" in second.stdout
    assert server.requests.count("/cli.tar.gz") == 1


def test_cli_reads_the_data_dir_from_the_environment(tmp_path, server, cli, archive, monkeypatch):
    monkeypatch.setenv("NNX_DATA_DIR", str(tmp_path))
    result = cli("cifar10", "--url", server.url("/env.tar.gz", archive), "--md5", md5(archive))
    assert result.exit_code == 0, result.output
    assert (tmp_path / BATCHES_DIR / "data_batch_1").is_file()


@pytest.mark.parametrize("case", ["bad md5", "unreachable"])
def test_cli_errors_are_one_red_line_with_exit_1(tmp_path, server, cli, archive, case):
    if case == "bad md5":   # the real CIFAR-10 MD5 against the tiny archive
        result = cli("cifar10", "--data-dir", str(tmp_path), "--url", server.url("/x.tar.gz", archive))
    else:
        result = cli("cifar10", "--data-dir", str(tmp_path), "--url", closed_port_url())
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_unknown_data_sets(tmp_path, cli):
    result = cli("mnist", "--data-dir", str(tmp_path))
    assert result.exit_code == 2
    assert "unknown data set 'mnist'" in result.output


# ---- loading -----------------------------------------------------------------------------
def test_load_round_trips_shapes_dtypes_and_labels(tmp_path, batches):
    write_batches(tmp_path, batches)
    data = load_cifar10(tmp_path)
    assert data.X_train.shape == (5 * PER_BATCH, 3, 32, 32) and data.X_train.dtype == np.uint8
    assert data.X_test.shape == (PER_BATCH, 3, 32, 32) and data.X_test.dtype == np.uint8
    assert data.y_train.dtype == data.y_test.dtype == np.int64
    assert data.class_names == list(CLASSES)
    # rows are channel-major: R plane, G plane, B plane, each 32x32 row-major
    first = batches["data_batch_1"][b"data"][0]
    assert np.array_equal(data.X_train[0, 1], first[1024:2048].reshape(32, 32))
    third = batches["data_batch_3"]
    assert np.array_equal(data.X_train[2 * PER_BATCH:3 * PER_BATCH].reshape(PER_BATCH, -1), third[b"data"])
    assert data.y_train[2 * PER_BATCH:3 * PER_BATCH].tolist() == third[b"labels"]
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]


def test_missing_data_says_what_to_run(tmp_path, batches):
    with pytest.raises(DataError, match=r"not found in .*cifar-10-batches-py: run `nnx data download"):
        load_cifar10(tmp_path)
    folder = write_batches(tmp_path, batches)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"data_batch_4 is missing.*nnx data download cifar10"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("damage, why", [
    (lambda b: b[:len(b) // 2], "UnpicklingError|EOFError"),
    (lambda b: b"not a pickle at all", "UnpicklingError|EOFError|Error"),
    (lambda b: pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "expected uint8"),
    (lambda b: pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "float32"),
    (lambda b: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "labels outside"),
    (lambda b: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "1 labels for 2"),
    (lambda b: pickle.dumps({b"labels": [0]}), "no data or labels"),
    (lambda b: pickle.dumps([1, 2, 3]), "not a dict"),
    (lambda b: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0],
                             b"x": np.random.default_rng(0)}), "unexpected object"),
])
def test_a_corrupt_batch_says_to_delete_and_download(tmp_path, batches, damage, why):
    folder = write_batches(tmp_path, batches)
    path = folder / "data_batch_3"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=why) as err:
        load_cifar10(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path} is corrupt (")
    assert message.endswith(f"delete it and run `nnx data download cifar10 --data-dir {tmp_path}`")
    assert "\n" not in message


def test_a_corrupt_meta_file_is_named(tmp_path, batches):
    folder = write_batches(tmp_path, batches)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"num_vis": 3072}))
    with pytest.raises(DataError, match="batches.meta is corrupt"):
        load_cifar10(tmp_path)


# ---- split and normalisation -------------------------------------------------------------
def tiny_dataset(n: int = 200, seed: int = 0) -> CIFAR10:
    rng = np.random.default_rng(seed)
    return CIFAR10(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), np.arange(n) % 10,
                   rng.integers(0, 256, (30, 3, 32, 32), dtype=np.uint8), np.arange(30) % 10,
                   list(CLASSES))


def test_normalisation_uses_training_statistics_only():
    data = tiny_dataset()
    data.X_test[:] = 255            # test and validation pixels far from the training ones
    split = split_and_normalize(data, val_size=50, seed=1)
    assert split.X_train.dtype == split.X_val.dtype == split.X_test.dtype == np.float32
    train_idx = np.setdiff1d(np.arange(200), np.flatnonzero(stratified_split(data.y_train, 50, seed=1)))
    raw = data.X_train[train_idx].astype(np.float64)
    mean, std = raw.mean(axis=(0, 2, 3)), raw.std(axis=(0, 2, 3))
    np.testing.assert_allclose(split.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(split.std, std, rtol=1e-6)
    np.testing.assert_allclose(split.X_train.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(split.X_train.std(axis=(0, 2, 3)), 1, atol=1e-4)
    expected_test = (255 - mean) / std
    np.testing.assert_allclose(split.X_test[:, :, 0, 0], np.tile(expected_test, (30, 1)), rtol=1e-5)
    val_raw = data.X_train[np.flatnonzero(stratified_split(data.y_train, 50, seed=1))].astype(np.float64)
    np.testing.assert_allclose(split.X_val, (val_raw - mean[:, None, None]) / std[:, None, None],
                               rtol=1e-5, atol=1e-5)


def test_split_is_seeded_disjoint_stratified_and_limitable():
    data = tiny_dataset()
    a = split_and_normalize(data, val_size=50, seed=3)
    b = split_and_normalize(data, val_size=50, seed=3)
    c = split_and_normalize(data, val_size=50, seed=4)
    assert np.array_equal(a.X_val, b.X_val) and not np.array_equal(a.X_val, c.X_val)
    assert len(a.y_train) == 150 and len(a.y_val) == 50 and len(a.y_test) == 30
    assert np.bincount(a.y_val, minlength=10).tolist() == [5] * 10
    val = np.flatnonzero(stratified_split(data.y_train, 50, seed=3))
    assert len(np.unique(val)) == 50
    small = split_and_normalize(data, val_size=50, seed=3, limit=20)
    assert len(small.y_train) == 20
    np.testing.assert_array_equal(small.y_val, a.y_val)     # same validation images
    train_idx = np.setdiff1d(np.arange(200), val)[:20]      # the first 20 training images
    np.testing.assert_array_equal(small.y_train, data.y_train[train_idx])


def test_split_rejects_impossible_sizes():
    with pytest.raises(ConfigError, match="would hold out 20 of 20") as refused:
        split_and_normalize(tiny_dataset(20), val_size=20)
    assert refused.value.option == "val_size"
    with pytest.raises(ConfigError, match="at least 1") as refused:
        split_and_normalize(tiny_dataset(20), val_size=5, limit=0)
    assert refused.value.option == "limit"


def test_normalize_reapplies_saved_statistics():
    images = np.full((2, 3, 4, 4), 100, np.uint8)
    out = normalize(images, [100.0, 50.0, 0.0], [1.0, 2.0, 4.0])
    assert out.dtype == np.float32
    assert out[0, :, 0, 0].tolist() == [0.0, 25.0, 25.0]
    mean, std = channel_stats(images)
    assert std.tolist() == [1.0, 1.0, 1.0]      # a constant channel keeps its scale


# ---- augmentation ------------------------------------------------------------------------
def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """image: (C, H, W) moved by (dy, dx) pixels, zero-filled: an independent reference."""
    out = np.roll(image, (dy, dx), axis=(1, 2))
    if dy > 0:
        out[:, :dy] = 0
    elif dy < 0:
        out[:, dy:] = 0
    if dx > 0:
        out[:, :, :dx] = 0
    elif dx < 0:
        out[:, :, dx:] = 0
    return out


@pytest.mark.parametrize("augment, reach", [(FlipShift(shift=2), 2), (FlipShift(shift=4), 4)])
def test_augmentation_is_a_seeded_flip_and_zero_filled_shift(augment, reach):
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    before = x.copy()
    out = augment(x, np.random.default_rng(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(x, before)                  # input untouched
    np.testing.assert_array_equal(out, augment(x, np.random.default_rng(5)))
    assert not np.array_equal(out, augment(x, np.random.default_rng(6)))
    flips, shifts = [], set()
    for image, result in zip(x, out, strict=True):
        matches = [(flip, dy, dx) for flip in (False, True)
                   for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
                   if np.array_equal(result, shifted(image[..., ::-1] if flip else image, dy, dx))]
        assert len(matches) == 1, "each output is exactly one flip+shift of its input"
        flips.append(matches[0][0])
        shifts.add(matches[0][1:])
    assert 0.2 < np.mean(flips) < 0.8
    assert len(shifts) > 5 and max(max(abs(d) for d in s) for s in shifts) <= reach


def test_flips_alone_are_exact_mirror_images():
    x = np.random.default_rng(1).standard_normal((32, 3, 5, 7)).astype(np.float32)
    out = FlipShift(shift=0)(x, np.random.default_rng(0))
    mirrored = np.array([np.array_equal(o, i[..., ::-1]) for o, i in zip(out, x, strict=True)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, x, strict=True)])
    assert np.all(mirrored ^ kept) and mirrored.any() and kept.any()
    assert out is not x


def test_shifts_move_content_and_fill_with_zeros_instead_of_wrapping():
    x = np.zeros((200, 1, 9, 9), np.float32)
    x[:, 0, 4, 2] = 1.0                     # a bright pixel that no shift of 2 can push out
    out = FlipShift(shift=2)(x, np.random.default_rng(0))
    n, ys, xs = np.nonzero(out[:, 0])
    assert np.array_equal(n, np.arange(200))                 # exactly one pixel per image
    assert np.all(np.abs(ys - 4) <= 2)
    assert np.all(np.minimum(np.abs(xs - 2), np.abs(xs - 6)) <= 2)   # 6: its mirror image
    corner = np.zeros((100, 1, 4, 4), np.float32)
    corner[:, 0, 0, 0] = 1.0
    out = FlipShift(shift=2)(corner, np.random.default_rng(1))
    _, ys, _ = np.nonzero(out[:, 0])
    assert 0 < len(ys) < 100                                 # some pixels fell off the edge
    assert np.all(ys <= 2)                                   # none wrapped round to the bottom


def test_alternating_flips_show_every_image_both_ways_every_two_epochs():
    augment = FlipShift(flip="alternating", shift=0, seed=3)
    x = np.random.default_rng(2).standard_normal((400, 1, 2, 3))
    index = np.arange(400)

    def mirrored(epoch, rows):
        out = augment(x[rows], np.random.default_rng(epoch), epoch=epoch, index=rows)
        return np.array([np.array_equal(o, i[..., ::-1]) for o, i in zip(out, x[rows], strict=True)])

    even, odd = mirrored(0, index), mirrored(1, index)
    assert np.all(even ^ odd) and 150 < even.sum() < 250        # each way once; about half
    assert np.array_equal(mirrored(2, index), even)             # the same half again
    rows = np.random.default_rng(0).permutation(400)[:50]       # any batch: the image decides
    assert np.array_equal(mirrored(4, rows), even[rows])
    assert not np.array_equal(FlipShift(flip="alternating", shift=0, seed=4)(
        x, np.random.default_rng(0), epoch=0, index=index), augment(x, np.random.default_rng(0),
                                                                    epoch=0, index=index))


def test_reflect_padding_fills_with_the_mirrored_border():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4).repeat(300, axis=0)
    out = FlipShift(flip="alternating", pad="reflect", shift=1, seed=0)(
        x, np.random.default_rng(0), epoch=1, index=np.arange(300))
    padded = np.pad(x[0, 0], 1, mode="reflect")
    windows = {padded[a:a + 4, b:b + 4].tobytes() for a in range(3) for b in range(3)}
    windows |= {padded[a:a + 4, b:b + 4][:, ::-1].tobytes() for a in range(3) for b in range(3)}
    assert all(o[0].tobytes() in windows for o in out)
    assert len({o[0].tobytes() for o in out}) > 9               # shifts and flips both vary


# ---- the real data set -------------------------------------------------------------------
@pytest.mark.slow
def test_real_cifar10_loads_balanced(tmp_path):
    if not (SHARED / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(f"real CIFAR-10 not available in {SHARED}")
    subprocess.run([sys.executable, str(SHARED / "make_cifar10_batches.py"), str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    data = load_cifar10(tmp_path)
    assert data.X_train.shape == (50000, 3, 32, 32) and data.X_test.shape == (10000, 3, 32, 32)
    assert data.class_names == list(CLASSES)
    assert np.bincount(data.y_train).tolist() == [5000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    split = split_and_normalize(data, limit=10000)
    assert len(split.y_train) == 10000 and len(split.y_val) == 5000
    assert np.bincount(split.y_val).tolist() == [500] * 10
    assert 0.4 < split.mean[0] / 255 < 0.6 and 0.2 < split.std[0] / 255 < 0.3
