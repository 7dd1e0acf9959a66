"""HTTP/JSON front of the EditService, beside gRPC on the same servicer, runner, cache, metrics and drain.

Why this shape: a request over HTTP takes the *same* path as one over gRPC. Each handler hands the servicer
(:class:`~fpedit.server.service.EditServicer`) a body it decodes with protobuf's ``json_format`` into the
very request message gRPC carries, and an :class:`HttpContext` that stands in for ``grpc.ServicerContext``
(deadline, cancellation, peer; the token is checked before the body is read). So validation, the queue,
the inversion cache, status codes, the log line and the metrics (``transport="http"``) cannot drift between
the two transports. The servicer's gRPC status becomes an HTTP status by :data:`HTTP_STATUS` (Google's
mapping) with the body ``{"error": {"code", "status", "message"}}``.

Routes: ``POST /v1/edit`` (JSON, or ``multipart/form-data`` with an ``image`` file and a ``request`` JSON
part), ``POST /v1/edit:stream`` (server-sent events: one ``EditEvent`` per event), ``POST /v1/generate``,
``POST /v1/invert``, ``GET /v1/info``, ``POST /v1/maps`` (cross-attention heatmaps; :mod:`.maps`), ``GET /healthz``, ``GET /readyz``, ``GET /openapi.json``,
``GET /docs`` and the editor page at ``GET /``. Starlette serves them under uvicorn, on a thread of the
process that runs the gRPC server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html import escape
from importlib import resources
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fpedit.engine.errors import InvalidInputError
from fpedit.v1 import edit_pb2 as pb

from .config import ServerConfig
from .maps import MAPS_REQUEST_SCHEMA, MAPS_RESPONSE_SCHEMA, maps_json
from .service import EditServicer

log = logging.getLogger("fpedit.server")

#: gRPC status -> HTTP status, as Google's HTTP APIs map them (google.rpc.Code).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

#: HTTP status -> status name, for errors raised by the HTTP layer itself (unknown route, wrong method).
_STATUS_NAME = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
                413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                501: "UNIMPLEMENTED"}  # fmt: skip

#: Header that sets a request's deadline in seconds (Google's HTTP APIs use the same name).
DEADLINE_HEADER = "x-server-timeout"
#: Slack over the decoded message limit for the JSON around it (field names, base64 line-up).
BODY_SLACK_BYTES = 64 * 1024
#: Paths served without the bearer token: probes, the editor page and the API description.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/openapi.json", "/docs"})


def error_body(code: grpc.StatusCode, message: str, http_status: int | None = None) -> dict[str, Any]:
    status = HTTP_STATUS.get(code, 500) if http_status is None else http_status
    return {"error": {"code": status, "status": code.name, "message": message}}


def error_response(code: grpc.StatusCode, message: str, http_status: int | None = None) -> JSONResponse:
    body = error_body(code, message, http_status)
    return JSONResponse(body, status_code=body["error"]["code"])


def to_json(message: Message) -> str:
    """The proto3 JSON mapping of a message (lowerCamelCase names, bytes as base64, defaults omitted)."""
    return json_format.MessageToJson(message, indent=None)


# --- the transport-neutral context and request bodies -------------------------------------------------------


class Aborted(Exception):
    """Raised by :meth:`HttpContext.abort`: the servicer's final status for a failed request."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class HttpContext:
    """What the servicer asks of a ``grpc.ServicerContext``, for one HTTP request."""

    transport = "http"

    def __init__(self, peer: str, timeout_s: float | None) -> None:
        self._peer = peer
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._cancelled = threading.Event()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def is_active(self) -> bool:
        return not self._cancelled.is_set()

    def cancel(self) -> None:
        """The client went away: the work stops at its next check, as on a gRPC cancel."""
        self._cancelled.set()

    def peer(self) -> str:
        return self._peer

    def abort(self, code: grpc.StatusCode, detail: str) -> None:
        raise Aborted(code, detail)


@dataclass
class JsonBody:
    """A request body in the proto3 JSON mapping; the servicer decodes it (``service.parse``) inside the
    request's status handling, so a bad body is logged and counted as INVALID_ARGUMENT like a bad gRPC one."""

    text: bytes
    image: bytes | None = None  # a multipart request's ``image`` file part
    error: str | None = None  # what was wrong with a multipart body

    def decode_as(self, message_type: type[Message]) -> Any:
        name = message_type.DESCRIPTOR.full_name
        if self.error is not None:
            raise InvalidInputError("request", self.error)
        try:
            data = json.loads(self.text) if self.text.strip() else {}
        except (ValueError, RecursionError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
            raise InvalidInputError("request", f"is not JSON ({reason})") from None
        if not isinstance(data, dict):
            raise InvalidInputError(
                "request", f"must be a JSON object (an {name} in the proto3 JSON mapping)"
            )
        message = message_type()
        try:
            json_format.ParseDict(data, message)
        except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidInputError("request", reason) from None
        if self.image is not None:
            if "image" not in message_type.DESCRIPTOR.fields_by_name:
                raise InvalidInputError("image", f"{name} takes no image")
            if message.image:
                raise InvalidInputError("image", "give the image as the file part or in the JSON, not both")
            message.image = self.image
        return message


class BodyTooLarge(Exception):
    pass


# --- the application ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RpcRoute:
    """One API route over a servicer method."""

    path: str
    http_method: str
    rpc: str  # EditServicer method name
    request: type[Message] | None  # None: a JSON body of its own (schema in ``schemas``)
    response: type[Message] | None
    summary: str
    multipart: bool = False
    stream: bool = False
    #: Turns the servicer's result into a JSON-able body (routes whose result is not a message).
    encode: Callable[[Any], Any] | None = None
    #: The runner method the route needs; a runner without it (the Ray front) answers 501.
    needs: str | None = None
    #: Request and response schema names for routes without messages.
    schemas: tuple[str, str] = ("", "")

    @property
    def request_name(self) -> str:
        return self.request.DESCRIPTOR.name if self.request is not None else self.schemas[0]

    @property
    def response_name(self) -> str:
        return self.response.DESCRIPTOR.name if self.response is not None else self.schemas[1]


API_ROUTES = (
    RpcRoute("/v1/edit", "POST", "Edit", pb.EditRequest, pb.EditResponse,
             "Edit a real image (or a cached inversion by id) toward a target prompt.", multipart=True),
    RpcRoute("/v1/edit:stream", "POST", "EditStream", pb.EditRequest, pb.EditEvent,
             "Same as /v1/edit, as server-sent events: a progress event per step, then the result.",
             multipart=True, stream=True),
    RpcRoute("/v1/generate", "POST", "GenerateEdit", pb.GenerateEditRequest, pb.GenerateEditResponse,
             "Generate an image from a source prompt and edit it toward a target prompt (same noise)."),
    RpcRoute("/v1/invert", "POST", "Invert", pb.InvertRequest, pb.InvertResponse,
             "DDIM-invert an image and keep it server-side; later edits by id run the target branch only.",
             multipart=True),
    RpcRoute("/v1/info", "GET", "GetInfo", pb.GetInfoRequest, pb.GetInfoResponse,
             "Model, backend, device, precision, layers, defaults and limits."),
    RpcRoute("/v1/maps", "POST", "AttentionMaps", None, None,
             "Cross-attention heatmaps of a prompt, one per token (the paper's Figure 3), over an image, a kept "
             "inversion or the prompt's generation. Local runner only: 501 under --ray.",
             encode=maps_json, needs="attention_maps", schemas=("MapsRequest", "MapsResponse")),
)  # fmt: skip


class HttpApi:
    """The Starlette application over one servicer."""

    def __init__(self, servicer: EditServicer, config: ServerConfig) -> None:
        self.servicer = servicer
        self.config = config
        self._expected = f"Bearer {config.token}".encode() if config.token else None
        self.json_limit = config.max_message_bytes * 4 // 3 + BODY_SLACK_BYTES  # bytes travel as base64
        self.multipart_limit = config.max_message_bytes + BODY_SLACK_BYTES
        # Handler threads mostly wait on the runner, whose queue is the admission control (as for gRPC).
        self.executor = ThreadPoolExecutor(
            max_workers=config.workers + config.max_queue + 16, thread_name_prefix="fpedit-http"
        )
        routes = [Route(r.path, self._endpoint(r), methods=[r.http_method]) for r in API_ROUTES]
        routes += [
            Route("/", self.page, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/docs", self.docs, methods=["GET"]),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},
        )
        self._openapi = openapi_document()

    # --- plain routes ---------------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        html = resources.files("fpedit.server").joinpath("static/editor.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "SERVING"})

    async def readyz(self, request: Request) -> Response:
        if self.servicer.draining:
            return JSONResponse({"status": "NOT_SERVING", "reason": "draining"}, status_code=503)
        return JSONResponse({"status": "SERVING"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._openapi)

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(docs_page(self._openapi))

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = _STATUS_NAME.get(exc.status_code, "UNKNOWN")
        message = exc.detail
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not take {request.method}; see /docs"
        body = {"error": {"code": exc.status_code, "status": status, "message": message}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(
            grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
        )

    # --- API routes -----------------------------------------------------------------------------------------

    def _endpoint(self, route: RpcRoute) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self._call(route, request)

        endpoint.__name__ = route.rpc
        return endpoint

    def _refuse(
        self, route: RpcRoute, peer: str, code: grpc.StatusCode, message: str, status: int
    ) -> Response:
        """A request refused before its body reaches the servicer (token, size, header, route the runner
        lacks): one log line and counted in ``fpedit_requests_total``, like gRPC's token refusals."""
        log.info("rpc=%s status=%s peer=%s transport=http detail=%r", route.rpc, code.name, peer, message)
        metrics = self.servicer.metrics
        if metrics is not None:
            metrics.observe(route.rpc, code.name, 0.0, None, transport="http")
        return error_response(code, message, status)

    async def _call(self, route: RpcRoute, request: Request) -> Response:
        peer = _peer(request)
        if self._expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                return self._refuse(
                    route, peer, grpc.StatusCode.UNAUTHENTICATED,
                    "missing or wrong bearer token (Authorization header)", 401,
                )  # fmt: skip
        timeout = request.headers.get(DEADLINE_HEADER)
        try:
            timeout_s = None if timeout is None else float(timeout)
            if timeout_s is not None and not timeout_s == timeout_s:  # NaN
                raise ValueError
        except ValueError:
            message = f"{DEADLINE_HEADER}: must be a number of seconds"
            return self._refuse(route, peer, grpc.StatusCode.INVALID_ARGUMENT, message, 400)
        if route.needs is not None and not hasattr(self.servicer.runner, route.needs):
            message = (
                f"{route.path} is served by the local runner only (fpedit serve without --ray); "
                "use `fpedit maps` for this model"
            )
            return self._refuse(route, peer, grpc.StatusCode.UNIMPLEMENTED, message, 501)
        context = HttpContext(peer, timeout_s)
        try:
            raw: bytes | JsonBody = b"" if route.http_method == "GET" else await self._body(route, request)
        except BodyTooLarge as exc:
            return self._refuse(route, peer, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), 413)
        except ClientDisconnect:
            return Response(status_code=499)
        method = getattr(self.servicer, route.rpc)
        loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(_watch_disconnect(request, context))
        if route.stream:
            return await self._stream(method, raw, context, watcher)
        try:
            response = await loop.run_in_executor(self.executor, method, raw, context)
        except Aborted as exc:
            return error_response(exc.code, exc.detail)
        finally:
            watcher.cancel()
        if route.encode is not None:
            return JSONResponse(await loop.run_in_executor(self.executor, route.encode, response))
        return Response(to_json(response), media_type="application/json")

    async def _stream(
        self, method: Callable, raw: bytes | JsonBody, context: HttpContext, watcher: asyncio.Future
    ) -> Response:
        """Server-sent events from the servicer's EditStream, run on a handler thread."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed (server stopping): nobody listens
                loop.call_soon_threadsafe(events.put_nowait, (kind, item))

        def pump() -> None:
            try:
                for event in method(raw, context):
                    put("event", event)
            except Aborted as exc:
                put("error", exc)
            except BaseException as exc:  # the servicer maps everything; this is a last resort
                log.error("EditStream failed", exc_info=exc)
                put("error", Aborted(grpc.StatusCode.INTERNAL, "internal error; see the server log"))
            finally:
                put("end", None)

        loop.run_in_executor(self.executor, pump)
        try:
            kind, first = await events.get()  # validation errors are answered with their HTTP status
        finally:
            watcher.cancel()
        if kind == "error":
            return error_response(first.code, first.detail)

        async def stream() -> AsyncIterator[str]:
            try:
                item: Any = first
                kind_now = kind
                while kind_now != "end":
                    if kind_now == "event":
                        yield f"data: {to_json(item)}\n\n"
                    else:  # an error after the stream began: the status is already 200
                        yield f"event: error\ndata: {json.dumps(error_body(item.code, item.detail))}\n\n"
                    kind_now, item = await events.get()
            finally:
                context.cancel()  # the client left (Starlette cancels this generator): stop the work

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def _body(self, route: RpcRoute, request: Request) -> JsonBody:
        """The body, read up to the size limit; multipart bodies are split into the JSON and the image."""
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        limit = self.multipart_limit if multipart else self.json_limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(_too_large(limit))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(_too_large(limit))
            chunks.append(chunk)
        body = b"".join(chunks)
        if not multipart:
            return JsonBody(body)
        if not route.multipart:
            return JsonBody(b"", error=f"{route.path} takes a JSON body, not multipart/form-data")
        return await _split_multipart(request, body, limit)


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (set by --max-message-mb)"


async def _split_multipart(request: Request, body: bytes, limit: int) -> JsonBody:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=1, max_part_size=limit)
    except HTTPException as exc:  # Starlette's multipart errors
        return JsonBody(b"", error=f"is not valid multipart/form-data ({exc.detail})")
    except Exception as exc:
        return JsonBody(b"", error=f"is not valid multipart/form-data ({type(exc).__name__})")
    try:
        unknown = sorted(set(form.keys()) - {"image", "request"})
        if unknown:
            return JsonBody(b"", error=f"unknown form part {unknown[0]!r}; send 'image' and 'request'")
        text = form.get("request")
        image = form.get("image")
        if text is not None and not isinstance(text, str):  # sent as a file: read it
            text = (await text.read()).decode("utf-8", "replace")
        if image is None:
            return JsonBody(b"", error="the multipart body has no 'image' file part")
        data = image.encode() if isinstance(image, str) else await image.read()
        return JsonBody((text or "").encode(), image=data)
    finally:
        await form.close()


async def _watch_disconnect(request: Request, context: HttpContext) -> None:
    """Cancel the request's work when the client disconnects (the body is read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            context.cancel()
            return


def _peer(request: Request) -> str:
    if request.client is None:
        return "unknown"
    host, port = request.client.host, request.client.port
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


# --- OpenAPI, from the proto descriptors --------------------------------------------------------------------

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
    # proto3 JSON writes 64-bit integers as strings (and reads either)
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}


def _field_schema(field: FieldDescriptor) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _field_schema(value)}
    if field.message_type is not None:
        schema: dict[str, Any] = {"$ref": f"#/components/schemas/{field.message_type.name}"}
    elif field.enum_type is not None:
        schema = {"$ref": f"#/components/schemas/{field.enum_type.name}"}
    else:
        schema = dict(_SCALARS[field.type])
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


def _message_schema(message: Descriptor) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {f.json_name: _field_schema(f) for f in message.fields},
    }
    if message.oneofs and not all(o.name.startswith("_") for o in message.oneofs):
        schema["description"] = "Exactly one of: " + ", ".join(
            f.json_name for o in message.oneofs if not o.name.startswith("_") for f in o.fields
        )
    return schema


def _enum_schema(enum: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [v.name for v in enum.values]}


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 of the HTTP routes; the schemas are written from the proto messages, so they match."""
    schemas: dict[str, Any] = {
        name: _message_schema(m) for name, m in pb.DESCRIPTOR.message_types_by_name.items()
    }
    schemas.update({name: _enum_schema(e) for name, e in pb.DESCRIPTOR.enum_types_by_name.items()})
    schemas["MapsRequest"] = MAPS_REQUEST_SCHEMA
    schemas["MapsResponse"] = MAPS_RESPONSE_SCHEMA
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "integer", "description": "the HTTP status"},
                    "status": {"type": "string", "description": "the gRPC status name"},
                    "message": {"type": "string", "description": "starts with the bad field's name"},
                },
            }
        },
    }
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    errors = {
        "400": {
            "description": "INVALID_ARGUMENT: a bad field, malformed JSON, unknown field, wrong type",
            **error,
        },
        "401": {"description": "UNAUTHENTICATED: missing or wrong bearer token (with --token)", **error},
        "404": {"description": "NOT_FOUND: unknown or expired inversion id", **error},
        "413": {"description": "the body is larger than --max-message-mb allows", **error},
        "429": {"description": "RESOURCE_EXHAUSTED: queue full or out of memory", **error},
        "503": {"description": "UNAVAILABLE: the server is draining", **error},
        "504": {"description": "DEADLINE_EXCEEDED: the X-Server-Timeout passed", **error},
        "500": {"description": "INTERNAL: a bug (details in the server log only)", **error},
    }
    unimplemented = {"description": "UNIMPLEMENTED: this runner (--ray) does not serve the route", **error}
    paths: dict[str, Any] = {}
    for route in API_ROUTES:
        response_ref = {"$ref": f"#/components/schemas/{route.response_name}"}
        grpc_name = (
            f"gRPC: fpedit.v1.EditService/{route.rpc}." if route.response is not None else "HTTP only."
        )
        operation: dict[str, Any] = {
            "operationId": route.rpc,
            "summary": route.summary,
            "description": grpc_name,
            "parameters": [
                {
                    "name": "X-Server-Timeout",
                    "in": "header",
                    "required": False,
                    "description": "deadline in seconds (DEADLINE_EXCEEDED, 504, once it passes)",
                    "schema": {"type": "number"},
                }
            ],
            "responses": {"200": {"description": "OK"}, **errors},
        }
        if route.needs is not None:
            operation["responses"]["501"] = unimplemented
        if route.stream:
            operation["responses"]["200"]["content"] = {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "description": "`data: <EditEvent JSON>` per event: progress events, then the result; "
                    "an error after the first event is `event: error` with the error body",
                }
            }
        else:
            operation["responses"]["200"]["content"] = {"application/json": {"schema": response_ref}}
        if route.http_method == "POST":
            request_ref = {"$ref": f"#/components/schemas/{route.request_name}"}
            content: dict[str, Any] = {"application/json": {"schema": request_ref}}
            if route.multipart:
                content["multipart/form-data"] = {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "format": "binary", "description": "the image file"},
                            "request": {
                                "type": "string",
                                "description": f"the rest of the {route.request_name} as JSON",
                            },
                        },
                    }
                }
            operation["requestBody"] = {"required": True, "content": content}
        paths.setdefault(route.path, {})[route.http_method.lower()] = operation
    probe = {"content": {"application/json": {"schema": {"type": "object"}}}}
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: 200 while the process serves.",
            "responses": {"200": {"description": "live", **probe}},
        }
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: 503 while draining.",
            "responses": {
                "200": {"description": "serving", **probe},
                "503": {"description": "draining", **probe},
            },
        }
    }
    paths["/"] = {"get": {"operationId": "editor", "summary": "The editor page (HTML, works offline).",
                          "responses": {"200": {"description": "HTML"}}}}  # fmt: skip
    import fpedit

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fpedit EditService (HTTP/JSON)",
            "version": fpedit.__version__,
            "description": "The gRPC EditService over HTTP: bodies are the proto3 JSON mapping of the "
            "fpedit.v1 messages (lowerCamelCase names, bytes as base64, 64-bit integers as strings).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


def _schema_text(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#{name}">{name}</a>'
    if schema.get("type") == "array":
        return _schema_text(schema["items"]) + "[]"
    if schema.get("type") == "object" and "additionalProperties" in schema:
        return "map&lt;string, " + _schema_text(schema["additionalProperties"]) + "&gt;"
    return escape(schema.get("type", "")) + (f" ({escape(schema['format'])})" if "format" in schema else "")


def docs_page(document: dict[str, Any]) -> str:
    """The API description as one HTML page written on the server (no script, nothing fetched)."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fpedit HTTP API</title><style>"
        "body{font:15px/1.5 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#1c2330}"
        "code,td{font-family:ui-monospace,monospace;font-size:13px}table{border-collapse:collapse;width:100%}"
        "td,th{border-bottom:1px solid #dde;padding:3px 8px;text-align:left;vertical-align:top}"
        ".m{display:inline-block;min-width:3.5em;font-weight:700;color:#fff;background:#3b6fd8;border-radius:4px;"
        "text-align:center;margin-right:.5em}.get{background:#2d9d5b}h3{margin-bottom:.2em}"
        "</style></head><body>",
        f"<h1>{escape(document['info']['title'])}</h1><p>{escape(document['info']['description'])}</p>",
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. The editor page: <a href='/'>/</a>. "
        "With <code>--token</code>, send <code>Authorization: Bearer TOKEN</code> (not needed for /, /docs, "
        '/openapi.json, /healthz, /readyz). Errors: <code>{"error": {"code", "status", "message"}}</code>.'
        "</p><h2>Routes</h2>",
    ]
    for path, methods in document["paths"].items():
        for verb, op in methods.items():
            parts.append(
                f"<h3><span class='m {verb}'>{verb.upper()}</span><code>{escape(path)}</code></h3>"
                f"<p>{escape(op['summary'])} {escape(op.get('description', ''))}</p>"
            )
            body = op.get("requestBody", {}).get("content", {})
            if body:
                kinds = ", ".join(
                    f"<code>{escape(kind)}</code>"
                    + (f" {_schema_text(spec['schema'])}" if "$ref" in spec["schema"] else "")
                    for kind, spec in body.items()
                )
                parts.append(f"<p>Body: {kinds}</p>")
            rows = []
            for status, response in op["responses"].items():
                shown = ", ".join(
                    f"<code>{escape(kind)}</code> {_schema_text(spec['schema'])}"
                    for kind, spec in response.get("content", {}).items()
                    if status == "200"
                )
                rows.append(f"<tr><td>{status}</td><td>{escape(response['description'])} {shown}</td></tr>")
            parts.append("<table>" + "".join(rows) + "</table>")
    parts.append("<h2>Messages</h2>")
    for name, schema in document["components"]["schemas"].items():
        parts.append(f"<h3 id='{escape(name)}'>{escape(name)}</h3>")
        if "enum" in schema:
            parts.append("<p>" + " | ".join(f"<code>{escape(v)}</code>" for v in schema["enum"]) + "</p>")
            continue
        rows = [
            f"<tr><td>{escape(field)}</td><td>{_schema_text(sub)}</td></tr>"
            for field, sub in schema.get("properties", {}).items()
        ]
        note = f"<p>{escape(schema['description'])}</p>" if "description" in schema else ""
        parts.append(note + "<table>" + "".join(rows) + "</table>")
    parts.append("</body></html>")
    return "".join(parts)


# --- the server thread --------------------------------------------------------------------------------------


class HttpFront:
    """uvicorn serving :class:`HttpApi` on its own thread and event loop, beside the gRPC server."""

    def __init__(self, servicer: EditServicer, config: ServerConfig) -> None:
        import uvicorn

        self.api = HttpApi(servicer, config)
        host = config.http_host or config.host
        self.scheme = "https" if config.tls_cert else "http"
        self.socket = _bind(host, config.http_port or 0)
        self.port = int(self.socket.getsockname()[1])
        self.host = host
        uv_config = uvicorn.Config(
            self.api.app,
            log_config=None,  # the process's logging set-up stays as it is
            access_log=False,  # the servicer writes one line per API request
            lifespan="off",
            ssl_certfile=config.tls_cert,
            ssl_keyfile=config.tls_key,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(uv_config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="fpedit-http", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def start(self, timeout_s: float = 30.0) -> HttpFront:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.socket.close()
                raise OSError(f"the HTTP front on {self.host}:{self.port} did not start (see the log)")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        """Stop accepting, finish open responses (a few seconds at most), stop the thread."""
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()
        self.api.executor.shutdown(wait=False, cancel_futures=True)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def start_http_front(servicer: EditServicer, config: ServerConfig) -> HttpFront:
    """Bind ``config.http_host``:``config.http_port`` (0 picks a free port) and serve the HTTP front."""
    return HttpFront(servicer, config).start()
