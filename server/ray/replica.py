"""The Serve deployment: one engine per replica behind a LocalRunner; inversion ids are multiplexed model ids."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fpedit.engine import ProgressEvent
from fpedit.engine.errors import CancelledError, InvalidInputError, NotFoundError

from ..errors import unknown_inversion
from ..results import EditOutcome, GenerateOutcome, InfoOutcome, InvertOutcome
from ..runner import EditCall, GenerateCall, InvertCall, LocalRunner
from .errors import ReplicaError
from .settings import ReplicaSettings, build_engine
from .store import (
    InversionRecord,
    StoreClient,
    StoreUnreachable,
    engine_fields,
    fingerprint_of,
    foreign_engine,
    inversion_from_record,
    record_from_inversion,
)

log = logging.getLogger("fpedit.server")
T = TypeVar("T")

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
        self.name = ray.get_runtime_context().get_actor_name() or "local"
        self.engine = build_engine(settings)
        self.runner = LocalRunner(self.engine, settings.server, replica=self.name)
        self.engine_fields = engine_fields(self.engine)  # hashes the weights once (seconds for SD 1.5)
        self.fingerprint = fingerprint_of(self.engine_fields)
        # Found by name, never created here: the front creates it on its own node (its failure domain).
        self.store = StoreClient(settings.store_name, settings.store_namespace)
        self._fresh: set[str] = set()  # ids this replica just made, waiting to be registered
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

        An id the store does not know (or refuses) is held as empty rather than raised: Serve logs a loader's
        exception as a model that failed to load (at ERROR, naming the id), while an unknown id is the
        client's mistake; :meth:`_edit_held` answers it (NOT_FOUND, or INVALID_ARGUMENT for another engine's)."""
        if inversion_id in self._fresh:
            self._fresh.discard(inversion_id)
            local_key = inversion_id
        else:
            try:
                local_key = await asyncio.get_running_loop().run_in_executor(
                    self._threads, self._restore, inversion_id
                )
            except (NotFoundError, InvalidInputError):
                local_key = ""
        return _Held(local_key)

    def _restore(self, inversion_id: str) -> str:
        record = self._record(inversion_id)
        self.restores += 1
        self._restored.inc()
        # Kept under the front's id, as the runner keeps the inversions this replica makes.
        return self.runner.cache.put(inversion_from_record(self.engine, record), inversion_id)

    def _record(self, inversion_id: str) -> InversionRecord:
        """The store's record of ``inversion_id``, refused when unknown, lost or another engine's."""
        try:
            record = self.store.get(inversion_id)
        except StoreUnreachable as exc:  # its data died with a node or the store restarted: never retry
            log.warning("inversion %s cannot be restored: %s", inversion_id, exc)
            raise NotFoundError(
                f"inversion_id {inversion_id!r} was lost with a Ray node or the store; send the image again"
            ) from None
        if record is None:
            raise unknown_inversion(inversion_id)
        refusal = foreign_engine(record, self.fingerprint, self.engine_fields)
        if refusal is not None:  # as a standalone server refuses another engine's saved inversion
            raise InvalidInputError(
                "inversion_id",
                f"{inversion_id}: {refusal}; invert the image again with this model and settings",
            )
        return record

    async def _adopt(self, inversion_id: str) -> None:
        """Publish a new inversion (kept by the runner under the front's id): into the shared store, then
        held here."""
        inversion = self.runner.cache.get(inversion_id)
        if inversion is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._threads, self._share, inversion_id, inversion
            )
        self._fresh.add(inversion_id)
        await self._hold(inversion_id)  # registers the id here: Serve routes its edits to this replica

    def _share(self, inversion_id: str, inversion: Any) -> None:
        """Put a new inversion in the shared store. Without the store the request still succeeds: the id is
        held here only, and is NOT_FOUND if this replica goes away."""
        record = record_from_inversion(inversion, self.fingerprint, self.engine_fields)
        try:
            kept = self.store.put(inversion_id, record)
        except StoreUnreachable as exc:
            log.warning("inversion %s is held by this replica only: %s", inversion_id, exc)
            return
        if not kept:
            log.warning(
                "inversion %s (%d bytes) exceeds the shared store's budget", inversion_id, record.nbytes
            )

    def _edit_held(self, call: EditCall, held: _Held, **kw: Any) -> EditOutcome:
        if not held.local_key:  # unknown when first asked for: look again (NotFoundError if still unknown)
            held.local_key = self._restore(call.inversion_id)
        try:
            return self.runner.edit(dataclasses.replace(call, inversion_id=held.local_key), **kw)
        except NotFoundError:  # this replica's cache evicted it since: rebuild from the store
            held.local_key = self._restore(call.inversion_id)
            return self.runner.edit(dataclasses.replace(call, inversion_id=held.local_key), **kw)

    def _check_by_id(self, call: EditCall) -> None:
        """An edit by id judged without holding the id here (no multiplexed load, no eviction of held ids):
        the inversion this replica has, else one rebuilt from the store's record for this check alone."""
        inversion = self.runner.cache.get(call.inversion_id)
        if inversion is None:
            inversion = inversion_from_record(self.engine, self._record(call.inversion_id))
        self.runner.check_edit_of(inversion, call)

    # --- calls ----------------------------------------------------------------------------------------------

    async def check(self, call: EditCall | GenerateCall | InvertCall) -> None:
        """The runner's refusals of ``call`` without running it (a job at submit); an edit by id is routed
        here by its id and looked up as its edit would be."""

        async def work(cancel_check: Callable[[], None]) -> None:
            if isinstance(call, EditCall) and call.inversion_id:
                return await self._in_thread(self._check_by_id, call)
            return await self._in_thread(self.runner.check, call)

        return await self._call("check", work)

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
    ) -> EditOutcome:
        """Edit by id (routed here by the id) or by image (``new_id`` names the new inversion)."""

        async def work(cancel_check: Callable[[], None]) -> EditOutcome:
            kw = {"progress": progress, "cancel_check": cancel_check}
            if call.inversion_id:
                held = await self._hold(call.inversion_id)
                return await self._in_thread(self._edit_held, call, held, **kw)
            outcome = await self._in_thread(self.runner.edit, dataclasses.replace(call, new_id=new_id), **kw)
            if outcome.inversion_id:  # "": too big for the cache, so it has no id to route by
                await self._adopt(outcome.inversion_id)
            return outcome

        return await self._call("edit", work)

    async def edit_stream(self, call: EditCall, new_id: str):
        """Progress events per step, then the result (``handle.options(stream=True)``)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ProgressEvent] = asyncio.Queue()

        def progress(event: ProgressEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

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
            yield task.result()  # the EditOutcome, or the ReplicaError
        finally:
            if not task.done():
                task.cancel()  # the caller went away: stop the engine

    async def generate(self, call: GenerateCall) -> GenerateOutcome:
        async def work(cancel_check: Callable[[], None]) -> GenerateOutcome:
            return await self._in_thread(self.runner.generate, call, cancel_check=cancel_check)

        return await self._call("generate", work)

    async def invert(self, call: InvertCall, new_id: str) -> InvertOutcome:
        async def work(cancel_check: Callable[[], None]) -> InvertOutcome:
            call_named = dataclasses.replace(call, new_id=new_id)
            outcome = await self._in_thread(self.runner.invert, call_named, cancel_check=cancel_check)
            await self._adopt(outcome.inversion_id)  # the runner refused one too big to keep
            return outcome

        return await self._call("invert", work)

    async def info(self) -> InfoOutcome:
        return self.runner.info()

    async def stats(self) -> dict[str, Any]:
        """This replica's load and cache figures (the front sums them over replicas)."""
        import ray
        import torch

        return {
            "name": self.name,
            "node_id": ray.get_runtime_context().get_node_id(),  # where it runs (node-loss checks)
            "torch_threads": torch.get_num_threads(),
            # The engine's backend calls: ``batch_rows`` shows whether concurrent requests merged.
            "engine": self.engine.counters(),
            "restores": self.restores,
            "cancelled": self.cancelled,
            **dataclasses.asdict(self.runner.stats()),
        }

    def _publish_gauges(self) -> None:
        stats = self.runner.stats()
        self._gauges["requests_running"].set(stats.running)
        self._gauges["inversion_cache_bytes"].set(stats.cache_bytes)
        self._gauges["inversion_cache_entries"].set(stats.cache_entries)

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
