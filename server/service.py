"""The EditService: translates protobuf requests into engine calls on a bounded worker pool.

Admission: at most ``workers`` engine calls run at once and ``max_queue`` more may wait; beyond that a
request is refused with RESOURCE_EXHAUSTED at once. A request whose client cancels or whose deadline passes
stops within one denoising step (the engine's progress callback checks the RPC) and frees its worker.
Every failure becomes a status with a message; the server itself never dies on a request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from fpedit.engine import EditEngine, EditOptions, InvalidInputError, ProgressEvent
from fpedit.engine.errors import CancelledError, FpeditError
from fpedit.engine.options import MAX_STEPS
from fpedit.v1 import edit_pb2 as pb
from fpedit.v1 import edit_pb2_grpc

from .cache import InversionCache
from .convert import (
    MAP_FORMAT_ENUM,
    encode_image,
    options_from_proto,
    options_to_proto,
    stats_to_proto,
)

log = logging.getLogger("fpedit.server")
T = TypeVar("T")

ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass
class ServerConfig:
    """Limits and security of one server process (the CLI's ``fpedit serve`` options)."""

    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 1
    max_queue: int = 8
    max_message_bytes: int = 32 * 1024 * 1024
    cache_bytes: int = 4 * 1024**3
    cache_ttl_s: float = 3600.0
    max_image_pixels: int = 4096 * 4096
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    grace_s: float = 30.0


class QueueFull(Exception):
    pass


class _Abort(Exception):
    """A status to return (raised inside handlers, turned into ``context.abort`` in one place)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class WorkerPool:
    """``workers`` engine threads and a bounded number of waiting requests."""

    def __init__(self, workers: int, max_queue: int) -> None:
        self.capacity = workers + max_queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fpedit-worker")
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull(
                    f"server busy: {self._pending} requests running or queued (limit {self.capacity})"
                )
            self._pending += 1
        future = self._executor.submit(fn)
        future.add_done_callback(self._release)
        return future

    def _release(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class EditServicer(edit_pb2_grpc.EditServiceServicer):
    def __init__(self, engine: EditEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.cache = InversionCache(config.cache_bytes, config.cache_ttl_s)
        self.pool = WorkerPool(config.workers, config.max_queue)
        engine.max_input_pixels = min(engine.max_input_pixels, config.max_image_pixels)
        engine.image_formats = ACCEPTED_IMAGE_FORMATS
        engine.map_cache_bytes = min(engine.map_cache_bytes, config.cache_bytes)

    # --- plumbing -------------------------------------------------------------------------------------------

    def _run(
        self,
        context: grpc.ServicerContext,
        timings: dict[str, Any],
        work: Callable[[Callable[[ProgressEvent], None]], T],
        on_progress: Callable[[ProgressEvent], None] | None = None,
    ) -> tuple[T, float]:
        """Run ``work(progress)`` on the pool; returns (result, queue wait in ms) and notes timings."""
        submitted = time.perf_counter()
        started: list[float] = []

        def progress(event: ProgressEvent) -> None:
            if not context.is_active():
                raise CancelledError("the client cancelled or its deadline passed")
            if on_progress is not None:
                on_progress(event)

        def task() -> T:
            started.append(time.perf_counter())
            if not context.is_active():
                raise CancelledError("the client cancelled or its deadline passed while queued")
            return work(progress)

        try:
            future = self.pool.submit(task)
        except QueueFull as exc:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        context.add_callback(future.cancel)  # a queued request that goes away never runs
        try:
            result = future.result()
        except FutureCancelled as exc:
            raise CancelledError("cancelled while queued") from exc
        queue_ms = ((started[0] if started else time.perf_counter()) - submitted) * 1e3
        timings["queue_ms"] = queue_ms
        stats = getattr(result, "stats", None)
        if isinstance(stats, dict):
            timings.update(engine_ms=float(stats.get("total_ms", 0.0)), unet_rows=stats.get("unet_rows", 0))
        return result, queue_ms

    def _handle(
        self,
        method: str,
        context: grpc.ServicerContext,
        body: Callable[[], T],
        timings: dict[str, Any],
        started: float | None = None,
    ) -> T:
        """Run a handler body, log one line, and turn every failure into a status (in the RPC's thread)."""
        t0 = time.perf_counter() if started is None else started
        code = grpc.StatusCode.OK
        detail = ""
        try:
            return body()
        except _Abort as exc:
            code, detail = exc.code, exc.message
        except InvalidInputError as exc:
            code, detail = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except CancelledError as exc:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            detail = str(exc)
        except MemoryError as exc:
            code, detail = grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {exc}"
        except FpeditError as exc:
            code, detail = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except Exception as exc:  # the server must survive anything a request triggers
            if _is_device_oom(exc):
                code, detail = grpc.StatusCode.RESOURCE_EXHAUSTED, "out of device memory"
            else:
                log.exception("%s failed", method)
                code, detail = (
                    grpc.StatusCode.INTERNAL,
                    f"internal error ({type(exc).__name__}); see the server log",
                )
        finally:
            noted = " ".join(
                f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in timings.items()
            )
            log.info(
                "rpc=%s status=%s ms=%.1f %s peer=%s%s",
                method,
                code.name,
                (time.perf_counter() - t0) * 1e3,
                noted,
                context.peer(),
                f" detail={detail!r}" if detail else "",
            )
        context.abort(code, detail)
        raise AssertionError("unreachable")  # context.abort raises

    # --- RPCs -----------------------------------------------------------------------------------------------

    def Edit(self, request: pb.EditRequest, context: grpc.ServicerContext) -> pb.EditResponse:
        timings: dict[str, Any] = {}
        return self._handle("Edit", context, lambda: self._edit(request, context, timings, None), timings)

    def EditStream(self, request: pb.EditRequest, context: grpc.ServicerContext) -> Iterator[pb.EditEvent]:
        started = time.perf_counter()
        timings: dict[str, Any] = {}
        events: queue.Queue[pb.EditEvent | None] = queue.Queue()
        outcome: dict[str, Any] = {}

        def on_progress(event: ProgressEvent) -> None:
            events.put(
                pb.EditEvent(progress=pb.Progress(stage=event.stage, step=event.step, total=event.total))
            )

        def run() -> None:  # waits on the worker pool while this RPC's thread streams progress
            try:
                outcome["result"] = self._edit(request, context, timings, on_progress)
            except Exception as exc:  # re-raised in the RPC thread, which owns the status
                outcome["error"] = exc
            finally:
                events.put(None)

        waiter = threading.Thread(target=run, name="fpedit-stream", daemon=True)
        waiter.start()
        while (event := events.get()) is not None:
            yield event
        waiter.join()

        def finish() -> pb.EditResponse:
            if "error" in outcome:
                raise outcome["error"]
            return outcome["result"]

        yield pb.EditEvent(result=self._handle("EditStream", context, finish, timings, started))

    def _edit(
        self,
        request: pb.EditRequest,
        context: grpc.ServicerContext,
        timings: dict[str, Any],
        on_progress: Callable[[ProgressEvent], None] | None,
    ) -> pb.EditResponse:
        has_image, has_id = bool(request.image), bool(request.inversion_id)
        if has_image == has_id:
            raise InvalidInputError("image", "give exactly one of image or inversion_id")
        options = options_from_proto(request.options)
        if has_id:
            inversion = self.cache.get(request.inversion_id)
            if inversion is None:
                raise _Abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"inversion_id {request.inversion_id!r} is unknown or expired; send the image again",
                )
            if not request.options.HasField("steps"):
                options = options.replace(steps=inversion.steps)
            key = request.inversion_id
            result, queue_ms = self._run(
                context,
                timings,
                lambda p: self.engine.edit_real(
                    inversion, request.target_prompt, options=options, progress=p
                ),
                on_progress,
            )
            self.cache.refresh(key)
        else:
            result, queue_ms = self._run(
                context,
                timings,
                lambda p: self.engine.edit_real(
                    request.image, request.target_prompt, options=options, progress=p
                ),
                on_progress,
            )
            key = self.cache.put(result.inversion)
        response = pb.EditResponse(
            edited_image=encode_image(result.edited_image, request.output_format),
            inversion_id=key,
            width=result.edited_image.width,
            height=result.edited_image.height,
            stats=stats_to_proto(result.stats, queue_ms),
        )
        if not request.skip_reconstruction:
            response.reconstruction_image = encode_image(result.reconstruction_image, request.output_format)
        return response

    def GenerateEdit(
        self, request: pb.GenerateEditRequest, context: grpc.ServicerContext
    ) -> pb.GenerateEditResponse:
        timings: dict[str, Any] = {}

        def body() -> pb.GenerateEditResponse:
            options = options_from_proto(request.options)
            seed = request.seed if request.HasField("seed") else None
            if seed is not None and seed >= 2**63:
                raise InvalidInputError("seed", "must be below 2**63")
            height = request.height if request.HasField("height") else None
            width = request.width if request.HasField("width") else None
            result, queue_ms = self._run(
                context,
                timings,
                lambda p: self.engine.edit_generated(
                    request.source_prompt,
                    request.target_prompt,
                    options=options,
                    seed=seed,
                    height=height,
                    width=width,
                    progress=p,
                ),
            )
            return pb.GenerateEditResponse(
                source_image=encode_image(result.source_image, request.output_format),
                edited_image=encode_image(result.edited_image, request.output_format),
                seed=int(result.stats["seed"]),
                width=result.edited_image.width,
                height=result.edited_image.height,
                stats=stats_to_proto(result.stats, queue_ms),
            )

        return self._handle("GenerateEdit", context, body, timings)

    def Invert(self, request: pb.InvertRequest, context: grpc.ServicerContext) -> pb.InvertResponse:
        timings: dict[str, Any] = {}

        def body() -> pb.InvertResponse:
            if not request.image:
                raise InvalidInputError("image", "is empty")
            options = options_from_proto(request.options)
            inversion, queue_ms = self._run(
                context, timings, lambda p: self.engine.invert(request.image, options=options, progress=p)
            )
            key = self.cache.put(inversion)
            return pb.InvertResponse(
                inversion_id=key,
                width=inversion.size[0],
                height=inversion.size[1],
                steps=inversion.steps,
                expires_in_s=int(self.cache.expires_in(key)),
                stats=stats_to_proto(inversion.stats, queue_ms),
            )

        return self._handle("Invert", context, body, timings)

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        def body() -> pb.GetInfoResponse:
            import fpedit

            info = self.engine.info()
            cfg = self.config
            return pb.GetInfoResponse(
                version=fpedit.__version__,
                model=str(info["model"]),
                backend=info["backend"],
                device=info["device"],
                precision=info.get("precision", info["dtype"]),
                layers_available=info["map_layers"],
                map_formats=[MAP_FORMAT_ENUM[f] for f in info["map_formats"]],
                defaults=options_to_proto(EditOptions()),
                default_image_size=info["default_image_size"],
                limits=pb.Limits(
                    max_steps=MAX_STEPS,
                    max_image_pixels=self.engine.max_input_pixels,
                    max_side=self.engine.max_side,
                    max_message_bytes=cfg.max_message_bytes,
                    workers=cfg.workers,
                    max_queue=cfg.max_queue,
                    cache_bytes=cfg.cache_bytes,
                    cache_ttl_s=int(cfg.cache_ttl_s),
                ),
            )

        return self._handle("GetInfo", context, body, {})


def _is_device_oom(exc: Exception) -> bool:
    try:
        import torch

        return isinstance(exc, torch.OutOfMemoryError)
    except (ImportError, AttributeError):
        return False
