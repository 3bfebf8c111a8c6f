"""A training step over shards of the batch, the shards in worker processes.

Python threads share one interpreter lock, which every NumPy call takes on its
way in and out. A layer's kernels make dozens of calls per block of images
(mlp/parallel.py shares the blocks out among threads), and on this project's
two-core machines the hand-offs of that lock cost the second thread much of its
core: a whole conv6bn step ran 1.2-1.6x faster on two threads than on one, from
run to run, where two processes each training half the batch on one thread ran
as fast together as one alone. A process has a lock of its own. Whole steps in
shards against the whole batch on two threads, in turns: 1.02-1.53x on the
presets (``python bench/bench_conv.py --unsharded``, "shard gain").

A ShardedStep cuts each batch into ``SHARDS`` shards of whole examples, sizes
fixed by the batch size alone. Shard 0 runs here, on the network itself; every
other shard runs in a worker with a copy of the network, forked with it once the
conv layers have chosen their algorithms, so that every shard computes with the
same kernels. Before each step the parameters and buffers go to the workers
through shared memory, and the workers' gradients and scores come back the same
way. Each shard's upstream gradient is scaled by its share of the batch, so the
step's gradients are the shards' added in shard order (and its loss their mean
weighted by size); L2 is added once. A batch norm takes its statistics over every shard
(``parallel.across_shards``: each worker sends its part of them here, this
process combines the parts in shard order and sends the result back), so it
normalises over the whole batch, as without shards.

The numbers depend on ``SHARDS``, never on where the shards run: with one
thread (``NNX_THREADS=1``, a sweep worker), in a daemonic process or where
processes cannot be forked, the workers are threads of this process (with copies
of the network built from its spec) that take turns with it, making the same
calls in the same order.
``NNX_SHARDS=1`` trains unsharded, as nnx did before (other numbers, to
rounding). Networks with dropout (whose masks would need a random stream per
shard) and runs with the reference kernels train unsharded.
"""
from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing
import os
import signal
import threading
import time
import warnings
from multiprocessing import shared_memory
from multiprocessing.connection import wait

import numpy as np

from mlp import parallel
from mlp.conv import Conv2D
from mlp.kernels import reference_kernels
from mlp.layers import Dropout
from mlp.network import Network

SHARDS_ENV = "NNX_SHARDS"
DEFAULT_SHARDS = 2
# A worker polls for its next message this long before it sleeps, and so does shard 0
# for the workers': the shards of a conv6bn step meet 14 times (its batch norms), and
# waking a sleeping process at each made the step 8 % slower here (97.9 against 90.0 ms,
# in turns; a one-off script); the time between two steps is a few ms.
SPIN_SECONDS = 0.02


def shard_count() -> int:
    """SHARDS: ``NNX_SHARDS`` (a positive whole number; unset: 2)."""
    env = os.environ.get(SHARDS_ENV, "").strip()
    if not env:
        return DEFAULT_SHARDS
    if not env.isdigit() or int(env) < 1:
        warnings.warn(f"{SHARDS_ENV}={env!r} is not a positive whole number; using "
                      f"{DEFAULT_SHARDS} shards", stacklevel=2)
        return DEFAULT_SHARDS
    return int(env)


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """The shards (lo, hi) of a batch of n examples: as even as they come."""
    return [(n * i // shards, n * (i + 1) // shards) for i in range(shards)]


def shardable(net: Network, shards: int) -> bool:
    """Whether ``net`` trains in shards: more than one shard, the fast kernels, a conv
    layer (an MLP's products are few and large, and already threaded by BLAS) and no
    dropout."""
    return (shards > 1 and not reference_kernels()
            and any(isinstance(layer, Conv2D) for layer in net.layers)
            and not any(isinstance(layer, Dropout) for layer in net.layers))


class ShardFailure(RuntimeError):
    """A worker of a sharded step failed or went away."""


def _aligned(nbytes: int) -> int:
    """nbytes rounded up to a whole number of 64-byte cache lines."""
    return -(-nbytes // 64) * 64


def _views(buffer, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays shaped like ``arrays``, laid out one after another in ``buffer``, each
    starting on a cache line (``_layout_size`` bytes in all)."""
    views, offset = {}, 0
    for name, array in arrays.items():
        views[name] = np.ndarray(array.shape, array.dtype, buffer=buffer, offset=offset)
        offset += _aligned(array.nbytes)
    return views


def _layout_size(arrays: dict[str, np.ndarray]) -> int:
    return sum(_aligned(a.nbytes) for a in arrays.values())


def _receive(conn, spin: float, alive=None, baton=None):
    """The next message on ``conn``: polled for ``spin`` seconds, then waited for;
    ShardFailure when the other end is gone (``alive``: a process sentinel to watch).
    ``baton``: a lock the caller holds, let go while it waits (shards in threads run
    one at a time)."""
    if baton is not None:
        baton.release()
    try:
        deadline = time.perf_counter() + spin
        while not conn.poll():
            if time.perf_counter() > deadline:
                ready = wait([conn] + ([alive] if alive is not None else []))
                if conn not in ready:
                    raise ShardFailure("a shard's worker process ended unexpectedly")
                break
        try:
            return conn.recv()
        except (EOFError, OSError) as exc:
            raise ShardFailure(f"a shard's worker went away ({type(exc).__name__})") from None
    finally:
        if baton is not None:
            baton.acquire()


class _Hub:
    """Shard 0's side of ``across_shards``: the workers' parts, combined with its own in
    shard order, and the result sent back."""

    def __init__(self, step: ShardedStep):
        self.step = step

    def combine(self, part, count, combine=None):
        parts, counts = [part.copy()], [count]
        for worker in self.step.workers:
            kind, payload = self.step.receive(worker)
            if kind != "part":
                raise ShardFailure(f"a shard's worker failed: {payload}")
            parts.append(payload[0])
            counts.append(payload[1])
        total = combine(parts, counts) if combine else (parallel.sum_in_order(parts), sum(counts))
        for worker in self.step.workers:
            self.step.send(worker, ("total", total))
        return total


class _Spoke:
    """A worker's side of ``across_shards``."""

    def __init__(self, conn, spin, baton):
        self.conn, self.spin, self.baton = conn, spin, baton

    def combine(self, part, count, combine=None):
        self.conn.send(("part", (part, count)))
        kind, payload = _receive(self.conn, self.spin, baton=self.baton)
        if kind != "total":
            raise ShardFailure(f"shard 0 sent {kind!r} where totals were due")
        return payload


def _serve(conn, net: Network, views: dict, spin: float, baton=None) -> None:
    """A worker's loop: train ``net``, the worker's own copy of the network, on a shard per
    "step" message until "stop", reading its parameters, buffers and shard from ``views``
    (shared memory) and writing its gradients and scores there. A worker in a thread
    computes only while it holds ``baton``."""
    state = views["state"]
    # The layers read their parameters from the shared memory and write their gradients
    # into it (every layer writes its gradients in place): no copies either way.
    for i, layer in enumerate(net.layers):
        for name in layer.params:
            layer.params[name] = state[f"{i}.{layer.kind}.{name}"]
            layer.grads[name] = views["grads"][f"{i}.{layer.kind}.{name}"]
    parallel._shard.peer = _Spoke(conn, spin, baton)
    if baton is not None:
        baton.acquire()
    try:
        with parallel.single_blas_thread():
            while True:
                kind, (n, share) = _receive(conn, spin, baton=baton)
                if kind == "stop":
                    break
                for name, array in net.buffers.items():
                    np.copyto(array, state[name])
                out = net.forward(views["X"][:n], train=True)
                loss, dscores = net.data_loss(out, views["y"][:n])
                dscores *= share
                net.backward(dscores)
                views["scores"][:n] = out
                conn.send(("done", loss))
    except ShardFailure:
        pass                     # the main process is gone or failed: nothing to report to
    except BaseException as exc:  # noqa: BLE001  reported to the main process, which raises it
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        parallel._shard.peer = None
        if baton is not None:
            baton.release()


def _worker_process(conn, net, views, threads: int, spin: float, inherited) -> None:
    """A forked worker process's entry. It closes the ends of the pipes it inherited that
    are not its own (so that it sees the main process go), leaves Ctrl-C to the main
    process, and works on ``threads`` threads, with a thread pool of its own."""
    gc.freeze()     # the inherited objects: never scanned, so their pages stay shared
    for other in inherited:
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parallel.THREADS = threads
    parallel._pool = None          # the parent's pool threads do not exist here
    _serve(conn, net, views, spin)


class _Worker:
    """A shard's worker as shard 0 sees it: its pipe, its process or thread, its shared
    memory and the arrays laid out in it."""

    def __init__(self, conn, handle, segments: dict, views: dict, process: bool):
        self.conn, self.handle, self.process = conn, handle, process
        self.segments, self.views = segments, views

    @property
    def sentinel(self):
        return self.handle.sentinel if self.process else None


class ShardedStep:
    """Training steps of ``net`` over SHARDS shards of each batch (see the module's
    docstring). ``loss_and_scores(X, y)`` is ``net.loss_and_scores(X, y, train=True)``'s
    sharded form: the loss (data + L2), the scores (N, C) and the gradients, in
    ``net``'s own grads. ``batch_size``: the largest batch it will be given. Close it
    (or use it as a context manager) to stop its workers."""

    def __init__(self, net: Network, batch_size: int, example_shape: tuple, shards: int | None = None):
        self.net = net
        self.shards = shard_count() if shards is None else int(shards)
        if self.shards < 2:
            raise ValueError("a sharded step needs at least two shards")
        self.capacity = max(hi - lo for lo, hi in shard_bounds(batch_size, self.shards))
        self.example_shape = tuple(example_shape)
        # Processes where there are cores for them and they can be forked (a daemonic
        # process may have no children); each shard then runs on THREADS // shards threads.
        self.in_processes = (parallel.THREADS >= 2 and not multiprocessing.current_process().daemon
                             and "fork" in multiprocessing.get_all_start_methods())
        self.threads = max(1, parallel.THREADS // self.shards) if self.in_processes else parallel.THREADS
        self.spin = SPIN_SECONDS if self.in_processes else 0.0
        # Shards in threads take turns (the process was given one thread): the one that
        # computes holds the baton, and lets go of it while it waits for the others.
        self.baton = None if self.in_processes else threading.Lock()
        self.workers: list[_Worker] = []
        self._started = False

    # ---- workers -------------------------------------------------------------
    def _start(self, X0: np.ndarray) -> None:
        """Start the workers, once the conv layers have chosen their algorithms (a
        forward of shard 0 here makes them choose; batch norms' running statistics are
        put back after it)."""
        net = self.net
        if any(isinstance(layer, Conv2D) and layer.algorithm is None for layer in net.layers):
            saved = {name: array.copy() for name, array in net.buffers.items()}
            with self._threads():
                net.forward(X0, train=True)
            for name, array in net.buffers.items():
                np.copyto(array, saved[name])
        state_arrays = {**net.params, **net.buffers}
        x_bytes = _aligned(self.capacity * math.prod(self.example_shape) * net.dtype.itemsize)
        sizes = {"state": _layout_size(state_arrays), "grads": _layout_size(dict(net.params)),
                 "input": x_bytes + 8 * self.capacity,
                 "scores": self.capacity * net.num_classes * net.dtype.itemsize}
        self._state_segment = shared_memory.SharedMemory(create=True, size=max(1, sizes["state"]))
        self._state = _views(self._state_segment.buf, state_arrays)
        context = multiprocessing.get_context("fork") if self.in_processes else None
        for _ in range(1, self.shards):
            segments = {kind: shared_memory.SharedMemory(create=True, size=max(1, sizes[kind]))
                        for kind in ("grads", "input", "scores")}
            views = {"state": self._state,
                     "grads": _views(segments["grads"].buf, dict(net.params)),
                     "X": np.ndarray((self.capacity, *self.example_shape), net.dtype,
                                     buffer=segments["input"].buf),
                     "y": np.ndarray((self.capacity,), np.int64, buffer=segments["input"].buf,
                                     offset=x_bytes),
                     "scores": np.ndarray((self.capacity, net.num_classes), net.dtype,
                                          buffer=segments["scores"].buf)}
            here, there = multiprocessing.Pipe()
            if self.in_processes:
                # Forked: the worker starts with this process's network (its conv algorithms
                # chosen above) and these shared-memory views, and imports nothing.
                inherited = [here] + [worker.conn for worker in self.workers]
                handle = context.Process(target=_worker_process, daemon=True, name="nnx-shard",
                                         args=(there, net, views, self.threads, self.spin, inherited))
            else:
                replica = Network.from_spec(net.spec())
                handle = threading.Thread(target=_serve, daemon=True, name="nnx-shard",
                                          args=(there, replica, views, self.spin, self.baton))
            handle.start()
            if self.in_processes:
                there.close()
            self.workers.append(_Worker(here, handle, segments, views, self.in_processes))
        self._started = True

    def receive(self, worker: _Worker):
        return _receive(worker.conn, self.spin, worker.sentinel, self.baton)

    @staticmethod
    def send(worker: _Worker, message) -> None:
        try:
            worker.conn.send(message)
        except OSError as exc:
            raise ShardFailure(f"a shard's worker went away ({type(exc).__name__})") from None

    def close(self) -> None:
        """Stop the workers and free the shared memory."""
        for worker in self.workers:
            try:
                worker.conn.send(("stop", (0, 0.0)))
            except OSError:
                pass
        for worker in self.workers:
            worker.handle.join(timeout=5)
            if worker.process and worker.handle.is_alive():   # stuck: nothing of its to keep
                worker.handle.terminate()
                worker.handle.join()
            worker.conn.close()
            for kind in ("grads", "input", "scores"):
                _release(worker.segments[kind])
        if self._started:
            self._state = None
            _release(self._state_segment)
        self.workers, self._started = [], False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- a step --------------------------------------------------------------
    @contextlib.contextmanager
    def _threads(self):
        """This process's thread count while shard 0 runs: its share of the cores."""
        before, parallel.THREADS = parallel.THREADS, self.threads
        try:
            yield
        finally:
            parallel.THREADS = before

    def loss_and_scores(self, X: np.ndarray, y: np.ndarray):
        """As ``net.loss_and_scores(X, y, train=True)``, over the shards of the batch."""
        if self.baton is None:
            return self._step(X, y)
        with self.baton:
            return self._step(X, y)

    def _step(self, X, y):
        net, n = self.net, len(X)
        if X.shape[1:] != self.example_shape:
            raise ValueError(f"a sharded step planned for examples of shape {self.example_shape} "
                             f"was given {X.shape[1:]}")
        bounds = shard_bounds(n, self.shards)
        if min(hi - lo for lo, hi in bounds) < 2 or n > self.capacity * self.shards:
            # too small to shard (a batch norm needs two values) or larger than planned
            return net.loss_and_scores(X, y, train=True)
        X = X.astype(net.dtype, copy=False)
        if not self._started:
            self._start(X[bounds[0][0]:bounds[0][1]])
        for name, array in {**net.params, **net.buffers}.items():
            np.copyto(self._state[name], array)
        for worker, (lo, hi) in zip(self.workers, bounds[1:], strict=True):
            worker.views["X"][:hi - lo] = X[lo:hi]
            worker.views["y"][:hi - lo] = y[lo:hi]
            self.send(worker, ("step", (hi - lo, (hi - lo) / n)))
        lo, hi = bounds[0]
        parallel._shard.peer = _Hub(self)
        try:
            with self._threads():
                scores0 = net.forward(X[lo:hi], train=True)
                loss0, dscores = net.data_loss(scores0, y[lo:hi])
                dscores *= (hi - lo) / n       # the shard's share of the batch's mean loss
                net.backward(dscores)
            losses = [loss0]
            for worker in self.workers:
                kind, payload = self.receive(worker)
                if kind != "done":
                    raise ShardFailure(f"a shard's worker failed: {payload}")
                losses.append(payload)
        finally:
            parallel._shard.peer = None
        sizes = [b - a for a, b in bounds]
        for name, grad in net.grads.items():      # the shards' gradients, in shard order
            for worker in self.workers:
                grad += worker.views["grads"][name]
        if net.reg:
            for layer in net.layers:
                for name in layer.regularized:
                    layer.grads[name] += net.reg * layer.params[name]
        loss = sum(part * size for part, size in zip(losses, sizes, strict=True)) / n
        scores = np.concatenate([scores0] + [w.views["scores"][:size]
                                             for w, size in zip(self.workers, sizes[1:], strict=True)])
        return loss + net.reg_loss(), scores, net.grads


def _release(segment) -> None:
    try:
        segment.close()
        segment.unlink()
    except (FileNotFoundError, BufferError):
        pass
