"""Scale out on Ray Serve: fpedit's own gRPC front over a Serve deployment of engine replicas.

Why this shape: clients keep ``fpedit.v1.EditService`` exactly as the standalone server speaks it -- the
``grpc.health.v1`` service, reflection, the bearer-token interceptor, TLS, the status codes and the drain
all come from ``app.build_server``. Ray Serve's own gRPC proxy has none of those (no health service, no
server interceptors or TLS of ours), so the front is fpedit's server with a :class:`RayRunner` in place of
the in-process runner; the runner calls Serve deployment handles.

- :class:`EditReplica` is the deployment: one engine per replica (one GPU each with
  ``ray_actor_options={"num_gpus": 1}``), wrapping a :class:`~fpedit.server.runner.LocalRunner` (worker pool,
  inversion cache) over an engine with the batching device loop (``--no-batching`` turns it off).
- **Affinity** is Serve model multiplexing with the inversion id as the multiplexed model id. The front makes
  the id of a new inversion itself (Invert, or Edit with an image) and sends that call with
  ``multiplexed_model_id=id``, so the replica that inverts becomes the id's holder and Serve routes later
  edits by that id to it.
- **Never required for correctness**: every new inversion is also put in the shared
  :mod:`~fpedit.server.ray_store` (bounded by bytes and age). A replica asked for an id it does not hold
  (holder scaled down, restarted, evicted) rebuilds the inversion from the store; the first edit recomputes
  the source maps from the trajectory, so the result is the same as on the holder.
- Errors cross the Ray boundary by value (:class:`ReplicaError`) and come back out of the runner as the same
  fpedit errors a :class:`~fpedit.server.runner.LocalRunner` raises, so the servicer maps them to the same
  status codes. A full Serve queue (``max_queued_requests``) is RESOURCE_EXHAUSTED; a replica that dies
  mid-request is UNAVAILABLE (retry).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import queue
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fpedit.engine import ProgressEvent
from fpedit.engine.config import EngineConfig
from fpedit.engine.errors import (
    CancelledError,
    InvalidInputError,
    NotFoundError,
)
from fpedit.v1 import edit_pb2 as pb

from .config import ServerConfig
from .errors import OverloadedError, UnavailableError
from .outcomes import CLIENT_ERRORS, is_out_of_memory
from .ray_store import (
    DEFAULT_STORE_BYTES,
    DEFAULT_STORE_TTL_S,
    STORE_NAME,
    STORE_NAMESPACE,
    engine_fingerprint,
    inversion_from_record,
    open_store,
    record_from_inversion,
)
from .runner import (
    EditCall,
    GenerateCall,
    InvertCall,
    LocalRunner,
    RunnerStats,
    progress_event,
    progress_message,
)

log = logging.getLogger("fpedit.server")
T = TypeVar("T")

APP_NAME = "fpedit"
DEPLOYMENT_NAME = "EditReplica"
#: Requests one replica takes at once. With the batching engine, concurrent requests share UNet calls, so
#: this is what lets batches form (the engine's max_batch rows, 8 by default, hold a few requests' rows).
DEFAULT_MAX_ONGOING_REQUESTS = 8
#: Requests the front lets wait for a replica; beyond that a call gets RESOURCE_EXHAUSTED at once.
DEFAULT_MAX_QUEUED_REQUESTS = 64
#: Inversion ids a replica advertises as held (Serve's multiplexing LRU); the bytes are bounded by the
#: replica's inversion cache (``--cache-gib``) and the shared store (``store_gib``).
DEFAULT_MAX_INVERSIONS_PER_REPLICA = 64
#: How often a waiting front checks its request's cancellation and deadline.
CANCEL_POLL_S = 0.1
#: How long ``fpedit serve --ray`` waits for Ray to delete the application when it stops.
CLOSE_TIMEOUT_S = 30.0

RAY_MISSING = "Ray Serve is not installed: pip install 'fpedit[ray]'"


def require_ray() -> None:
    """Raise :class:`InvalidInputError` (one CLI line) when the ``ray`` extra is missing."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise InvalidInputError("ray", RAY_MISSING) from exc


# --- settings -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica needs to build its engine and runner (sent to the replicas by value)."""

    #: The engine every replica loads (pickled to them; ``batching`` on lets a replica's requests merge).
    engine: EngineConfig
    #: Limits of each replica's runner (workers, queue, inversion cache, image and prompt limits).
    server: ServerConfig = field(default_factory=ServerConfig)
    max_inversions: int = DEFAULT_MAX_INVERSIONS_PER_REPLICA
    store_name: str = STORE_NAME
    store_namespace: str = STORE_NAMESPACE
    store_bytes: int = DEFAULT_STORE_BYTES
    store_ttl_s: float = DEFAULT_STORE_TTL_S


def replica_server_config(front: ServerConfig, max_ongoing_requests: int, batching: bool) -> ServerConfig:
    """The replica runner's limits: Serve admits at most ``max_ongoing_requests`` per replica, so the runner
    queue never refuses; with batching every admitted request runs at once so their UNet calls merge."""
    workers = max(front.workers, max_ongoing_requests) if batching else front.workers
    return dataclasses.replace(
        front, host="127.0.0.1", port=0, token=None, tls_cert=None, tls_key=None, metrics_port=None,
        workers=workers, max_queue=max_ongoing_requests,
    )  # fmt: skip


def _build_engine(settings: ReplicaSettings) -> Any:
    from fpedit.args import engine_from_config

    return engine_from_config(settings.engine)


# --- errors across the Ray boundary -------------------------------------------------------------------------


class ReplicaError(Exception):
    """An fpedit error raised in a replica, returned by value and raised again as the same type by the front.

    Returned, not raised: a bad request is an answer, not a replica failure (Serve would log a traceback and
    count an error). By value: fpedit's exception types have constructors pickling cannot always rebuild.
    """

    def __init__(self, kind: str, message: str, field: str = "") -> None:
        super().__init__(kind, message, field)
        self.kind, self.message, self.field = kind, message, field

    @classmethod
    def wrap(cls, exc: BaseException) -> BaseException:
        """The transportable form of ``exc`` (unexpected errors stay as they are: they become INTERNAL)."""
        if isinstance(exc, InvalidInputError):
            return cls("InvalidInputError", exc.reason, exc.field)
        for kind, _ in CLIENT_ERRORS:
            if isinstance(exc, kind):
                return cls(kind.__name__, str(exc))
        if is_out_of_memory(exc):
            return cls("MemoryError", f"out of memory on replica: {exc}")
        return exc

    def unwrap(self) -> BaseException:
        if self.kind == "InvalidInputError":
            return InvalidInputError(self.field, self.message)
        if self.kind == "MemoryError":
            return MemoryError(self.message)
        kinds = {kind.__name__: kind for kind, _ in CLIENT_ERRORS}
        return kinds.get(self.kind, UnavailableError)(self.message)


def _translate(exc: BaseException) -> BaseException:
    """Map what a handle call raised to the error a LocalRunner would have raised."""
    from ray import exceptions as ray_errors
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = exc.cause if isinstance(exc, ray_errors.RayTaskError) else exc
    if isinstance(cause, ReplicaError):
        return cause.unwrap()
    if isinstance(cause, BackPressureError):
        return OverloadedError(f"all replicas busy and the queue is full: {cause}")
    if isinstance(cause, (ray_errors.RayActorError, DeploymentUnavailableError)):
        return UnavailableError("the replica serving this request went away; retry")
    if isinstance(cause, (ray_errors.TaskCancelledError, asyncio.CancelledError)):
        return CancelledError("the request was cancelled")
    return exc


# --- the deployment -----------------------------------------------------------------------------------------


@dataclass
class _Held:
    """What a replica holds for an inversion id: the key of the inversion in its own runner's cache."""

    local_key: str


class EditReplica:
    """One Serve replica: one engine behind a LocalRunner; inversion ids are multiplexed model ids.

    Methods take the front's validated calls and return protobuf responses; they are ``async`` so that up
    to ``max_ongoing_requests`` calls run at once (the engine work runs on threads), which is what lets the
    batching engine merge them.
    """

    def __init__(self, settings: ReplicaSettings) -> None:
        import ray
        from ray import serve
        from ray.serve import metrics

        self.settings = settings
        self.engine = _build_engine(settings)
        self.runner = LocalRunner(self.engine, settings.server)
        self.fingerprint = engine_fingerprint(self.engine.info())
        self.store = open_store(
            settings.store_name, settings.store_namespace, settings.store_bytes, settings.store_ttl_s
        )
        self.name = ray.get_runtime_context().get_actor_name() or "local"
        self._fresh: dict[str, str] = {}  # ids this replica just made, waiting to be registered
        self._threads = ThreadPoolExecutor(
            max_workers=settings.server.workers + settings.server.max_queue + 2,
            thread_name_prefix="fpedit-replica",
        )
        self.restores = 0  # inversions rebuilt from the shared store (affinity misses)
        self.cancelled = 0  # engine calls stopped by a cancel check

        async def load(inversion_id: str) -> _Held:
            return await self._load_inversion(inversion_id)

        # Wired per instance so that the bound on held ids is a setting, not a constant in a decorator.
        self._hold = serve.multiplexed(max_num_models_per_replica=settings.max_inversions)(load)
        self._requests = metrics.Counter(
            "fpedit_replica_requests",
            description="Requests a replica finished, by method and outcome.",
            tag_keys=("method", "outcome"),
        )
        self._restored = metrics.Counter(
            "fpedit_replica_inversion_restores",
            description="Edits by inversion id that rebuilt the inversion from the shared store.",
        )
        self._gauges = {
            name: metrics.Gauge(f"fpedit_replica_{name}", description=doc)
            for name, doc in (
                ("requests_running", "Requests an engine worker of this replica runs now."),
                ("inversion_cache_bytes", "Bytes held by this replica's inversion cache."),
                ("inversion_cache_entries", "Inversions held by this replica's cache."),
            )
        }

    # --- inversions -----------------------------------------------------------------------------------------

    async def _load_inversion(self, inversion_id: str) -> _Held:
        """Multiplexed loader: an id this replica just made, else a rebuild from the shared store.

        An id the store does not know is held as empty rather than raised: Serve logs a loader's exception
        as a model that failed to load (at ERROR, naming the id), while an unknown id is the client's
        mistake; :meth:`_edit_held` answers it with NOT_FOUND."""
        local_key = self._fresh.pop(inversion_id, None)
        if local_key is None:
            try:
                local_key = await asyncio.get_running_loop().run_in_executor(
                    self._threads, self._restore, inversion_id
                )
            except NotFoundError:
                local_key = ""
        return _Held(local_key)

    def _restore(self, inversion_id: str) -> str:
        import ray

        refs = ray.get(self.store.get.remote(inversion_id))
        if refs is None:
            raise NotFoundError(f"inversion_id {inversion_id!r} is unknown or expired; send the image again")
        record = ray.get(refs[0])
        if record.fingerprint != self.fingerprint:
            raise NotFoundError(
                f"inversion_id {inversion_id!r} was made by a different model or precision; send the image again"
            )
        self.restores += 1
        self._restored.inc()
        return self.runner.cache.put(inversion_from_record(self.engine, record))

    async def _adopt(self, inversion_id: str, local_key: str) -> None:
        """Publish a new inversion under the front's id: into the shared store, then held here."""
        inversion = self.runner.cache.get(local_key)
        if inversion is not None:
            record = await asyncio.get_running_loop().run_in_executor(
                self._threads, record_from_inversion, inversion, self.fingerprint
            )
            if not await self.store.put.remote(inversion_id, record):
                log.warning(
                    "inversion %s (%d bytes) exceeds the shared store's budget", inversion_id, record.nbytes
                )
        self._fresh[inversion_id] = local_key
        await self._hold(inversion_id)  # registers the id here: Serve routes its edits to this replica

    def _edit_held(self, call: EditCall, held: _Held, **kw: Any) -> pb.EditResponse:
        if not held.local_key:  # unknown when first asked for: look again (NotFoundError if still unknown)
            held.local_key = self._restore(call.inversion_id)
        try:
            return self.runner.edit(dataclasses.replace(call, inversion_id=held.local_key), **kw)
        except NotFoundError:  # this replica's cache evicted it since: rebuild from the store
            held.local_key = self._restore(call.inversion_id)
            return self.runner.edit(dataclasses.replace(call, inversion_id=held.local_key), **kw)

    # --- calls ----------------------------------------------------------------------------------------------

    async def _call(self, method: str, work: Callable[..., Any]) -> Any:
        """Run ``work(cancel_check=...)`` and publish the outcome; cancellation by the front stops the engine."""
        stop = threading.Event()

        def cancel_check() -> None:
            if stop.is_set():
                raise CancelledError("the front cancelled the request")

        outcome = "ok"
        try:
            return await work(cancel_check)
        except asyncio.CancelledError:
            stop.set()
            outcome = "cancelled"
            raise
        except Exception as exc:
            outcome = type(exc).__name__
            wrapped = ReplicaError.wrap(exc)
            if wrapped is exc:
                raise  # a bug: Serve logs it with its traceback, the front answers INTERNAL
            return wrapped  # a client's mistake or an overload: an answer, not a replica failure
        finally:
            self._requests.inc(tags={"method": method, "outcome": outcome})
            self._publish_gauges()

    def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        def run() -> T:
            try:
                return fn(*args, **kwargs)
            except CancelledError:
                self.cancelled += 1  # the engine stopped on the front's cancellation or deadline
                raise

        return asyncio.get_running_loop().run_in_executor(self._threads, run)

    async def edit(
        self, call: EditCall, new_id: str, progress: Callable[[ProgressEvent], None] | None = None
    ) -> pb.EditResponse:
        """Edit by id (routed here by the id) or by image (``new_id`` names the new inversion)."""

        async def work(cancel_check: Callable[[], None]) -> pb.EditResponse:
            kw = {"progress": progress, "cancel_check": cancel_check}
            if call.inversion_id:
                held = await self._hold(call.inversion_id)
                response = await self._in_thread(self._edit_held, call, held, **kw)
                response.inversion_id = call.inversion_id
            else:
                response = await self._in_thread(self.runner.edit, call, **kw)
                if response.inversion_id:  # "": too big for the cache, so it has no id to route by
                    await self._adopt(new_id, response.inversion_id)
                    response.inversion_id = new_id
            self._mark(response.stats)
            return response

        return await self._call("edit", work)

    async def edit_stream(self, call: EditCall, new_id: str):
        """Progress events per step, then the result (``handle.options(stream=True)``)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[pb.EditEvent] = asyncio.Queue()

        def progress(event: ProgressEvent) -> None:
            message = progress_message(event)
            loop.call_soon_threadsafe(events.put_nowait, message)

        task = asyncio.ensure_future(self.edit(call, new_id, progress))
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                break
            result = task.result()
            yield result if isinstance(result, ReplicaError) else pb.EditEvent(result=result)
        finally:
            if not task.done():
                task.cancel()  # the caller went away: stop the engine

    async def generate(self, call: GenerateCall) -> pb.GenerateEditResponse:
        async def work(cancel_check: Callable[[], None]) -> pb.GenerateEditResponse:
            response = await self._in_thread(self.runner.generate, call, cancel_check=cancel_check)
            self._mark(response.stats)
            return response

        return await self._call("generate", work)

    async def invert(self, call: InvertCall, new_id: str) -> pb.InvertResponse:
        async def work(cancel_check: Callable[[], None]) -> pb.InvertResponse:
            response = await self._in_thread(self.runner.invert, call, cancel_check=cancel_check)
            await self._adopt(new_id, response.inversion_id)  # the runner refused one too big to keep
            response.inversion_id = new_id
            self._mark(response.stats)
            return response

        return await self._call("invert", work)

    async def info(self) -> pb.GetInfoResponse:
        return self.runner.info()

    async def stats(self) -> dict[str, Any]:
        """This replica's load and cache figures (the front sums them over replicas)."""
        import torch

        counters = getattr(self.engine, "counters", None)
        return {
            "name": self.name,
            "torch_threads": torch.get_num_threads(),
            # The engine's backend calls: ``batch_rows`` shows whether concurrent requests merged.
            "engine": counters() if counters is not None else {},
            "restores": self.restores,
            "cancelled": self.cancelled,
            **dataclasses.asdict(self.runner.stats()),
        }

    def _mark(self, stats: pb.Stats) -> None:
        if "replica" in pb.Stats.DESCRIPTOR.fields_by_name:
            stats.replica = self.name

    def _publish_gauges(self) -> None:
        stats = self.runner.stats()
        self._gauges["requests_running"].set(stats.running)
        self._gauges["inversion_cache_bytes"].set(stats.cache_bytes)
        self._gauges["inversion_cache_entries"].set(stats.cache_entries)

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


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
    ) -> None:
        """``max_running`` (replicas x requests each) and ``max_queue`` bound the calls this front has in
        flight: beyond their sum a call is refused at once (RESOURCE_EXHAUSTED), as the local runner's queue
        does, so handler threads never pile up behind Serve; GetInfo reports the same two figures."""
        self.handle = handle
        self.store = store
        self.max_running = max_running
        self.max_queue = max_queue
        self.capacity = None if max_running is None else max_running + (max_queue or 0)
        self._lock = threading.Lock()
        self._in_flight = 0

    def _enter(self, admit: bool = True) -> None:
        with self._lock:
            if admit and self.capacity is not None and self._in_flight >= self.capacity:
                raise OverloadedError(
                    f"server busy: {self._in_flight} requests running or queued (limit {self.capacity})"
                )
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
                raise _translate(exc) from None
            if cancel_check is not None:
                try:
                    cancel_check()
                except CancelledError:
                    response.cancel()
                    raise

    # --- calls ----------------------------------------------------------------------------------------------

    def edit(
        self,
        call: EditCall,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        cancel_check: Callable[[], None] | None = None,
    ) -> pb.EditResponse:
        if progress is not None:  # progress comes back only on a stream
            for event in self.edit_stream(call, cancel_check=cancel_check):
                if event.HasField("progress"):
                    progress(progress_event(event.progress))
                else:
                    return event.result
            raise UnavailableError("the replica's stream ended without a result; retry")
        new_id = "" if call.inversion_id else uuid.uuid4().hex
        routed = self._routed(call.inversion_id or new_id)
        return self._wait(lambda: routed.edit.remote(call, new_id), cancel_check)

    def edit_stream(
        self, call: EditCall, *, cancel_check: Callable[[], None] | None = None
    ) -> Iterator[pb.EditEvent]:
        new_id = "" if call.inversion_id else uuid.uuid4().hex
        self._enter()  # before anything is sent: a refused call costs the replicas nothing
        try:
            yield from self._stream_events(call, new_id, cancel_check)
        finally:
            self._leave()

    def _stream_events(
        self, call: EditCall, new_id: str, cancel_check: Callable[[], None] | None
    ) -> Iterator[pb.EditEvent]:
        stream = (
            self._routed(call.inversion_id or new_id).options(stream=True).edit_stream.remote(call, new_id)
        )
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        def pump() -> None:  # the generator blocks; a thread lets the caller poll its cancel check
            try:
                for event in stream:
                    events.put(("event", event))
                events.put(("end", None))
            except BaseException as exc:
                events.put(("error", exc))

        threading.Thread(target=pump, name="fpedit-ray-stream", daemon=True).start()
        while True:
            try:
                kind, value = events.get(timeout=CANCEL_POLL_S)
            except queue.Empty:
                if cancel_check is not None:
                    try:
                        cancel_check()
                    except CancelledError:
                        stream.cancel()
                        raise
                continue
            if kind == "event" and isinstance(value, ReplicaError):
                raise value.unwrap()
            if kind == "event":
                yield value
            elif kind == "error":
                raise _translate(value) from None
            else:
                return

    def generate(
        self,
        call: GenerateCall,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        cancel_check: Callable[[], None] | None = None,
    ) -> pb.GenerateEditResponse:
        return self._wait(lambda: self.handle.generate.remote(call), cancel_check)

    def invert(
        self,
        call: InvertCall,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        cancel_check: Callable[[], None] | None = None,
    ) -> pb.InvertResponse:
        new_id = uuid.uuid4().hex
        routed = self._routed(new_id)
        return self._wait(lambda: routed.invert.remote(call, new_id), cancel_check)

    def info(self) -> pb.GetInfoResponse:
        info = self._wait(lambda: self.handle.info.remote(), None, admit=False)
        if self.max_running is not None:  # the front's admission, not one replica's runner
            info.limits.workers = self.max_running
            info.limits.max_queue = self.max_queue or 0
        return info

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


# --- assembling and running the application -----------------------------------------------------------------


def replica_actor_options(device: str, num_cpus: float | None = None) -> dict[str, Any]:
    """One GPU per replica on CUDA (Ray pins it through CUDA_VISIBLE_DEVICES); one CPU per replica else."""
    if device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": 1 if num_cpus is None else num_cpus}
    return {"num_cpus": 1 if num_cpus is None else num_cpus}


def replica_deployment(
    settings: ReplicaSettings,
    *,
    replicas: int | None = None,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
    ray_actor_options: dict[str, Any] | None = None,
) -> Any:
    """The bound :class:`EditReplica` deployment (a fixed replica count, or Serve autoscaling)."""
    from ray import serve

    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": ray_actor_options or replica_actor_options(settings.engine.device),
        # Loading a model can take minutes on a cold node; health checks must not kill a loading replica.
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": settings.server.grace_s,
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas or 1
    return serve.deployment(EditReplica).options(**options).bind(settings)


@dataclass
class RayService:
    """A deployed application and the front's runner; :meth:`close` deletes what :meth:`start` created."""

    runner: RayRunner
    settings: ReplicaSettings
    app_name: str
    owns_ray: bool

    @classmethod
    def start(
        cls,
        settings: ReplicaSettings,
        *,
        replicas: int | None = None,
        autoscaling: dict[str, Any] | None = None,
        address: str | None = None,
        app_name: str = APP_NAME,
        max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
        max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
        ray_actor_options: dict[str, Any] | None = None,
        ray_init: dict[str, Any] | None = None,
    ) -> RayService:
        """Join (``address``) or start a local Ray instance, deploy the replicas, wait until they serve."""
        import ray
        from ray import serve

        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(address=address, include_dashboard=False, **(ray_init or {}))
        serve.start(proxy_location="Disabled")  # clients reach the gRPC front, never Serve's proxies
        open_store(settings.store_name, settings.store_namespace, settings.store_bytes, settings.store_ttl_s)
        app = replica_deployment(
            settings,
            replicas=replicas,
            autoscaling=autoscaling,
            max_ongoing_requests=max_ongoing_requests,
            max_queued_requests=max_queued_requests,
            ray_actor_options=ray_actor_options,
        )
        handle = serve.run(app, name=app_name, route_prefix=None)
        store = ray.get_actor(settings.store_name, namespace=settings.store_namespace)
        most_replicas = (autoscaling or {}).get("max_replicas", replicas or 1)
        runner = RayRunner(
            handle,
            store,
            max_running=int(most_replicas) * max_ongoing_requests,
            max_queue=max_queued_requests,
        )
        return cls(runner, settings, app_name, owns_ray)

    def close(self) -> None:
        import ray
        from ray import serve

        from .ray_store import close_store

        try:
            serve.delete(self.app_name)
        finally:
            close_store(self.settings.store_name, self.settings.store_namespace)
            if self.owns_ray:
                serve.shutdown()
                ray.shutdown()


def serve_on_ray(
    args: argparse.Namespace, config: ServerConfig, ready: Callable[[Any], None] | None = None
) -> None:
    """``fpedit serve --ray``: deploy ``--replicas`` engine replicas on Ray Serve and serve the gRPC front on
    ``--host``/``--port`` until SIGTERM or SIGINT; then drain the front and delete the application."""
    require_ray()
    replicas = 1 if args.replicas is None else args.replicas
    if replicas < 1:
        raise InvalidInputError("replicas", "must be at least 1")
    from fpedit.args import engine_config_from_args

    from .app import serve

    settings = ReplicaSettings(
        engine=engine_config_from_args(args, batching=args.batching),
        server=replica_server_config(config, DEFAULT_MAX_ONGOING_REQUESTS, batching=args.batching),
    )
    log.info("starting Ray Serve (%s), %d replicas", args.ray_address or "local Ray instance", replicas)
    service = RayService.start(
        settings,
        replicas=replicas,
        address=args.ray_address,
        max_queued_requests=max(1, config.max_queue),  # --max-queue is the front's queue, as standalone
    )
    try:
        serve(service.runner, config, ready=ready)
    finally:
        # Bounded: if the Ray instance itself was stopped (a SIGTERM to the whole process group reaches its
        # GCS too), Ray would wait a minute for it before giving up.
        closer = threading.Thread(target=service.close, name="fpedit-ray-close", daemon=True)
        closer.start()
        closer.join(CLOSE_TIMEOUT_S)
        if closer.is_alive():
            log.warning(
                "Ray did not confirm the application's deletion in %.0f s; exiting anyway", CLOSE_TIMEOUT_S
            )


# --- `serve run` / `serve deploy`: the front as the application's ingress deployment -------------------------


class GrpcFront:
    """The ingress of a config-file deployment: fpedit's gRPC server (health, reflection, token, TLS,
    metrics, drain) in one Serve replica, over the :class:`EditReplica` deployment's handle.

    It binds ``--host``/``--port`` on the node it runs on; pin it (``ray_actor_options.resources``) to the
    node your load balancer or Kubernetes Service points at.
    """

    def __init__(self, replicas: Any, config: ServerConfig) -> None:
        from .app import build_server

        self.config = config
        self.running = build_server(RayRunner(replicas), config)
        log.info("fpedit gRPC front on %s:%d over Ray Serve", config.host, self.running.port)

    async def port(self) -> int:
        return self.running.port

    def __del__(self) -> None:
        running = getattr(self, "running", None)
        if running is not None:
            running.drain(self.config.grace_s)


def settings_from_flags(flags: dict[str, Any]) -> tuple[ServerConfig, ReplicaSettings]:
    """The front's config and the replicas' settings from ``fpedit serve`` flags given as a mapping (a config
    file's ``args``: ``{model: /models/sd15, device: cuda, port: 50051, cache-gib: 8}``)."""
    from fpedit.args import engine_config_from_args, serve_args_from_mapping, server_config_from_args

    args = serve_args_from_mapping(flags)
    config = server_config_from_args(args)
    settings = ReplicaSettings(
        engine=engine_config_from_args(args, batching=args.batching),
        server=replica_server_config(config, DEFAULT_MAX_ONGOING_REQUESTS, batching=args.batching),
    )
    return config, settings


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for Ray's tooling: ``serve run fpedit.server.ray_app:build_app model=tiny`` or
    ``import_path: fpedit.server.ray_app:build_app`` in a config file (``deploy/ray-serve.yaml``); the
    config file's ``deployments`` section sets replicas, autoscaling and resources."""
    from ray import serve

    config, settings = settings_from_flags(dict(args))
    replicas = replica_deployment(settings)
    front = serve.deployment(GrpcFront).options(
        name="GrpcFront", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100
    )
    return front.bind(replicas, config)
