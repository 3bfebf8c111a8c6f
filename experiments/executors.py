"""Where a sweep's trials run: in the driver, in local worker processes, or on Dask.

Every backend calls the same top-level ``run_trial(config) -> record``, which
never raises and returns plain data (metrics, history, model bytes); only the
driver writes files. A trial's numbers depend on its config alone, so they are
bit-identical whichever backend and however many workers ran it.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from experiments.config import TrainConfig
from experiments.errors import ConfigError
from experiments.runner import RunOutcome, best_metrics, run, run_stack, snapshots_bytes

# Workers are one process per core: each must use one BLAS thread or they
# oversubscribe the cores. The variables are read when numpy loads, so they
# are set in the environment the spawned workers inherit.
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
MAX_IMAGE_MODEL_PARAMS = 1_000_000     # image models this big are not kept per trial
CONNECT_TIMEOUT = "10s"                # to reach a Dask scheduler


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


def execute(configs: list, workers: int = 1, scheduler: str | None = None, function=run_trial
            ) -> Iterator[tuple[int, dict]]:
    """Run ``function`` (``run_trial``, or ``run_stack_trials`` on stacks) on each config;
    yield (index in ``configs``, its result) as each finishes. A backend's own
    failure (a lost Dask worker) yields one failed record.

    ``scheduler``: a Dask scheduler address; else ``workers`` local processes,
    or 0 to run in this process, one after another.
    """
    if not configs:
        return
    if scheduler is None and workers == 0:
        with _one_blas_thread_here():
            for index, config in enumerate(configs):
                yield index, function(config)
        return
    opener = dask_executor(scheduler) if scheduler else process_executor(min(workers, len(configs)))
    with opener as executor:       # on an early exit, the opener stops what is still queued
        futures = {executor.submit(function, config): i for i, config in enumerate(configs)}
        for future in as_completed(futures):
            # popped: a finished future would otherwise hold its records (models, curves)
            # until the whole sweep ends
            yield futures.pop(future), _result(future)


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
    """``workers`` spawned processes with one BLAS thread each."""
    with _environment({name: "1" for name in BLAS_THREAD_VARS}):
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_ignore_sigint)
        try:
            yield pool
        except BaseException:
            # Interrupted: the trials in flight are lost anyway, so stop them rather than
            # wait (``_processes`` is private, but the pool's only handle on its workers).
            for process in dict(getattr(pool, "_processes", None) or {}).values():
                process.terminate()
            pool.shutdown(wait=False)
            raise
        pool.shutdown(wait=True)


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the driver alone handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def dask_executor(address: str) -> Iterator[Executor]:
    """The ``concurrent.futures`` interface of an existing Dask cluster at ``address``."""
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError("scheduler", "needs Dask: pip install 'nnx[dask]'") from None
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError("scheduler", f"cannot connect to {address}: {exc}") from None
    try:
        yield client.get_executor(pure=False)
    finally:
        client.close()


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
