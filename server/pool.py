"""The worker pool and CPU/memory housekeeping of the in-process runner (:mod:`.runner`).

:class:`WorkerPool` bounds running and queued calls (beyond them, :class:`~.errors.OverloadedError`) and
gives the C heap back when it idles; :func:`cpu_threads` shares the cores between workers; and
:func:`device_memory` is the device figure a metrics scrape reads.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import OverloadedError

if TYPE_CHECKING:
    from fpedit.engine import EditEngine

    from .config import ServerConfig

T = TypeVar("T")


class WorkerPool:
    """``workers`` engine threads and at most ``max_queue`` waiting calls; beyond that, OverloadedError."""

    def __init__(self, workers: int, max_queue: int) -> None:
        self.capacity = workers + max_queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fpedit-worker")
        self._pending = 0
        self._running = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        with self._lock:
            if self._pending >= self.capacity:
                raise OverloadedError.busy(self._pending, self.capacity)
            self._pending += 1

        def counted() -> T:
            with self._lock:
                self._running += 1
            try:
                return fn()
            finally:
                with self._lock:
                    self._running -= 1

        future = self._executor.submit(counted)
        future.add_done_callback(self._release)
        return future

    def _release(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1
            idle = self._pending == 0
        if idle:
            trim_heap()

    @property
    def pending(self) -> int:
        """Calls running or queued."""
        with self._lock:
            return self._pending

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A large CPU request (512 px, hundreds of steps) leaves its freed activations in glibc's arenas: RSS stays
    up after it ends, though nothing is held (repeats plateau: an allocator effect, not a leak). Trimming
    when the pool goes idle returns them, at a cost of milliseconds, never during work.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (musl has none)
    except (OSError, AttributeError):
        return None
    return libc


def never_cancelled() -> None:
    return None


def cpu_threads(config: ServerConfig, engine: EditEngine, device: str) -> int | None:
    """Set and return torch's intra-op threads for a CPU engine (``None`` on other devices: untouched).

    torch's setting is process-wide, not per thread, so the share is set once at start-up: without batching
    each of ``workers`` requests computes on its own, so each gets ``cores // workers`` threads; with
    batching one device loop computes every merged call, so it gets every core. ``threads_per_worker``
    overrides both. OMP_NUM_THREADS, when set, caps the default (the operator already chose).
    """
    if device != "cpu":
        return None
    import os

    import torch

    cores = available_cores()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        cores = max(1, min(cores, int(os.environ["OMP_NUM_THREADS"])))
    batching = bool(getattr(getattr(engine, "executor", None), "batching", False))
    threads = config.threads_per_worker or (cores if batching else max(1, cores // config.workers))
    torch.set_num_threads(threads)
    return threads


def device_memory(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    try:
        import torch

        return int(torch.cuda.memory_allocated(device))
    except Exception:  # metrics must never fail a scrape
        return None
