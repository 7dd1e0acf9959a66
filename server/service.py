"""The EditService transport: parse and validate every field, call a runner, map the outcome to a status.

Two layers (the runner interface is documented in :mod:`fpedit.server.runner`):

1. :class:`EditServicer` (this module) speaks protobuf only. Request bodies arrive as raw bytes and are
   parsed here, so an undecodable body is INVALID_ARGUMENT with one log line, not a deserializer traceback.
   Every field is checked (prompts and their length, option ranges, output_format, image xor inversion id,
   seed) before any work is queued; a request whose deadline already passed never starts. Exceptions map to
   status codes in one place (:func:`status_of`); each RPC writes one log line and updates the metrics.
   While draining, new work gets UNAVAILABLE and in-flight work runs on; work still running when the grace
   period ends is stopped and logged as aborted by shutdown.
2. A runner (:class:`~fpedit.server.runner.LocalRunner`, or a Ray Serve front) executes the validated call
   and returns plain results (:mod:`fpedit.server.results`), encoded here (:mod:`fpedit.server.convert`).

Status codes: INVALID_ARGUMENT (a bad field or an undecodable request, naming the field), NOT_FOUND (unknown
or expired inversion id), RESOURCE_EXHAUSTED (queue full, out of memory, a request or response over
``max_message_bytes``: judged here, so it is logged and counted; gRPC's own limit is set to
:data:`TRANSPORT_HEADROOM` times it), DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE (draining or aborted by shutdown),
UNAUTHENTICATED (interceptor in ``app.py``), FAILED_PRECONDITION (the model cannot serve the request),
INTERNAL (a bug; the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from fpedit.engine import InvalidInputError
from fpedit.engine.errors import CancelledError, DeadlineExceededError
from fpedit.engine.options import (
    INVERSION_FIELDS,
    InversionOptions,
    check_prompt,
    refuse_inversion_options,
)
from fpedit.v1 import edit_pb2 as pb

from .config import ServerConfig
from .convert import (
    edit_response,
    generate_response,
    image_format_name,
    info_response,
    invert_response,
    options_from_proto,
    stream_message,
)
from .errors import MessageTooLargeError, UnavailableError
from .logs import log_request
from .metrics import ServerMetrics
from .outcomes import outcome_of
from .runner import ACCEPTED_IMAGE_FORMATS, EditCall, GenerateCall, InvertCall, Runner

__all__ = ["ACCEPTED_IMAGE_FORMATS", "EditServicer", "ServerConfig", "status_of"]

log = logging.getLogger("fpedit.server")
T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EditService"].full_name
MAX_INVERSION_ID_CHARS = 64  # ids are 32 hex digits; anything much longer is not one of ours
#: gRPC's own message limits are this multiple of ``max_message_bytes``. gRPC refuses a message over its
#: limit before any handler or interceptor runs (uncounted, unlogged); the servicer judges the configured
#: limit itself, so requests up to this multiple are logged and counted, at the cost of buffering them.
TRANSPORT_HEADROOM = 2


# --- validation (cheap, before any work) --------------------------------------------------------------------


def parse(message_type: type[Message], raw: bytes) -> Any:
    decode = getattr(raw, "decode_as", None)
    if decode is not None:  # a front with another encoding (HTTP/JSON) decodes into the same message
        return decode(message_type)
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        reason = str(exc).rsplit(": ", 1)[-1]  # e.g. "String field had bad UTF-8"
        name = message_type.DESCRIPTOR.full_name
        raise InvalidInputError("request", f"is not a valid {name} ({reason})") from None


#: InversionMethod -> the engine's method name.
INVERSION_METHODS = {
    pb.INVERSION_METHOD_UNSPECIFIED: "ddim",
    pb.INVERSION_METHOD_DDIM: "ddim",
    pb.INVERSION_METHOD_NULL_TEXT: "null-text",
    pb.INVERSION_METHOD_NEGATIVE_PROMPT: "negative-prompt",
}


#: The request's names of the inversion options (:data:`~fpedit.engine.options.INVERSION_FIELDS`).
INVERSION_REQUEST_FIELDS = {"method": "inversion_method"}


def _inversion_options(request: pb.EditRequest | pb.InvertRequest, max_prompt_chars: int) -> dict[str, Any]:
    """EditEngine.invert keywords of an Invert or image Edit request, judged (by :class:`InversionOptions`)
    before the request queues; a refusal names the request's field."""
    source_prompt = check_prompt(
        request.source_prompt, "source_prompt", allow_empty=True, max_chars=max_prompt_chars
    )
    method = INVERSION_METHODS.get(request.inversion_method)
    if method is None:
        raise InvalidInputError("inversion_method", f"unknown value {request.inversion_method}")
    try:
        how = InversionOptions(
            method=method,
            source_prompt=source_prompt,
            null_text_steps=request.null_text_steps if request.HasField("null_text_steps") else None,
            null_text_epsilon=request.null_text_epsilon if request.HasField("null_text_epsilon") else None,
        )
    except InvalidInputError as exc:
        raise InvalidInputError(INVERSION_REQUEST_FIELDS.get(exc.field, exc.field), exc.reason) from None
    return dataclasses.asdict(how)


def parse_edit(request: pb.EditRequest, max_prompt_chars: int) -> EditCall:
    has_image, has_id = bool(request.image), bool(request.inversion_id)
    if has_image == has_id:
        raise InvalidInputError("image", "give exactly one of image or inversion_id")
    if has_id:  # first: judging these options would only confuse (a null-text method wants a prompt...)
        names = (INVERSION_REQUEST_FIELDS.get(name, name) for name in INVERSION_FIELDS)
        refuse_inversion_options(
            [
                name
                for name in names
                if (request.HasField(name) if name.startswith("null_text") else getattr(request, name))
            ]
        )
    inversion = _inversion_options(request, max_prompt_chars)
    if len(request.inversion_id) > MAX_INVERSION_ID_CHARS:
        raise InvalidInputError("inversion_id", "is not an id this server issued")
    return EditCall(
        target_prompt=check_prompt(
            request.target_prompt, "target_prompt", allow_empty=False, max_chars=max_prompt_chars
        ),
        options=options_from_proto(request.options),
        steps_given=request.options.HasField("steps"),
        image=request.image,
        inversion_id=request.inversion_id,
        output_format=image_format_name(request.output_format),
        skip_reconstruction=request.skip_reconstruction,
        guidance_given=request.options.HasField("guidance_scale"),
        inversion=inversion if has_image else {},
    )


def parse_generate(request: pb.GenerateEditRequest, max_prompt_chars: int) -> GenerateCall:
    seed = request.seed if request.HasField("seed") else None
    if seed is not None and seed >= 2**63:
        raise InvalidInputError("seed", "must be below 2**63")
    return GenerateCall(
        source_prompt=check_prompt(
            request.source_prompt, "source_prompt", allow_empty=True, max_chars=max_prompt_chars
        ),
        target_prompt=check_prompt(
            request.target_prompt, "target_prompt", allow_empty=False, max_chars=max_prompt_chars
        ),
        options=options_from_proto(request.options),
        seed=seed,
        height=request.height if request.HasField("height") else None,
        width=request.width if request.HasField("width") else None,
        output_format=image_format_name(request.output_format),
    )


def parse_invert(request: pb.InvertRequest, max_prompt_chars: int) -> InvertCall:
    if not request.image:
        raise InvalidInputError("image", "is empty")
    inversion = _inversion_options(request, max_prompt_chars)
    return InvertCall(image=request.image, options=options_from_proto(request.options), inversion=inversion)


# --- status mapping (the one place) -------------------------------------------------------------------------


def status_of(exc: BaseException, context: grpc.ServicerContext | None = None) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised while serving a request (the
    outcome table is :mod:`fpedit.server.outcomes`; a cancellation whose deadline passed is DEADLINE_EXCEEDED)."""
    outcome, detail = outcome_of(exc)
    if outcome == "CANCELLED" and context is not None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed"
    return grpc.StatusCode[outcome], detail


# --- the servicer -------------------------------------------------------------------------------------------


class EditServicer:
    """fpedit.v1.EditService over a runner; register it with :meth:`rpc_handler`."""

    def __init__(self, runner: Runner, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.runner = runner
        self.config = config
        self.metrics = metrics
        self._draining = threading.Event()
        self._aborting = threading.Event()
        self._active = 0
        self._idle = threading.Condition()
        self.jobs: Any = None  # the job RPCs (fpedit.server.jobs.service.JobServicer), set by build_server

    # --- drain ----------------------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Refuse new work with UNAVAILABLE; in-flight work runs on."""
        self._draining.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no work RPC is in flight; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def abort_in_flight(self) -> None:
        """Stop every running request at its next check (the grace period is over)."""
        self._aborting.set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def in_flight(self) -> int:
        with self._idle:
            return self._active

    @contextmanager
    def _tracked(self) -> Iterator[None]:
        with self._idle:
            self._active += 1
        if self.metrics:
            self.metrics.in_flight.inc()
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()
            if self.metrics:
                self.metrics.in_flight.dec()

    # --- plumbing -------------------------------------------------------------------------------------------

    def _cancel_check(self, context: grpc.ServicerContext) -> Callable[[], None]:
        def check() -> None:
            if self._aborting.is_set():
                raise UnavailableError("aborted by server shutdown (the drain grace period ended)")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError("the deadline passed")
            if not context.is_active():
                raise CancelledError("the client cancelled")

        return check

    def _parse(self, message_type: type[Message], raw: Any) -> Any:
        """Parse a request body after checking its size against ``--max-message-mb``."""
        limit = self.config.max_message_bytes
        if isinstance(raw, bytes) and len(raw) > limit:
            raise MessageTooLargeError(
                f"the request is {len(raw)} bytes; this server takes at most {limit} (--max-message-mb)"
            )
        return parse(message_type, raw)

    def _check_response_size(self, response: Any) -> None:
        """Refuse (and count) a response gRPC would refuse to send; any inversion stays usable by its id."""
        if not isinstance(response, Message):
            return
        size, limit = response.ByteSize(), self.config.max_message_bytes
        if size > limit:
            kept = getattr(response, "inversion_id", "") or getattr(
                getattr(response, "result", None), "inversion_id", ""
            )
            raise MessageTooLargeError(
                f"the response would be {size} bytes; this server sends at most {limit} (--max-message-mb): "
                "ask for JPEG/WEBP, skip_reconstruction or a smaller size"
                + (f"; the inversion is kept as {kept}" if kept else "")
            )

    def _admit(self, context: grpc.ServicerContext) -> Callable[[], None]:
        if self._draining.is_set():
            raise UnavailableError("the server is shutting down; retry on another replica")
        check = self._cancel_check(context)
        check()  # a request that arrives with its deadline already passed never starts
        return check

    def _finish(
        self,
        method: str,
        context: grpc.ServicerContext,
        started: float,
        code: grpc.StatusCode,
        detail: str,
        response: Message | None,
    ) -> None:
        """One log line and the metrics for a finished RPC."""
        seconds = time.perf_counter() - started
        stats = getattr(response, "stats", None) if response is not None else None
        fields: dict[str, Any] = {"method": method, "status": code.name, "ms": round(seconds * 1e3, 1)}
        if stats is not None:
            fields.update(
                queue_ms=round(stats.queue_ms, 1), engine_ms=round(stats.engine_ms, 1), rows=stats.unet_rows
            )
        inversion_id = getattr(response, "inversion_id", "") if response is not None else ""
        if inversion_id:
            fields["inversion_id"] = inversion_id
        fields["peer"] = context.peer()
        transport = getattr(context, "transport", "grpc")  # the HTTP front's context says "http"
        fields["transport"] = transport
        if detail:
            fields["detail"] = detail
        log_request(fields)
        if self.metrics is not None:
            self.metrics.observe(method, code.name, seconds, stats, transport=transport)

    def _failure(
        self, method: str, exc: BaseException, context: grpc.ServicerContext
    ) -> tuple[grpc.StatusCode, str]:
        if (
            isinstance(exc, CancelledError)
            and not isinstance(exc, DeadlineExceededError)
            and self._aborting.is_set()
        ):
            exc = UnavailableError("aborted by server shutdown (the drain grace period ended)")
        code, detail = status_of(exc, context)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", method, exc_info=exc)
        return code, detail

    def _unary(
        self,
        method: str,
        context: grpc.ServicerContext,
        body: Callable[[], Message],
        work: bool = True,
    ) -> Message:
        started = time.perf_counter()
        response: Message | None = None
        code, detail = grpc.StatusCode.OK, ""
        try:
            if work:
                with self._tracked():
                    response = body()
            else:
                response = body()
            self._check_response_size(response)
        except Exception as exc:  # the server must survive anything a request triggers
            response = None
            code, detail = self._failure(method, exc, context)
        self._finish(method, context, started, code, detail, response)
        if response is None:
            context.abort(code, detail)
        return response

    # --- RPCs (request bodies arrive as bytes) --------------------------------------------------------------

    def Edit(self, raw: bytes, context: grpc.ServicerContext) -> pb.EditResponse:
        def body() -> pb.EditResponse:
            call = parse_edit(self._parse(pb.EditRequest, raw), self.config.max_prompt_chars)
            return edit_response(self.runner.edit(call, cancel_check=self._admit(context)))

        return self._unary("Edit", context, body)

    def EditStream(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[pb.EditEvent]:
        started = time.perf_counter()
        response: pb.EditResponse | None = None
        code, detail = grpc.StatusCode.OK, ""
        try:
            with self._tracked():
                call = parse_edit(self._parse(pb.EditRequest, raw), self.config.max_prompt_chars)
                for item in self.runner.edit_stream(call, cancel_check=self._admit(context)):
                    event = stream_message(item)
                    self._check_response_size(event)
                    if event.HasField("result"):
                        response = event.result
                    yield event
        except GeneratorExit:  # the client went away between events
            code, detail = grpc.StatusCode.CANCELLED, "the client cancelled"
            self._finish("EditStream", context, started, code, detail, None)
            raise
        except Exception as exc:
            code, detail = self._failure("EditStream", exc, context)
        self._finish("EditStream", context, started, code, detail, response)
        if code != grpc.StatusCode.OK:
            context.abort(code, detail)

    def GenerateEdit(self, raw: bytes, context: grpc.ServicerContext) -> pb.GenerateEditResponse:
        def body() -> pb.GenerateEditResponse:
            call = parse_generate(self._parse(pb.GenerateEditRequest, raw), self.config.max_prompt_chars)
            return generate_response(self.runner.generate(call, cancel_check=self._admit(context)))

        return self._unary("GenerateEdit", context, body)

    def Invert(self, raw: bytes, context: grpc.ServicerContext) -> pb.InvertResponse:
        def body() -> pb.InvertResponse:
            call = parse_invert(self._parse(pb.InvertRequest, raw), self.config.max_prompt_chars)
            return invert_response(self.runner.invert(call, cancel_check=self._admit(context)))

        return self._unary("Invert", context, body)

    def GetInfo(self, raw: bytes, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        def body() -> pb.GetInfoResponse:
            self._parse(pb.GetInfoRequest, raw)
            return info_response(self.runner.info())

        return self._unary("GetInfo", context, body, work=False)

    def AttentionMaps(self, raw: Any, context: grpc.ServicerContext) -> Any:
        """HTTP only for now (``POST /v1/maps``, :mod:`fpedit.server.maps`), with the RPCs' admission, status,
        log line and metrics; a runner that does not serve maps (the Ray front's) raises UNIMPLEMENTED."""
        from .maps import parse_maps

        def body() -> Any:
            call = parse_maps(raw, self.config.max_prompt_chars)
            check = self._admit(context)
            return self.runner.attention_maps(call.prompt, cancel_check=check, **call.runner_kwargs())

        return self._unary("AttentionMaps", context, body)

    # --- for RPCs served beside these (jobs: fpedit.server.jobs.service) -----------------------------------

    def unary(self, method: str, context: grpc.ServicerContext, body: Callable[[], Message]) -> Message:
        """Run ``body`` as an RPC of this service: the same status mapping, log line and metrics."""
        return self._unary(method, context, body, work=False)

    def parse_request(self, message_type: type[Message], raw: Any) -> Any:
        """A request body parsed as this service's RPCs parse theirs (size limit, INVALID_ARGUMENT)."""
        return self._parse(message_type, raw)

    def record(
        self, method: str, context: grpc.ServicerContext, started: float, exc: BaseException | None
    ) -> tuple[grpc.StatusCode, str]:
        """The log line and metrics of a streaming RPC served beside these; returns its status."""
        code, detail = (grpc.StatusCode.OK, "") if exc is None else self._failure(method, exc, context)
        self._finish(method, context, started, code, detail, None)
        return code, detail

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """Handlers that take raw request bytes (parsed by the servicer, so bad bodies get a clear status)."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Edit": raw_unary(self.Edit, pb.EditResponse),
                "EditStream": raw_stream(self.EditStream, pb.EditEvent),
                "GenerateEdit": raw_unary(self.GenerateEdit, pb.GenerateEditResponse),
                "Invert": raw_unary(self.Invert, pb.InvertResponse),
                "GetInfo": raw_unary(self.GetInfo, pb.GetInfoResponse),
            },
        )


def raw_unary(fn: Callable, response: type[Message]) -> grpc.RpcMethodHandler:
    """A unary handler given the request's raw bytes: the servicer parses them, so a bad body is its own
    INVALID_ARGUMENT with the field named rather than gRPC's deserialisation error."""
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=None, response_serializer=response.SerializeToString
    )


def raw_stream(fn: Callable, response: type[Message]) -> grpc.RpcMethodHandler:
    """The server-streaming counterpart of :func:`raw_unary`."""
    return grpc.unary_stream_rpc_method_handler(
        fn, request_deserializer=None, response_serializer=response.SerializeToString
    )
