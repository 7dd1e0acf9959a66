"""``grpc.health.v1.Health`` that cannot stall gRPC's polling thread, whatever watchers do.

Why not grpc's own servicer: it sends to watchers while holding its lock (``Watch`` sends the first status
under it, ``set`` every update). A send waits until gRPC's single polling thread has processed the send's
completion, and that same thread runs the close callback of every call that ends -- which, for a watcher,
takes the lock. A watcher that leaves while another one is being answered therefore stalls the polling
thread for good: ``Check`` stops answering and the drain never ends (seen as "drain hung" with watchers
opened and cancelled at a high rate).

Here the servicer's lock only guards its maps and is never held across a send. Each watcher has its own
lock, which serializes its sends (gRPC allows one send in flight per call) and which the polling thread
never takes. Updates after the first are sent from short-lived daemon threads, so neither the drain nor a
status change waits for a slow or departed watcher.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("fpedit.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def runner_readiness(runner: Any) -> tuple[bool, str]:
    """(can serve, why not) of a runner that reports it (``readiness()``, answered from memory); a local
    runner always can. gRPC health and HTTP ``/readyz`` both follow it."""
    readiness = getattr(runner, "readiness", None)
    return (True, "") if readiness is None else readiness()


class _Watcher:
    """One Watch call: how to send to it, and the last status sent (sends are serialized by ``lock``)."""

    def __init__(self, send: Callable[[Any], Any], service: str) -> None:
        self.send = send
        self.service = service
        self.lock = threading.Lock()
        self.sent: int | None = None


#: Health calls run on threads of their own, so that a server whose handler threads are all busy with work
#: (a burst larger than its admission, a slow runner) still answers probes in milliseconds. Check never
#: blocks; Watch only while its first status is sent.
_CHECK_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fpedit-health-check")
_WATCH_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fpedit-health-watch")


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Check and Watch over per-service statuses; :meth:`set` and :meth:`enter_graceful_shutdown` as grpc's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the maps below; never held while sending
        self._status: dict[str, int] = {"": SERVING}
        self._watchers: dict[str, set[_Watcher]] = {}
        self._shutting_down = False

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    Check.experimental_thread_pool = _CHECK_POOL  # type: ignore[attr-defined]

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], Any] | None = None,
    ) -> None:
        if send_response_callback is None:  # registered below as non-blocking: gRPC always passes one
            context.abort(grpc.StatusCode.INTERNAL, "health Watch needs a non-blocking server")
        watcher = _Watcher(send_response_callback, request.service)
        with self._lock:
            self._watchers.setdefault(request.service, set()).add(watcher)
        if not context.add_callback(lambda: self._forget(watcher)):
            self._forget(watcher)  # the call ended before we registered: nobody to answer
            return
        self._push(watcher)  # the current status, from this handler thread (no servicer lock held)

    # The handler returns at once and sends later through the callback (grpc's non-blocking streaming).
    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]
    Watch.experimental_thread_pool = _WATCH_POOL  # type: ignore[attr-defined]

    def set(self, service: str, status: int) -> None:
        """Set a service's status and tell its watchers (in the background); ignored after shutdown began."""
        with self._lock:
            if self._shutting_down:
                return
            self._status[service] = status
            watchers = list(self._watchers.get(service, ()))
        self._notify(watchers)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; later :meth:`set` calls are ignored."""
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            for service in self._status:
                self._status[service] = NOT_SERVING
            watchers = [w for group in self._watchers.values() for w in group]
        self._notify(watchers)

    @property
    def watchers(self) -> int:
        """Watch calls currently open."""
        with self._lock:
            return sum(len(group) for group in self._watchers.values())

    # --- plumbing -------------------------------------------------------------------------------------------

    def _forget(self, watcher: _Watcher) -> None:
        """Close callback (runs on gRPC's polling thread): only the map lock, held briefly."""
        with self._lock:
            group = self._watchers.get(watcher.service)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._watchers[watcher.service]

    def _push(self, watcher: _Watcher) -> None:
        """Send the service's current status unless the watcher has it already. Reading the status under the
        watcher's lock makes the last send carry the newest status, whatever order updates raced in."""
        with watcher.lock:
            with self._lock:
                status = self._status.get(watcher.service, SERVICE_UNKNOWN)
            if status == watcher.sent:
                return
            watcher.sent = status
            try:
                watcher.send(health_pb2.HealthCheckResponse(status=status))
            except Exception:  # a watcher that left mid-send: nothing to tell it
                log.debug("health watch send failed", exc_info=True)

    def _notify(self, watchers: list[_Watcher]) -> None:
        for watcher in watchers:
            threading.Thread(target=self._push, args=(watcher,), name="fpedit-health", daemon=True).start()
