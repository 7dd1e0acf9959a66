"""One process-wide discipline for CUDA graph capture: :data:`CAPTURE_GATE`.

CUDA allows one stream capture at a time to coexist with other work only under strict rules: nothing may
synchronize the device or the context (``torch.cuda.synchronize()`` from *any* thread invalidates a capture in
progress, and so does ``cudaDeviceSynchronize`` inside TensorRT when it is handed the default stream), and
``torch.cuda.graph`` itself synchronizes and empties the allocator's cache when it begins. PyTorch therefore
allows one capture per process with no other CUDA work beside it. With batching on, the device loop captures
new graph keys (a new batch size, a merged variant, a re-capture after the LRU evicted one) while request
threads run the VAE and text encoder, step their programs and synchronize for stage timings.

The gate is a readers-writer lock over the whole process:

* every CUDA-touching path of the engine holds it **shared** — every :class:`~.base.Backend` entry point
  (``encode_text``, ``encode_image``, ``decode_latents``, ``unet``, ``synchronize``; wrapped automatically for
  every subclass), the executor while a request thread steps its program, and the null-text optimisation;
  many threads may hold it shared at once;
* a capture holds it **exclusive**: it waits until no thread is inside a shared section, and new shared
  sections wait until it is done (waiting captures go first, so a stream of requests cannot starve them).

A thread that holds it shared and then captures (the device loop inside ``Backend.unet``) sets its own shared
holds aside while it waits and captures, and takes them back afterwards: it does no other device work while
it waits, so that is sound, and it cannot deadlock on itself. The rule that keeps the whole deadlock free:
never wait for :meth:`CaptureGate.exclusive` while holding a lock that a shared holder may wait for (the graph
caches take the gate before their own lock).

What the gate does not cover is plain kernel launches and copies outside those paths (a latent divided by the
VAE scale in a request thread): CUDA allows launching onto other streams while a non-blocking stream
captures in ``thread_local`` mode, which is how both graph caches capture.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class CaptureGate:
    """Shared for device work, exclusive for a CUDA graph capture; one per process (:data:`CAPTURE_GATE`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0  # shared holds, all threads together
        self._capturing: int | None = None  # the thread whose capture is in progress
        self._waiting = 0  # captures waiting for the shared holders to leave
        self._local = threading.local()
        #: Exclusive sections entered so far (captures): what tests and the smoke script count.
        self.captures = 0

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def held_shared(self) -> bool:
        """Whether this thread is inside a shared section (or its own capture)."""
        return self._depth() > 0 or self._capturing == threading.get_ident()

    def capturing(self) -> bool:
        """Whether any thread is capturing now."""
        return self._capturing is not None

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Device work that may run beside other device work but never beside a capture."""
        depth = self._depth()
        if depth or self._capturing == threading.get_ident():  # re-entered, or inside our own capture
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._cond:
            while self._capturing is not None or self._waiting:
                self._cond.wait()
            self._shared += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """A capture: no other thread is inside a shared section while this runs."""
        me = threading.get_ident()
        if self._capturing == me:
            yield
            return
        depth = self._depth()
        held = 1 if depth else 0  # a thread counts once in _shared however deeply it nests
        with self._cond:
            self._shared -= held  # this thread does no device work while it waits
            self._waiting += 1
            try:
                while self._capturing is not None or self._shared:
                    self._cond.wait()
            except BaseException:
                self._shared += held
                self._cond.notify_all()
                raise
            finally:
                self._waiting -= 1
            self._capturing = me
            self.captures += 1
        self._local.depth = 0
        try:
            yield
        finally:
            with self._cond:
                self._capturing = None
                self._shared += held
                self._cond.notify_all()
            self._local.depth = depth


#: The process's gate: PyTorch allows one capture per process, so there is exactly one.
CAPTURE_GATE = CaptureGate()


def device_work(fn: F) -> F:
    """Run ``fn`` inside a shared section of :data:`CAPTURE_GATE` (idempotent)."""
    if getattr(fn, "__device_work__", False):
        return fn

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with CAPTURE_GATE.shared():
            return fn(*args, **kwargs)

    wrapper.__device_work__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
