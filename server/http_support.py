"""Request plumbing of the HTTP front (:mod:`.http`): the gRPC -> HTTP status table, error bodies, the
stand-in for ``grpc.ServicerContext`` and the JSON request body the servicer decodes."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import JSONResponse

from fpedit.engine.errors import InvalidInputError

from .convert import parse_json

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
    mask: bytes | None = None  # and its ``mask`` part: ``options.mask``
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
        message = parse_json(data, message_type())
        if self.image is not None:
            if "image" not in message_type.DESCRIPTOR.fields_by_name:
                raise InvalidInputError("image", f"{name} takes no image")
            if message.image:
                raise InvalidInputError("image", "give the image as the file part or in the JSON, not both")
            message.image = self.image
        if self.mask is not None:
            if "options" not in message_type.DESCRIPTOR.fields_by_name:
                raise InvalidInputError("mask", f"{name} takes no mask")
            if message.options.mask:
                raise InvalidInputError("mask", "give the mask as the file part or in the JSON, not both")
            message.options.mask = self.mask
        return message


class BodyTooLarge(Exception):
    pass


def body_too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (set by --max-message-mb)"


def peer_of(request: Request) -> str:
    if request.client is None:
        return "unknown"
    host, port = request.client.host, request.client.port
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
