"""Faults from outside: a killed sweep driver, a lost Dask cluster, two writers on one
directory, a shared machine's umask. Each runs the real thing in subprocesses."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import process_group

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


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_the_sweep_driver_ends_its_workers(tmp_path, sig):
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
