"""Runs step programs (:mod:`.programs`) on a backend: one alone, or many sharing backend calls.

:meth:`Executor.run` drives one program in the caller's thread. Without batching each call goes straight to
the backend (cut into pieces of at most ``max_batch`` rows). With batching, calls go to one *device loop*
thread that takes the pending calls of every running program, merges the compatible ones up to
``max_batch`` rows (:meth:`UNetCall.merge`), runs one backend call and hands each program its rows back:
continuous batching, as vLLM does for tokens. Calls that arrive while the device is busy form the next
batch; ``max_wait_ms`` may hold a partial batch open a little for more. A failing merged call is retried
call by call, so an error fails only the request whose call caused it, and the loop itself never dies.

Calls of different LoRA adapter sets share a backend call with ``adapter_batching="mix"`` (each row keeps its
set's scales, see :mod:`.adapters`), but only to fill rows that calls of the oldest call's own set leave
free: every row of a mixed call pays the LoRA work of every adapter in it. ``"group"`` never mixes sets.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from .adapters import ADAPTER_BATCHING, DEFAULT_ADAPTER_BATCHING, resolve_adapter_batching
from .backends.base import Backend
from .backends.capture import CAPTURE_GATE
from .calls import UNetCall, UNetResult
from .programs import Program, Step

T = TypeVar("T")
Item = TypeVar("Item")

#: Longest the device loop waits for a running program's next call before running a batch without it.
STRAGGLER_WAIT_S = 0.05


@dataclass(frozen=True)
class ProgressEvent:
    """Reported once per UNet step of a stage; a callback that raises stops the work."""

    stage: str  # "inversion", "source_capture", "denoise"
    step: int  # 1-based count of completed steps in this stage
    total: int


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], None]


class RequestRun:
    """One request's bookkeeping: stage wall times (device-synchronized), its UNet rows and the backend
    calls they rode in, progress (callback and optional tqdm bars) and cancellation checks."""

    def __init__(
        self,
        backend: Backend,
        progress: ProgressCallback | None = None,
        cancel_check: CancelCheck | None = None,
        show_progress: bool = False,
        adapters: tuple[tuple[str, float], ...] = (),
    ) -> None:
        self.backend = backend
        #: The request's LoRA adapters: stamped on each of its UNet calls and used for its text encodes.
        self.adapters = tuple(adapters)
        self.progress = progress
        self.cancel_check = cancel_check
        self.show_progress = show_progress
        self.stages_ms: dict[str, float] = {}
        self.unet_rows = 0
        self.unet_calls = 0
        self.started = time.perf_counter()
        self._bars: dict[str, Any] = {}

    def check(self) -> None:
        """Raise (the caller's :class:`~fpedit.engine.errors.CancelledError`) if the request should stop."""
        if self.cancel_check is not None:
            self.cancel_check()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (checked for cancellation before it starts)."""
        self.check()
        self.backend.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.backend.synchronize()
            self.add_time(name, (time.perf_counter() - t0) * 1e3)

    def add_time(self, name: str, ms: float) -> None:
        self.stages_ms[name] = self.stages_ms.get(name, 0.0) + ms

    def step_done(self, step: Step) -> None:
        stage = step.progress_stage
        if self.show_progress:
            bar = self._bars.get(stage)
            if bar is None:
                from tqdm.auto import tqdm

                bar = self._bars[stage] = tqdm(total=step.total, desc=stage, unit="step", leave=False)
            bar.n = step.index
            bar.refresh()
            if step.index >= step.total:
                self._bars.pop(stage).close()
        if self.progress is not None:
            self.progress(ProgressEvent(stage, step.index, step.total))

    def close_bars(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def count_unet(self, rows: int, calls: int) -> None:
        """Count UNet work of this request: ``rows`` rows that rode in ``calls`` backend calls (0 for rows
        evaluated outside the backend's entry points: the null-text optimisation's gradient forwards)."""
        self.unet_rows += rows
        self.unet_calls += calls

    def absorb(self, stats: dict[str, Any]) -> None:
        """Count an earlier part of the same request (a real edit's inversion) in this one's figures."""
        self.count_unet(stats["unet_rows"], stats["unet_calls"])
        self.started -= stats["total_ms"] / 1e3
        for name, ms in stats["stages_ms"].items():
            self.add_time(name, ms)

    def stats(self, **extra: Any) -> dict[str, Any]:
        return {
            "unet_rows": self.unet_rows,
            "unet_calls": self.unet_calls,
            "stages_ms": dict(self.stages_ms),
            "total_ms": (time.perf_counter() - self.started) * 1e3,
            **extra,
        }


class Counters:
    """Cumulative backend-call figures of one executor: calls, rows, and how many calls had each size."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.unet_calls = 0
        self.unet_rows = 0
        self.batch_rows: Counter[int] = Counter()

    def record(self, rows: int) -> None:
        with self._lock:
            self.unet_calls += 1
            self.unet_rows += rows
            self.batch_rows[rows] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "unet_calls": self.unet_calls,
                "unet_rows": self.unet_rows,
                "batch_rows": dict(sorted(self.batch_rows.items())),
                "mean_rows_per_call": self.unet_rows / self.unet_calls if self.unet_calls else 0.0,
            }


def take_batch(
    pending: list[Item],
    call_of: Callable[[Item], UNetCall],
    backend: Backend,
    max_rows: int,
    mix_adapters: bool = False,
) -> list[Item]:
    """Remove and return the oldest pending item and every later one that can share its backend call
    (pairwise :meth:`Backend.can_share_call`), in arrival order, up to ``max_rows`` rows. With
    ``mix_adapters``, calls of other adapter sets may join, after every call of the oldest one's set."""
    first = call_of(pending[0])
    later = pending[1:]
    if mix_adapters:  # stable: the oldest one's set first, then the rest in arrival order
        later = sorted(later, key=lambda item: not first.same_adapters(call_of(item)))
    batch = [pending[0]]
    rows = first.rows
    for item in later:
        call = call_of(item)
        if rows + call.rows <= max_rows and all(
            backend.can_share_call(call_of(b), call, mix_adapters) for b in batch
        ):
            batch.append(item)
            rows += call.rows
    taken = {id(item) for item in batch}
    batch = [item for item in pending if id(item) in taken]
    pending[:] = [item for item in pending if id(item) not in taken]
    return batch


@dataclass(eq=False)
class _Pending:
    """A call waiting for the device loop, and where its result or error goes."""

    call: UNetCall
    step: int  # which program step submitted it (a step's pieces share it)
    done: threading.Event = field(default_factory=threading.Event)
    result: UNetResult | None = None
    error: BaseException | None = None


class Executor:
    """Runs programs on ``backend``, alone or (``batching=True``) merged across concurrent requests
    (``adapter_batching``: whether calls of different adapter sets may share a backend call)."""

    def __init__(
        self,
        backend: Backend,
        *,
        batching: bool = False,
        max_wait_ms: float = 0.0,
        adapter_batching: str = DEFAULT_ADAPTER_BATCHING,
    ) -> None:
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if adapter_batching not in ADAPTER_BATCHING:
            raise ValueError(f"adapter_batching must be one of {ADAPTER_BATCHING}, got {adapter_batching!r}")
        self.backend = backend
        self.batching = batching
        self.max_wait_s = max_wait_ms / 1e3
        self.adapter_batching = resolve_adapter_batching(
            adapter_batching, getattr(backend, "graphs", None) is not None
        )
        self.counters = Counters()
        self._pending: list[_Pending] = []
        self._wake = threading.Condition()
        self._loop: threading.Thread | None = None
        self._closed = False
        self._active = 0  # programs inside run() (batching): the calls the next batch may still get
        self._steps = 0
        self._last_call_s = 0.0

    # --- one program ----------------------------------------------------------------------------------------

    def run(self, program: Program[T], run: RequestRun) -> T:
        """Drive ``program`` to its end in this thread and return its outcome. Stage times are taken at
        stage changes (one device synchronization per stage, not per step)."""
        stage, started = None, 0.0
        self._enter()
        try:
            # A program's own steps touch the device (scheduler updates on device latents): never beside a
            # capture. The gate is held only while the program computes, never while its call waits for
            # the device loop (which may be capturing).
            with CAPTURE_GATE.shared():
                step = next(program)
            while True:
                if step.stage != stage:
                    if stage is not None:
                        self.backend.synchronize()
                        run.add_time(stage, (time.perf_counter() - started) * 1e3)
                    stage, started = step.stage, time.perf_counter()
                run.check()
                result = self._call(step.call, run)
                run.step_done(step)
                with CAPTURE_GATE.shared():
                    step = program.send(result)
        except StopIteration as finished:
            return finished.value
        finally:
            self._leave()
            program.close()
            run.close_bars()
            if stage is not None:
                self.backend.synchronize()
                run.add_time(stage, (time.perf_counter() - started) * 1e3)

    def _call(self, call: UNetCall, run: RequestRun) -> UNetResult:
        if run.adapters and call.adapters != run.adapters:
            call = replace(call, adapters=run.adapters)
        pieces = call.split(self.backend.max_batch)
        results = self._submit(pieces) if self.batching else [self._execute(piece) for piece in pieces]
        run.count_unet(call.rows, len(pieces))
        return UNetResult.cat(results)

    def _execute(self, call: UNetCall) -> UNetResult:
        """One backend call, counted; noise handed on as float32."""
        result = self.backend.unet(call)
        self.counters.record(call.rows)
        if result.noise is not None and result.noise.dtype != torch.float32:
            result = replace(result, noise=result.noise.float())
        return result

    def _execute_isolated(self, calls: Sequence[UNetCall]) -> list[UNetResult | BaseException]:
        """Run ``calls`` as one merged backend call; if that fails, call by call, so an error lands only
        on the call that causes it."""
        try:
            return list(self._execute(UNetCall.merge(calls)).split(calls))
        except Exception as exc:
            if len(calls) == 1:
                return [exc]
        outcomes: list[UNetResult | BaseException] = []
        for call in calls:
            try:
                outcomes.append(self._execute(call))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    # --- the device loop ------------------------------------------------------------------------------------

    def _enter(self) -> None:
        if self.batching:
            with self._wake:
                self._active += 1

    def _leave(self) -> None:
        if self.batching:
            with self._wake:
                self._active -= 1
                self._wake.notify_all()

    def _submit(self, calls: Sequence[UNetCall]) -> list[UNetResult]:
        with self._wake:
            self._steps += 1
            items = [_Pending(call, self._steps) for call in calls]
            if self._closed:
                raise RuntimeError("the engine's executor is closed")
            if self._loop is None:
                self._loop = threading.Thread(
                    target=self._device_loop, name="fpedit-device-loop", daemon=True
                )
                self._loop.start()
            self._pending.extend(items)
            self._wake.notify_all()
        for item in items:
            item.done.wait()
        for item in items:
            if item.error is not None:
                raise item.error
        return [item.result for item in items]  # type: ignore[misc]

    def _device_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            try:
                outcomes = self._execute_isolated([item.call for item in batch])
            except BaseException as exc:  # never leave a request waiting, whatever happened
                outcomes = [exc] * len(batch)
            self._last_call_s = time.perf_counter() - started
            for item, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    item.error = outcome
                else:
                    item.result = outcome
                item.done.set()

    def _next_batch(self) -> list[_Pending] | None:
        """The next batch, once the oldest pending call has company or cannot expect any more.

        Running programs whose next call is not pending yet are between steps (a few host operations), so
        the loop waits for them up to half the last backend call (at most :data:`STRAGGLER_WAIT_S`):
        without that, two requests fall into lockstep, each call running while the other's is being
        prepared, and never share a call. ``max_wait_ms`` may hold a partial batch open longer.
        """
        max_rows = self.backend.max_batch
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            if not self._pending:
                return None
            now = time.monotonic()
            stragglers_until = now + min(STRAGGLER_WAIT_S, 0.5 * self._last_call_s)
            fill_until = now + self.max_wait_s
            while not self._closed and sum(p.call.rows for p in self._pending) < max_rows:
                now = time.monotonic()
                until = fill_until
                if len({p.step for p in self._pending}) < self._active:
                    until = max(until, stragglers_until)
                if until <= now:
                    break
                self._wake.wait(until - now)
            mix = self.adapter_batching == "mix"
            return take_batch(self._pending, lambda p: p.call, self.backend, max_rows, mix)

    def close(self) -> None:
        """Stop the device loop once the calls already queued have run."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._loop is not None:
            self._loop.join()
