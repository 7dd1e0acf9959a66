"""HTTP routes of the jobs: ``POST /v1/jobs``, ``GET /v1/jobs``, ``GET /v1/jobs/{id}``,
``DELETE /v1/jobs/{id}``. Each builds the job RPC's request in the proto3 JSON mapping and calls the same
:class:`~.service.JobServicer` method gRPC calls, so validation, statuses, logs and metrics are shared; the
answer is the job's JSON of :mod:`.views` (``state`` as its short name)."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import TYPE_CHECKING, Any

import grpc
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..http_support import Aborted, HttpContext, JsonBody, body_too_large, error_response, peer_of
from ..logs import log_request
from .views import STATES, job_json, jobs_json, parse_state

if TYPE_CHECKING:
    from ..http import HttpApi

#: ``kind`` of ``POST /v1/jobs`` -> the SubmitJobRequest field that carries the synchronous body.
KINDS = ("edit", "generate", "invert")


class JobHttpContext(HttpContext):
    """An HTTP request's context that also shows its ``Authorization`` header, as gRPC metadata would."""

    def __init__(self, request: Request) -> None:
        super().__init__(peer_of(request), None)
        self._authorization = request.headers.get("authorization", "")

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", self._authorization),)


def submit_body(text: bytes) -> JsonBody:
    """``{"kind": ..., "webhookUrl": ..., <the synchronous route's body>}`` as a SubmitJobRequest; what is
    wrong with it is said by the servicer (INVALID_ARGUMENT, logged and counted)."""
    try:
        data = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):
        return JsonBody(text)  # the servicer's decode says what is wrong
    if not isinstance(data, dict):
        return JsonBody(text)
    kind = data.pop("kind", None)
    if kind not in KINDS:
        return JsonBody(b"", error=f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    wrapped: dict[str, Any] = {kind: data}
    for name in ("webhookUrl", "webhook_url"):
        if name in data:
            wrapped["webhookUrl"] = data.pop(name)
    return JsonBody(json.dumps(wrapped).encode())


def state_refusal(given: str) -> str:
    """Why ``?state=`` is refused: both forms are taken (the enum's names came first), the short ones shown."""
    return f"state: must be one of {', '.join(STATES)} (or JOB_STATE_<NAME>), got {given!r}"


def job_routes(api: HttpApi) -> list[Route]:
    """The job routes over ``api``'s servicer (none when the server runs no jobs)."""
    jobs = getattr(api.servicer, "jobs", None)
    if jobs is None:
        return []
    expected = f"Bearer {api.config.token}".encode() if api.config.token else None

    async def call(rpc: str, request: Request, body: JsonBody, status: int = 200) -> Response:
        context = JobHttpContext(request)
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                code = grpc.StatusCode.UNAUTHENTICATED
                log_request({"method": rpc, "status": code.name, "peer": context.peer(), "transport": "http"})
                if api.servicer.metrics is not None:
                    api.servicer.metrics.observe(rpc, code.name, 0.0, None, transport="http")
                return error_response(code, "missing or wrong bearer token (Authorization header)", 401)
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(api.executor, getattr(jobs, rpc), body, context)
        except Aborted as exc:
            return error_response(exc.code, exc.detail)
        if rpc == "ListJobs":
            return Response(jobs_json(answer), status_code=status, media_type="application/json")
        headers = {"Location": f"/v1/jobs/{answer.id}"} if rpc == "SubmitJob" else None
        return Response(job_json(answer), status_code=status, media_type="application/json", headers=headers)

    async def submit(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > api.json_limit:
            return error_response(grpc.StatusCode.RESOURCE_EXHAUSTED, body_too_large(api.json_limit), 413)
        try:
            text = await request.body()
        except ClientDisconnect:
            return Response(status_code=499)
        if len(text) > api.json_limit:
            return error_response(grpc.StatusCode.RESOURCE_EXHAUSTED, body_too_large(api.json_limit), 413)
        return await call("SubmitJob", request, submit_body(text), status=202)

    async def get(request: Request) -> Response:
        body = JsonBody(json.dumps({"id": request.path_params["job_id"]}).encode())
        return await call("GetJob", request, body)

    async def cancel(request: Request) -> Response:
        body = JsonBody(json.dumps({"id": request.path_params["job_id"]}).encode())
        return await call("CancelJob", request, body)

    async def listing(request: Request) -> Response:
        query = request.query_params
        fields: dict[str, Any] = {}
        state = query.get("state")
        if state:
            name = parse_state(state)
            if name is None:  # refused by the servicer (400, logged and counted), naming what was given
                return await call("ListJobs", request, JsonBody(b"", error=state_refusal(state)))
            fields["state"] = f"JOB_STATE_{name.upper()}"
        limit = query.get("limit")
        if limit:
            fields["limit"] = int(limit) if limit.isdigit() else limit
        token = query.get("page_token") or query.get("pageToken")
        if token:
            fields["pageToken"] = token
        return await call("ListJobs", request, JsonBody(json.dumps(fields).encode()))

    return [
        Route("/v1/jobs", submit, methods=["POST"]),
        Route("/v1/jobs", listing, methods=["GET"]),
        Route("/v1/jobs/{job_id}", get, methods=["GET"]),
        Route("/v1/jobs/{job_id}", cancel, methods=["DELETE"]),
    ]
