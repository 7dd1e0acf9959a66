"""The front's runner: the servicer's calls go to the Serve deployment's replicas through its handle."""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from fpedit.engine import ProgressEvent
from fpedit.engine.errors import CancelledError

from ..errors import OverloadedError, UnavailableError, UnimplementedError
from ..results import EditOutcome, GenerateOutcome, InfoOutcome, InvertOutcome
from ..runner import EditCall, GenerateCall, InvertCall, RunnerStats
from ..streaming import stream_of
from .errors import ReplicaError, translate
from .watch import ServiceWatch

log = logging.getLogger("fpedit.server")

#: How often a waiting front checks its request's cancellation and deadline.
CANCEL_POLL_S = 0.1
#: How long a job's submit waits for a replica to judge it; past it (every replica busy) it is queued
#: unjudged, and a bad request then fails as its job runs.
CHECK_TIMEOUT_S = 5.0
#: Checks one front has at replicas at once; a submit beyond them is let through unjudged at once, so that a
#: burst of submits neither holds handler threads nor takes the Serve queue's slots from admitted calls.
MAX_CHECKS = 4


def _cancel_quietly(stream: Any) -> None:
    """Stop a Serve stream the caller no longer reads. Cancelling a stream whose request failed raises that
    failure again (a refused request raises its BackPressureError): the caller already has its outcome, so
    that must not replace it (it turned a refusal for load into INTERNAL)."""
    try:
        stream.cancel()
    except Exception as exc:
        log.debug("cancelling a Serve stream raised %s", type(exc).__name__)


# --- the front's runner -------------------------------------------------------------------------------------


class RayRunner:
    """A runner (see :mod:`fpedit.server.runner`) whose calls go to the Serve deployment's replicas."""

    def __init__(
        self,
        handle: Any,
        store: Any | None = None,
        *,
        max_running: int | None = None,
        max_queue: int | None = None,
        watch: ServiceWatch | None = None,
    ) -> None:
        """``max_running`` (replicas x requests each) and ``max_queue`` bound the calls this front has in
        flight: beyond their sum a call is refused at once (RESOURCE_EXHAUSTED), as the local runner's queue
        does, so handler threads never pile up behind Serve; GetInfo reports the same two figures.
        ``watch`` (live replicas, the store) is what health and ``/readyz`` report; without one, SERVING."""
        self.handle = handle
        self.store = store
        self.watch = watch
        self.max_running = max_running
        self.max_queue = max_queue
        self.capacity = None if max_running is None else max_running + (max_queue or 0)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._checks = threading.BoundedSemaphore(MAX_CHECKS)

    def _enter(self, admit: bool = True) -> None:
        with self._lock:
            if admit and self.capacity is not None and self._in_flight >= self.capacity:
                raise OverloadedError.busy(self._in_flight, self.capacity)
            self._in_flight += 1

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # --- plumbing -------------------------------------------------------------------------------------------

    def _routed(self, inversion_id: str) -> Any:
        return self.handle.options(multiplexed_model_id=inversion_id)

    def _wait(
        self, send: Callable[[], Any], cancel_check: Callable[[], None] | None, admit: bool = True
    ) -> Any:
        """Send a call and return its result; polls ``cancel_check`` meanwhile (cancelling the replica's work
        when it raises). A call whose replica died is sent once more: Serve routes it to a live replica, and
        every call is safe to repeat (an edit is a pure function of its inputs; a new id is reused)."""
        self._enter(admit)
        try:
            for attempt in (1, 2):
                response = send()
                try:
                    result = self._result(response, cancel_check)
                except UnavailableError:
                    if attempt == 2:
                        raise
                    log.warning("a replica died during a call; sending it again")
                    continue
                if isinstance(result, ReplicaError):
                    raise result.unwrap()
                return result
            raise AssertionError("unreachable")
        finally:
            self._leave()

    @staticmethod
    def _result(response: Any, cancel_check: Callable[[], None] | None) -> Any:
        while True:
            try:
                return response.result(timeout_s=CANCEL_POLL_S)
            except TimeoutError:
                pass
            except Exception as exc:
                raise translate(exc) from None
            if cancel_check is not None:
                try:
                    cancel_check()
                except CancelledError:
                    response.cancel()
                    raise

    # --- calls ----------------------------------------------------------------------------------------------

    def check(self, call: EditCall | GenerateCall | InvertCall) -> None:
        """A replica's refusals of ``call`` without running it (the front has no engine): an edit by id goes
        to the replica holding it. When no replica can answer within :data:`CHECK_TIMEOUT_S` (all busy, the
        queue full, a replica lost), when every replica slot is taken by calls this front admitted, or when
        :data:`MAX_CHECKS` checks are out already, the call is let through: it is judged again when it runs."""
        if self.max_running is not None and self.in_flight >= self.max_running:
            log.info("every replica slot is busy; a job is checked when it runs")
            return
        if not self._checks.acquire(blocking=False):
            log.info("%d job checks out already; this job is checked when it runs", MAX_CHECKS)
            return
        try:
            self._check(call)
        finally:
            self._checks.release()

    def _check(self, call: EditCall | GenerateCall | InvertCall) -> None:
        by_id = isinstance(call, EditCall) and call.inversion_id
        routed = self._routed(call.inversion_id) if by_id else self.handle
        response = routed.check.remote(call)
        try:
            result = response.result(timeout_s=CHECK_TIMEOUT_S)
        except TimeoutError:
            _cancel_quietly(response)
            log.info(
                "no replica free to check a job within %.0f s; it is checked when it runs", CHECK_TIMEOUT_S
            )
            return
        except Exception as exc:
            error = translate(exc)
            if isinstance(error, OverloadedError | UnavailableError):
                log.info("a job could not be checked now (%s); it is checked when it runs", error)
                return
            raise error from None
        if isinstance(result, ReplicaError):
            raise result.unwrap()

    def edit(
        self,
        call: EditCall,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        cancel_check: Callable[[], None] | None = None,
    ) -> EditOutcome:
        if progress is not None:  # progress comes back only on a stream (a job's edit)
            # A replica that dies mid-stream: the call is sent once more, as a unary call is (progress then
            # starts again from the first step; a caller of edit_stream sees the error instead).
            for attempt in (1, 2):
                try:
                    for item in self.edit_stream(call, cancel_check=cancel_check):
                        if isinstance(item, ProgressEvent):
                            progress(item)
                        else:
                            return item
                    raise UnavailableError("the replica's stream ended without a result; retry")
                except UnavailableError:
                    if attempt == 2:
                        raise
                    log.warning("a replica died during a call; sending it again")
        new_id = "" if call.inversion_id else uuid.uuid4().hex
        routed = self._routed(call.inversion_id or new_id)
        return self._wait(lambda: routed.edit.remote(call, new_id), cancel_check)

    def edit_stream(
        self, call: EditCall, *, cancel_check: Callable[[], None] | None = None
    ) -> Iterator[ProgressEvent | EditOutcome]:
        new_id = "" if call.inversion_id else uuid.uuid4().hex
        self._enter()  # before anything is sent: a refused call costs the replicas nothing
        try:
            yield from self._stream_events(call, new_id, cancel_check)
        finally:
            self._leave()

    def _stream_events(
        self, call: EditCall, new_id: str, cancel_check: Callable[[], None] | None
    ) -> Iterator[ProgressEvent | EditOutcome]:
        stream = (
            self._routed(call.inversion_id or new_id).options(stream=True).edit_stream.remote(call, new_id)
        )

        ended = threading.Event()  # Serve's stream is over (finished or failed): nothing left to cancel

        def produce(emit: Callable[[object], None]) -> None:  # Serve's stream blocks between items
            try:
                for item in stream:
                    emit(item)
            except Exception as exc:
                raise translate(exc) from None
            finally:
                ended.set()

        def check() -> None:  # the caller's cancel check: while the replica is silent, and between items
            if cancel_check is not None:
                cancel_check()

        finished = False
        try:
            for item in stream_of(produce, idle=check, poll_s=CANCEL_POLL_S, name="fpedit-ray-stream"):
                if isinstance(item, ReplicaError):
                    finished = True
                    raise item.unwrap()
                if item is None:  # produce returned: the replica's stream ended
                    finished = True
                    return
                check()  # progress may never pause for a poll: a deadline must still be noticed
                yield item
        finally:
            if not finished and not ended.is_set():  # cancelled, past its deadline, or the consumer left
                _cancel_quietly(stream)

    def generate(
        self,
        call: GenerateCall,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        cancel_check: Callable[[], None] | None = None,
    ) -> GenerateOutcome:
        return self._wait(lambda: self.handle.generate.remote(call), cancel_check)

    def invert(
        self,
        call: InvertCall,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        cancel_check: Callable[[], None] | None = None,
    ) -> InvertOutcome:
        new_id = uuid.uuid4().hex
        routed = self._routed(new_id)
        return self._wait(lambda: routed.invert.remote(call, new_id), cancel_check)

    def attention_maps(self, prompt: str, **maps_options: Any) -> Any:
        """Not served over Ray (the replicas run edits; a maps call would need its own routing and result
        transport): refused as UNIMPLEMENTED, which the HTTP front answers as 501 like any other error."""
        raise UnimplementedError(
            "attention maps are served by the local runner only (fpedit serve without --ray); "
            "use `fpedit maps` for this model"
        )

    def info(self) -> InfoOutcome:
        info = self._wait(lambda: self.handle.info.remote(), None, admit=False)
        if self.max_running is None:
            return info
        # The front's admission, not one replica's runner.
        limits = dataclasses.replace(info.limits, workers=self.max_running, max_queue=self.max_queue or 0)
        return dataclasses.replace(info, limits=limits)

    def replica_stats(self) -> list[dict[str, Any]]:
        """Every live replica's figures (a control-plane broadcast; not for the request path)."""
        return list(self.handle.broadcast("stats").results(timeout_s=10))

    def stats(self) -> RunnerStats:
        """Load and cache figures summed over replicas (the front's metrics endpoint reads them)."""
        try:
            replicas = self.replica_stats()
        except Exception:  # a scrape must not fail while replicas restart
            replicas = []
        return sum_replica_stats(replicas, self.in_flight)

    def readiness(self) -> tuple[bool, str]:
        """(can serve, why not) from the service watch's last probe (the servicer's health follows it)."""
        return (True, "") if self.watch is None else self.watch.readiness()

    def metric_families(self) -> list[Any]:
        """Replicas alive and store restarts for the front's /metrics (empty without a watch)."""
        return [] if self.watch is None else self.watch.metric_families()

    @property
    def in_flight(self) -> int:
        """Calls this front has sent and not yet had answered."""
        with self._lock:
            return self._in_flight

    def close(self) -> None:
        """Nothing to stop here: the application's owner deletes it (``RayService.close``)."""


def sum_replica_stats(replicas: list[dict[str, Any]], front_in_flight: int = 0) -> RunnerStats:
    """One :class:`RunnerStats` from every replica's figures: counts add up, calls per batch size merge by
    size; calls the front has in flight that no replica reports yet count as queued."""
    counts = {
        f.name: 0
        for f in dataclasses.fields(RunnerStats)
        if f.name not in ("device_memory_bytes", "backend_batch_rows")
    }
    batch_rows: Counter[int] = Counter()
    for figures in replicas:
        for name in counts:
            counts[name] += int(figures.get(name) or 0)
        for rows, calls in figures.get("backend_batch_rows") or ():
            batch_rows[int(rows)] += int(calls)
    counts["queued"] += max(0, front_in_flight - counts["running"] - counts["queued"])
    return RunnerStats(**counts, backend_batch_rows=tuple(sorted(batch_rows.items())))
