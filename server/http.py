"""HTTP/JSON front of the EditService, beside gRPC on the same servicer, runner, cache, metrics and drain.

Why this shape: a request over HTTP takes the *same* path as one over gRPC. Each handler hands the servicer
(:class:`~fpedit.server.service.EditServicer`) a body it decodes with protobuf's ``json_format`` into the
very request message gRPC carries, and an :class:`~.http_support.HttpContext` that stands in for
``grpc.ServicerContext`` (deadline, cancellation, peer; the token is checked before the body is read). So
validation, the queue, the inversion cache, status codes, the log line and the metrics (``transport="http"``)
cannot drift between the two transports. The servicer's gRPC status becomes an HTTP status by
:data:`~.http_support.HTTP_STATUS` (Google's mapping) with the body
``{"error": {"code", "status", "message"}}``. The OpenAPI document and the ``/docs`` page are written from
the proto descriptors in :mod:`.openapi`.

Routes: ``POST /v1/edit`` (JSON, or ``multipart/form-data`` with an ``image`` file, an optional ``mask``
file (a blend's mask, docs/design.md) and a ``request`` JSON
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
from importlib import resources
from typing import Any

import grpc
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fpedit.engine.options import OPTION_RANGES
from fpedit.v1 import edit_pb2 as pb

from .config import ServerConfig
from .health import runner_readiness
from .http_support import (
    Aborted,
    BodyTooLarge,
    HttpContext,
    JsonBody,
    body_too_large,
    error_body,
    error_response,
    peer_of,
    to_json,
)
from .logs import log_request
from .maps import maps_json
from .openapi import docs_page, openapi_document
from .service import EditServicer

log = logging.getLogger("fpedit.server")

#: HTTP status -> status name, for errors raised by the HTTP layer itself (unknown route, wrong method).
_STATUS_NAME = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
                413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                501: "UNIMPLEMENTED"}  # fmt: skip

#: Header that sets a request's deadline in seconds (Google's HTTP APIs use the same name).
DEADLINE_HEADER = "x-server-timeout"
#: Slack over the decoded message limit for the JSON around it (field names, base64 line-up).
BODY_SLACK_BYTES = 64 * 1024


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
    #: Served by the local runner only: the Ray front's runner refuses it (UNIMPLEMENTED, 501; documented).
    local_only: bool = False
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
             encode=maps_json, local_only=True, schemas=("MapsRequest", "MapsResponse")),
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
        from .jobs.routes import job_routes  # POST/GET/DELETE /v1/jobs (jobs.routes)

        routes += job_routes(self)
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},
        )
        self._openapi = openapi_document(API_ROUTES)

    # --- plain routes ---------------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        """The editor, with the engine's option ranges written in: its inputs carry the limits the server
        enforces (one table, :data:`~fpedit.engine.options.OPTION_RANGES`), not copies of them."""
        html = resources.files("fpedit.server").joinpath("static/editor.html").read_text(encoding="utf-8")
        html = html.replace("{{OPTION_RANGES}}", json.dumps(OPTION_RANGES))
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "SERVING"})

    async def readyz(self, request: Request) -> Response:
        if self.servicer.draining:
            return JSONResponse({"status": "NOT_SERVING", "reason": "draining"}, status_code=503)
        serving, reason = runner_readiness(self.servicer.runner)  # from memory: never waits on the runner
        if not serving:
            return JSONResponse({"status": "NOT_SERVING", "reason": reason}, status_code=503)
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
        log_request(
            {"method": route.rpc, "status": code.name, "peer": peer, "transport": "http", "detail": message}
        )
        metrics = self.servicer.metrics
        if metrics is not None:
            metrics.observe(route.rpc, code.name, 0.0, None, transport="http")
        return error_response(code, message, status)

    async def _call(self, route: RpcRoute, request: Request) -> Response:
        peer = peer_of(request)
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
            raise BodyTooLarge(body_too_large(limit))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(body_too_large(limit))
            chunks.append(chunk)
        body = b"".join(chunks)
        if not multipart:
            return JsonBody(body)
        if not route.multipart:
            return JsonBody(b"", error=f"{route.path} takes a JSON body, not multipart/form-data")
        return await _split_multipart(request, body, limit)


async def _split_multipart(request: Request, body: bytes, limit: int) -> JsonBody:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=2, max_fields=1, max_part_size=limit)
    except HTTPException as exc:  # Starlette's multipart errors
        return JsonBody(b"", error=f"is not valid multipart/form-data ({exc.detail})")
    except Exception as exc:
        return JsonBody(b"", error=f"is not valid multipart/form-data ({type(exc).__name__})")
    try:
        unknown = sorted(set(form.keys()) - {"image", "request", "mask"})
        if unknown:
            return JsonBody(
                b"", error=f"unknown form part {unknown[0]!r}; send 'image', 'request' and optionally 'mask'"
            )
        text = form.get("request")
        image = form.get("image")
        if text is not None and not isinstance(text, str):  # sent as a file: read it
            text = (await text.read()).decode("utf-8", "replace")
        if image is None:
            return JsonBody(b"", error="the multipart body has no 'image' file part")
        data = image.encode() if isinstance(image, str) else await image.read()
        mask = form.get("mask")
        mask_data = None if mask is None else mask.encode() if isinstance(mask, str) else await mask.read()
        return JsonBody((text or "").encode(), image=data, mask=mask_data)
    finally:
        await form.close()


async def _watch_disconnect(request: Request, context: HttpContext) -> None:
    """Cancel the request's work when the client disconnects (the body is read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            context.cancel()
            return


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
