"""Faults from outside: a killed sweep driver, a lost Dask cluster, two writers on one
directory, a shared machine's umask. Each runs the real thing in subprocesses."""
import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import process_group
from typer.testing import CliRunner

from cli.app import app

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

ROOT = Path(__file__).resolve().parents[1]
LONG_SWEEP = ["sweep", "--grid", "hidden=5,10", "--seeds", "0-1", "--epochs", "1000000", "--points", "30"]


def wait_for(condition, timeout: float = 60.0):
    """Poll ``condition`` until it returns something true, and return that (None on
    timeout). The timeout bounds only a test that is failing anyway."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    return None


def spawned_workers(pgid: int) -> list[int]:
    """The multiprocessing workers among the processes of group ``pgid``."""
    found = []
    for pid in process_group(pgid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            found.append(pid)
    return found


def signal_another_thread(pid: int, sig: int) -> None:
    """Send ``sig`` to a thread of process ``pid`` other than its main thread, as the kernel
    may choose to when a signal is sent to the process."""
    tgkill = getattr(ctypes.CDLL(None, use_errno=True), "tgkill", None)
    if tgkill is None:
        pytest.skip("no tgkill in this C library (glibc < 2.30)")
    threads = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert threads, "the driver has no other thread"
    assert tgkill(pid, threads[0], sig) == 0, os.strerror(ctypes.get_errno())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("sig, to_another_thread", [(signal.SIGKILL, False), (signal.SIGTERM, False),
                                                    (signal.SIGTERM, True)],
                         ids=["SIGKILL", "SIGTERM", "SIGTERM-to-another-thread"])
def test_killing_the_sweep_driver_ends_its_workers(tmp_path, sig, to_another_thread):
    # The driver leads a process group of its own, which its workers (and multiprocessing's
    # resource tracker) join: after the driver, the group must empty. Its output goes to
    # files: the workers inherit the descriptors, and a pipe would stay open with them.
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "cli", *LONG_SWEEP, "--workers", "2",
                                   "--out", str(tmp_path / "sweep")], cwd=ROOT,
                                  start_new_session=True, stdout=stdout, stderr=stderr)
    try:
        workers = wait_for(lambda: len(found := spawned_workers(driver.pid)) == 2 and found)
        assert workers, "the sweep started no workers"
        if to_another_thread:
            signal_another_thread(driver.pid, sig)
        else:
            os.kill(driver.pid, sig)
        driver.wait(timeout=60)
        wait_for(lambda: not process_group(driver.pid), timeout=10)
        left = process_group(driver.pid)
    finally:
        for pid in process_group(driver.pid):       # what a failing run leaves behind
            os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    stdout, stderr = out.read_text(), err.read_text()
    assert not left, f"processes {left} outlived their sweep driver (workers were {workers})"
    if sig == signal.SIGTERM:      # stopped like Ctrl-C: the resume hint and exit code 130
        assert driver.returncode == 130, stderr
        assert "run the same command again to resume" in " ".join(stderr.split())
        assert "Traceback" not in stdout + stderr


# The sweep driver in a child that stops while spawning its first worker, between starting
# the process and sending it its start-up data: says so through argv[1], and goes on once
# the file argv[2] exists.
PAUSED_MID_SPAWN = """
import os, sys, time
from multiprocessing import util
from pathlib import Path
from cli.app import app

ready, go, spawn = int(sys.argv[1]), Path(sys.argv[2]), util.spawnv_passfds

def spawn_and_pause(path, args, passfds):
    pid = spawn(path, args, passfds)
    if any("spawn_main" in str(a) for a in args) and not go.exists():
        os.write(ready, b"spawning")
        while not go.exists():
            time.sleep(0.01)
    return pid

util.spawnv_passfds = spawn_and_pause
app(sys.argv[3:], prog_name="nnx")
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_sigterm_while_a_worker_is_being_spawned_stops_the_sweep_cleanly(tmp_path):
    """A worker half spawned when the signal came found its start-up pipe cut and printed
    a traceback; the driver now finishes spawning first, then stops."""
    go = tmp_path / "go"
    read_end, write_end = os.pipe()
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-c", PAUSED_MID_SPAWN, str(write_end), str(go),
                                   *LONG_SWEEP, "--workers", "2", "--out", str(tmp_path / "sweep")],
                                  cwd=ROOT, pass_fds=[write_end], start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 120)
        assert ready and os.read(read_end, 64) == b"spawning", err.read_text()[-2000:]
        os.kill(driver.pid, signal.SIGTERM)
        go.touch()
        driver.wait(timeout=60)
        wait_for(lambda: not process_group(driver.pid), timeout=10)
        left = process_group(driver.pid)
    finally:
        os.close(read_end)
        for pid in process_group(driver.pid):
            os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    output = err.read_text()
    assert driver.returncode == 130 and "Traceback" not in output, output
    assert "run the same command again to resume" in " ".join(output.split())
    assert not left


# ---- a Dask cluster that goes away ------------------------------------------------------------
class Cluster:
    """A real Dask scheduler and one worker, each a process group of its own, on loopback."""

    def __init__(self, folder: Path, port: int = 0, threads: int = 1, preload: Path | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        address_file = folder / f"scheduler-{time.monotonic_ns()}.json"
        self.processes = [self._start(folder / "scheduler.log", "scheduler", "--host", "127.0.0.1",
                                      "--port", str(port), "--no-dashboard",
                                      "--scheduler-file", str(address_file))]
        try:
            found = wait_for(lambda: self._address(address_file))
            assert found, f"the scheduler did not start: {(folder / 'scheduler.log').read_text()[-2000:]}"
            self.address = found
            extra = ["--preload", str(preload)] if preload else []
            self.processes.append(self._start(folder / "worker.log", "worker", self.address,
                                              "--nthreads", str(threads), "--no-dashboard", *extra))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _address(file: Path) -> str | None:
        try:
            return json.loads(file.read_text()).get("address")
        except (OSError, ValueError):       # not written yet, or half written
            return None

    @staticmethod
    def _start(log: Path, *args: str) -> subprocess.Popen:
        with open(log, "a") as f:
            return subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=f, stderr=f,
                                    start_new_session=True)

    def kill_scheduler(self) -> None:
        os.killpg(self.processes[0].pid, signal.SIGKILL)
        self.processes[0].wait()

    def close(self) -> None:
        for process in self.processes:
            for pid in process_group(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.wait()


def sweep_rows(out: Path) -> list[list[str]]:
    path = out / "results.csv"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split(",") for line in lines[1:]]


# Loaded into the first cluster's worker: the trials of hidden=60 (the sweep runs the
# longest first, one task at a time on one thread; a stack of them holds no other size)
# finish, every other one waits for ever, so the sweep is known to be at 4 of 16 when
# the scheduler is killed.
ONLY_THE_LARGEST_FINISH = """
import threading
import experiments.executors as executors
from experiments.runner import run, run_stack

def run_or_wait(config, *args, **kwargs):
    if config.hidden != [60]:
        threading.Event().wait()
    return run(config, *args, **kwargs)

def run_stack_or_wait(configs, *args, **kwargs):
    if any(config.hidden != [60] for config in configs):
        threading.Event().wait()
    return run_stack(configs, *args, **kwargs)

executors.run, executors.run_stack = run_or_wait, run_stack_or_wait
"""


@pytest.mark.slow
def test_a_lost_dask_cluster_fails_no_trial_and_the_same_command_finishes_the_sweep(tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "cli", "sweep", "--grid", "hidden=5,10,20,60", "--seeds", "0-3",
               "--epochs", "300", "--points", "30", "--out", str(out)]
    preload = tmp_path / "only_the_largest_finish.py"
    preload.write_text(ONLY_THE_LARGEST_FINISH)
    cluster = Cluster(tmp_path / "cluster", preload=preload)
    try:
        log = tmp_path / "sweep.log"
        with open(log, "w") as f:
            sweep = subprocess.Popen([*command, "--scheduler", cluster.address], cwd=ROOT, stdout=f,
                                     stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: len(sweep_rows(out)) == 4), "the four largest trials did not finish"
        cluster.kill_scheduler()
        _, stderr = sweep.communicate(timeout=120)
    finally:
        cluster.close()
    output = log.read_text() + stderr
    rows = sweep_rows(out)
    unfinished = 12
    assert sweep.returncode == 1, output
    assert "Traceback" not in output
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith(f"Error: lost the Dask cluster at {cluster.address}: {unfinished} "
                               "trial(s) unfinished"), output
    assert "run the same command again" in lines[0]
    assert len(rows) == 4 and {row[1] for row in rows} == {"ok"}      # none of the 12 failed
    # The cluster back at the same address: the same command runs the rest.
    port = int(cluster.address.rsplit(":", 1)[1])
    cluster = Cluster(tmp_path / "cluster-again", port=port, threads=2)
    try:
        again = subprocess.run([*command, "--scheduler", cluster.address], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    finally:
        cluster.close()
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"skipping {16 - unfinished} finished trial(s) of 16" in again.stdout
    rows = sweep_rows(out)
    assert len(rows) == 16 and {row[1] for row in rows} == {"ok"}


# ---- two writers, one directory ------------------------------------------------------------
@contextlib.contextmanager
def held_by_another_process(folder: Path):
    """The lock an nnx process holds on a directory it writes: flock on the directory."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def is_locked(folder: Path) -> bool:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


@pytest.mark.skipif(fcntl is None, reason="no flock on this platform")
@pytest.mark.parametrize("command", [["train", "--epochs", "5"], ["train", "--resume"],
                                     ["sweep", "--grid", "hidden=3,5", "--epochs", "5", "--workers", "0"]])
def test_a_directory_another_nnx_process_writes_is_refused(tmp_path, command):
    out = tmp_path / "run"
    out.mkdir()
    args = [*command, str(out)] if command[-1] == "--resume" else [*command, "--out", str(out)]
    with held_by_another_process(out):
        line = one_error_line(CliRunner().invoke(app, args))
    assert f"another nnx process is writing to {out}" in line
    assert list(out.iterdir()) == []                       # nothing written, nothing removed


@pytest.mark.skipif(fcntl is None, reason="no flock on this platform")
def test_nnx_train_holds_its_directory_from_the_check_to_the_last_file(tmp_path, monkeypatch):
    import cli.app
    out, seen = tmp_path / "run", []
    for name in ("start_run", "save_run"):
        real = getattr(cli.app, name)

        def checked(path, *args, real=real, name=name):
            seen.append((name, is_locked(out)))
            return real(path, *args)
        monkeypatch.setattr(cli.app, name, checked)
    result = CliRunner().invoke(app, ["train", "--epochs", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert seen == [("start_run", True), ("save_run", True)]
    assert not is_locked(out)                              # and lets go when done


# ---- a shared machine ----------------------------------------------------------------------
WRITE_EVERYTHING = """
import sys
from cli.app import app
out = sys.argv[1]
for args in (["train", "--epochs", "3", "--checkpoint-every", "1", "--out", out + "/run"],
             ["sweep", "--grid", "hidden=3,5", "--epochs", "3", "--workers", "0", "--out", out + "/sweep"],
             ["plot-curves", out + "/run"]):
    app(args, prog_name="nnx", standalone_mode=False)
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["022", "002"])
def test_every_file_nnx_writes_has_the_mode_the_umask_gives(tmp_path, umask):
    subprocess.run([sys.executable, "-c", WRITE_EVERYTHING, str(tmp_path)], cwd=ROOT, umask=umask,
                   check=True, capture_output=True, timeout=120)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"checkpoint.npz", "model.npz", "config.json", "results.csv", "summary.csv",
            "curves.png"} <= {p.name for p in files}
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    folders = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")
               if p.is_dir()}
    assert set(folders.values()) == {oct(0o777 & ~umask)}, folders
