"""Shared test helpers."""
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from experiments.cifar10 import BATCHES_DIR, CLASSES
from mlp.train import Callback

PER_BATCH = 8


def assert_close(actual, expected, rtol: float = 1e-6, err_msg: str = "", scale: float = 0.0) -> None:
    """max |actual - expected| <= rtol * max(max |expected|, scale), over the whole array.

    For numbers computed in another summation order (another BLAS kernel,
    another block split): an entry near zero carries the rounding error of the
    large terms that cancelled in it, so an entry-by-entry relative tolerance
    fails on some CPUs and not on others. Scaled to the array, it does not.
    ``scale``: the magnitude of the terms that cancelled, for an array that is
    zero in exact arithmetic (a conv bias before a batch norm gets no gradient),
    whose own magnitude is rounding noise.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{err_msg} shapes {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected), initial=0.0)), scale)
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    assert error <= rtol * scale, (f"{err_msg} max abs error {error:.3g} > {rtol:g} x max |expected| "
                                   f"{scale:.3g} (relative {error / max(scale, 1e-300):.3g})")


def parallel_hand_offs(monkeypatch) -> list[str]:
    """Names of the threads that ran work ``mlp.parallel`` handed off, filled as it runs.

    A test of the parallel path asserts the list is not empty, so it cannot pass by
    running serially (on a one-core machine, or with NNX_THREADS=1).
    """
    from mlp import parallel
    pool = parallel._executor
    ran: list[str] = []

    class Recording:
        def submit(self, fn, *args):
            def recorded(*a):
                ran.append(threading.current_thread().name)
                return fn(*a)
            return pool().submit(recorded, *args)

    monkeypatch.setattr(parallel, "_executor", Recording)
    return ran


def flat(output: str) -> str:
    """CLI output with Rich's box drawing and line wrapping undone, for substring checks."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


# ---- a tiny CIFAR-10 in the official layout --------------------------------------------
def make_batches(seed: int = 0, per_batch: int = PER_BATCH) -> dict[str, dict]:
    """The six pickled dicts of the official archive, ``per_batch`` images each."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for name in names:
        batches[name] = {b"batch_label": name.encode(),
                         b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, size=per_batch)]}
    batches["batches.meta"] = {b"label_names": [c.encode() for c in CLASSES],
                               b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    return batches


def write_batches(data_dir: Path, batches: dict[str, dict]) -> Path:
    folder = data_dir / BATCHES_DIR
    folder.mkdir(parents=True)
    for name, obj in batches.items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return folder


def cifar_dir(root: Path, seed: int, per_batch: int) -> Path:
    """A data directory holding a CIFAR-10 stand-in of ``per_batch`` images a batch."""
    write_batches(root, make_batches(seed=seed, per_batch=per_batch))
    return root


def unwritable_path(tmp_path: Path, where: str) -> str:
    """An output path nnx cannot create: ``where`` as is when absolute (under /proc),
    else under ``tmp_path``, where a file named ``file`` stands in for a folder."""
    (tmp_path / "file").write_text("a file, not a folder")
    return where if where.startswith("/") else str(tmp_path / where)


# ---- runs ----------------------------------------------------------------------------------
class KillAt(Callback):
    """Interrupts training at the end of ``epoch``, as Ctrl-C would."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, record):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


def without_seconds(history):
    """A run's history without its timings, which are all that may differ between two runs."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


# ---- processes ----------------------------------------------------------------------------
def kill_when_ready(child: str, args: list[str], cwd: Path) -> bytes:
    """Run ``python -c child READY_FD *args`` in a process group of its own and SIGKILL
    the group once the child writes to READY_FD, which it does at the point a test
    wants it killed (and then waits). Returns what it wrote: b"" if it ended or hung
    before. No timing is assumed: the run cannot finish before the kill."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", child, str(write_end), *args], cwd=cwd,
                            pass_fds=[write_end], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    os.close(write_end)
    try:
        # A deadline for a child that hangs before it gets there, not a guess at its speed.
        ready, _, _ = select.select([read_end], [], [], 120)
        said = os.read(read_end, 64) if ready else b""
    finally:
        os.close(read_end)
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    assert said, f"the child ended or hung before it was ready: {stderr.decode()[-2000:]}"
    return said


def process_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:             # ended while we looked
            continue
        fields = stat[stat.rfind(")") + 2:].split()   # after "pid (comm) "
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def conv_net(filters=6):
    """A small ConvNet on 3x8x8 images, as if trained on CIFAR-10 (for the plot tests)."""
    from mlp.conv import Conv2D
    from mlp.layers import Flatten, Linear
    from mlp.network import Network
    rng = np.random.default_rng(0)
    return Network([Conv2D(3, filters, 3, rng=rng), Flatten(), Linear(filters * 36, 10, rng=rng)],
                   input_shape=(3, 8, 8), metadata={"data": "cifar10"})


def one_error_line(result, code=1):
    """The one line a refused command printed, checked to be alone and an error."""
    assert result.exit_code == code
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:")
    return lines[0]


def assert_same_numbers(out: Path, expected: Path, rtol: float = 1e-10) -> None:
    """Two sweeps of the same trials agree: statuses and epoch counts exactly, every
    metric and curve column to ``rtol`` of its magnitude over the sweep (``assert_close``)."""
    import pandas as pd

    from experiments.store import METRIC_COLUMNS, SweepStore
    rows, other = SweepStore(out).read_rows(), SweepStore(expected).read_rows()
    assert sorted(rows) == sorted(other)
    for key, row in rows.items():
        assert [row[c] for c in ("status", "epochs_run", "best_epoch")] == \
            [other[key][c] for c in ("status", "epochs_run", "best_epoch")]
        a = pd.read_csv(out / "curves" / f"{key}.csv").drop(columns="seconds")
        b = pd.read_csv(expected / "curves" / f"{key}.csv").drop(columns="seconds")
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        for column in b.columns:
            finite = np.isfinite(b[column].to_numpy(float))
            assert_close(a[column].to_numpy(float)[finite], b[column].to_numpy(float)[finite], rtol,
                         err_msg=f"{key} {column}")
    for column in (c for c in METRIC_COLUMNS if c not in ("seconds", "epochs_run", "best_epoch")):
        a = np.array([float(rows[k][column]) for k in sorted(rows)])
        b = np.array([float(other[k][column]) for k in sorted(rows)])
        finite = np.isfinite(b)
        np.testing.assert_array_equal(np.isfinite(a), finite, err_msg=column)
        assert_close(a[finite], b[finite], rtol, err_msg=column)
