"""Where a sweep's trials run: in the driver, in local worker processes, or on Dask.

Every backend calls the same top-level ``run_trial(config) -> record``, which
never raises and returns plain data (metrics, history, model bytes); only the
driver writes files. A trial's numbers depend on its config alone, so they are
bit-identical whichever backend and however many workers ran it.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from experiments.config import TrainConfig
from experiments.errors import ClusterLostError, ConfigError
from experiments.runner import RunOutcome, best_metrics, run, run_stack, snapshots_bytes

# Workers are one process per core: each must use one BLAS thread or they
# oversubscribe the cores. The variables are read when numpy loads, so they
# are set in the environment the spawned workers inherit.
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
MAX_IMAGE_MODEL_PARAMS = 1_000_000     # image models this big are not kept per trial
CONNECT_TIMEOUT = "10s"                # to reach a Dask scheduler
DRIVER_POLL_SECONDS = 0.5              # how often a worker checks that its driver lives
WAKE_SECONDS = 0.5                     # how often the driver, waiting for trials, looks at signals


def run_trial(config: dict) -> dict:
    """Train one trial from its resolved config (``TrainConfig.to_dict()``).

    Returns status (ok, diverged or failed), final_* and best_* metrics
    (``best_metrics``), epochs_run, seconds, error (``Type: message``, empty
    unless failed), history (the per-epoch dicts, a list or a ``History``),
    model (``.npz`` bytes or None) and snapshots (the bytes of a snapshots.npz,
    or None).
    """
    started = time.perf_counter()
    try:
        record = outcome_record(run(TrainConfig.from_dict(config)))
    except Exception as exc:            # a failed trial is a result, not the end of the sweep
        record = {"status": "failed", "epochs_run": 0, "error": error_line(exc), "history": [],
                  "model": None}
    record["seconds"] = time.perf_counter() - started
    return record


def outcome_record(outcome: RunOutcome) -> dict:
    """The record of a trained trial (``run_trial``'s, but seconds)."""
    return {"status": outcome.status, **outcome.final, **best_metrics(outcome.result),
            "epochs_run": outcome.result.epochs_run, "error": "",
            "history": outcome.result.history, "model": model_bytes(outcome),
            "snapshots": snapshots_bytes(outcome.result)}


def run_stack_trials(task: dict) -> list[dict]:
    """Train the trials of one stack as one computation (``runner.run_stack``): ``task`` is
    {"configs": resolved config dicts, "widths": padded hidden sizes, or None for a
    trial that trains alone}. One ``run_trial`` record per trial, in order; each
    trial's seconds are its share of the stack's. Never raises: when the stack
    fails as a whole, its trials run again one by one, so a failure is a trial's own."""
    configs, widths = task["configs"], task["widths"]
    if widths is None and len(configs) == 1:
        return [run_trial(configs[0])]
    started = time.perf_counter()
    try:
        outcomes = run_stack([TrainConfig.from_dict(c) for c in configs], widths=widths)
    except Exception:
        return [run_trial(config) for config in configs]
    shared = (time.perf_counter() - started - sum(o.seconds for o in outcomes)) / len(outcomes)
    records = []
    for outcome in outcomes:
        own = time.perf_counter()
        record = outcome_record(outcome)
        record["seconds"] = outcome.seconds + shared + (time.perf_counter() - own)
        records.append(record)
    return records


def error_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def model_bytes(outcome: RunOutcome) -> bytes | None:
    """The trained network as ``.npz`` bytes: for ok trials, on 2D data always, on
    images when it is small enough to keep one per trial."""
    if outcome.status != "ok":
        return None
    if outcome.config.is_image and outcome.network.num_params >= MAX_IMAGE_MODEL_PARAMS:
        return None
    return outcome.network.to_bytes()


def default_workers() -> int:
    """The cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def execute(configs: list, workers: int = 1, scheduler=None, function=run_trial
            ) -> Iterator[tuple[int, dict]]:
    """Run ``function`` (``run_trial``, or ``run_stack_trials`` on stacks) on each config;
    yield (index in ``configs``, its result) as each finishes. A backend's own
    failure (a lost Dask worker) yields one failed record.

    ``scheduler``: a Dask cluster, by address or as a client ``connect`` opened; else
    ``workers`` local processes, or 0 to run in this process, one after another.
    Raises ClusterLostError when the Dask cluster goes away: the trials it had not
    finished are not failures, and yield nothing.
    """
    if not configs:
        return
    if scheduler is not None:
        opened = connect(scheduler) if isinstance(scheduler, str) else contextlib.nullcontext(scheduler)
        with opened as client:
            yield from _on_dask(client, configs, function)
        return
    if workers == 0:
        with _one_blas_thread_here():
            for index, config in enumerate(configs):
                yield index, function(config)
        return
    with process_executor(min(workers, len(configs))) as executor:   # an early exit stops the rest
        with _signals_held():     # submitting spawns the workers
            futures = {executor.submit(function, config): i for i, config in enumerate(configs)}
        for future in as_completed(futures):
            # popped: a finished future would otherwise hold its records (models, curves)
            # until the whole sweep ends
            yield futures.pop(future), _result(future)


def as_completed(futures) -> Iterator:
    """``futures`` as they finish, as ``concurrent.futures.as_completed`` gives them, but
    waking every WAKE_SECONDS. The kernel hands a signal sent to the process (Ctrl-C,
    SIGTERM) to any of its threads; Python runs the handler in the main thread only when
    that thread next runs Python code, and one blocked in an endless wait never would:
    the sweep would ignore the signal."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=WAKE_SECONDS, return_when=FIRST_COMPLETED)
        yield from done


def _on_dask(client, configs: list, function) -> Iterator[tuple[int, dict]]:
    executor = client.get_executor(pure=False)
    futures = {executor.submit(function, config): i for i, config in enumerate(configs)}
    try:
        for future in as_completed(futures):
            # Dask cancels every trial of a client that lost its scheduler (nnx cancels
            # none while it waits), so a cancelled trial is not a failure of its own.
            if future.cancelled():
                raise ClusterLostError(_lost(client))
            yield futures.pop(future), _result(future)
    finally:
        executor.shutdown(wait=False)       # an early exit leaves nothing queued on the cluster


def _lost(client) -> str:
    address = getattr(client.scheduler, "address", None) or "?"
    if client.status == "running":          # still connected: someone cancelled the trials
        return f"the Dask cluster at {address} cancelled the trials (was it restarted?)"
    return f"lost the Dask cluster at {address}"


def _result(future) -> dict:
    """A trial's record; an error of the backend itself (a lost Dask worker) fails that trial."""
    try:
        return future.result()
    except Exception as exc:
        if isinstance(exc, BrokenProcessPool):   # every queued trial would fail the same way
            raise RuntimeError("a worker process died (out of memory?); the finished trials are "
                               "saved: run the same command again to resume") from exc
        return {"status": "failed", "epochs_run": 0, "seconds": float("nan"), "history": [],
                "model": None, "error": error_line(exc)}


@contextlib.contextmanager
def process_executor(workers: int) -> Iterator[Executor]:
    """``workers`` spawned processes with one BLAS thread each, which end when this
    process does, however it ends (see ``_start_worker``)."""
    # A parent-death signal follows the thread that spawned the worker, not the process:
    # it is safe only from the main thread, which lives as long as the process. Workers
    # are spawned as trials are submitted, by the thread that entered this block.
    main_thread = threading.current_thread() is threading.main_thread()
    with _environment({name: "1" for name in BLAS_THREAD_VARS}):
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(os.getpid(), main_thread))
        try:
            yield pool
        except BaseException:
            # Interrupted: the trials in flight are lost anyway, so stop them rather than
            # wait (``_processes`` is private, but the pool's only handle on its workers).
            for process in dict(getattr(pool, "_processes", None) or {}).values():
                process.terminate()
            # Wait for the pool's manager thread to see them go: left running, it closes
            # its wake-up pipe while the interpreter's exit hook writes to it (a traceback
            # at exit, about 1 run in 15 here).
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


@contextlib.contextmanager
def _signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl-C and SIGTERM while the block runs, then act on them. A worker is
    spawned by writing its start-up data down a pipe: interrupted halfway, the new
    process finds the pipe cut, prints a traceback and dies, and the driver has no
    handle on it yet. Only the main thread may set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:         # None: a handler set outside Python, left alone
                signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)     # now, to the handler there was before


def _start_worker(driver: int, parent_death_signal: bool) -> None:
    """Set up a spawned worker: Ctrl-C is the driver's to handle (it reaches the whole
    process group), and the worker ends when its driver does. A driver killed outright
    (SIGKILL, the OOM killer) cannot stop its workers, and they would otherwise train
    on, then wait for work forever: on Linux the kernel kills them with their driver
    (PR_SET_PDEATHSIG); everywhere, a thread sees the driver gone within
    DRIVER_POLL_SECONDS (the worker is re-parented) and ends the process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_death_signal and sys.platform.startswith("linux"):
        _kill_me_with_my_parent()
    if os.getppid() != driver:       # the driver died before the worker got here
        os._exit(1)
    threading.Thread(target=_watch_driver, args=(driver,), name="nnx-driver-watch", daemon=True).start()


def _kill_me_with_my_parent() -> None:
    import ctypes
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):      # no prctl here: the watching thread suffices
        pass


def _watch_driver(driver: int) -> None:
    while os.getppid() == driver:
        time.sleep(DRIVER_POLL_SECONDS)
    os._exit(1)        # nothing to save: only the driver writes files


@contextlib.contextmanager
def connect(address: str | None):
    """A client of the Dask cluster at ``address`` (None: no cluster, yields None);
    ConfigError on --scheduler when it cannot be reached.

    While it is open, Dask's own log is held to critical messages: when the
    scheduler goes away the client logs every failed reconnection with a
    traceback, and the sweep reports the lost cluster itself, once.
    """
    if address is None:
        yield None
        return
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError("scheduler", "needs Dask: pip install 'nnx[dask]'") from None
    with _quiet_loggers("distributed"):
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError("scheduler", f"cannot connect to {address}: {exc}") from None
        try:
            yield client
        finally:
            client.close()


@contextlib.contextmanager
def _quiet_loggers(prefix: str):
    names = [prefix, *(n for n in logging.root.manager.loggerDict if n.startswith(prefix + "."))]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _one_blas_thread_here():
    """In-process trials on one BLAS thread too, when threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
