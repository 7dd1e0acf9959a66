"""The job RPCs (SubmitJob, GetJob, ListJobs, CancelJob, WatchJob) of ``fpedit.v1.EditService``, served by a
generic handler beside the servicer's own, through its status mapping, log line and metrics; the HTTP routes
(:mod:`.routes`) call the same methods, as the HTTP front does for the synchronous calls."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc

from fpedit.v1 import edit_pb2 as pb

from ..service import SERVICE_NAME, EditServicer, raw_stream, raw_unary
from .manager import JobManager


def token_of(context: Any) -> str | None:
    """The bearer token the call presented (the interceptor or the HTTP front checked it already)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and str(value).startswith("Bearer "):
            return str(value)[len("Bearer ") :]
    return None


class JobServicer:
    """The job RPCs over one :class:`JobManager`."""

    def __init__(self, servicer: EditServicer, manager: JobManager) -> None:
        self.servicer = servicer
        self.manager = manager

    def _owner_token(self, context: Any) -> str | None:
        # Without a server token every caller is the same caller (as for inversion ids).
        return token_of(context) if self.servicer.config.token else None

    def SubmitJob(self, raw: Any, context: Any) -> pb.Job:
        def body() -> pb.Job:
            request = self.servicer.parse_request(pb.SubmitJobRequest, raw)
            return self.manager.submit(request, self._owner_token(context))

        return self.servicer.unary("SubmitJob", context, body)

    def GetJob(self, raw: Any, context: Any) -> pb.Job:
        def body() -> pb.Job:
            request = self.servicer.parse_request(pb.GetJobRequest, raw)
            return self.manager.get(request.id, self._owner_token(context))

        return self.servicer.unary("GetJob", context, body)

    def ListJobs(self, raw: Any, context: Any) -> pb.ListJobsResponse:
        def body() -> pb.ListJobsResponse:
            request = self.servicer.parse_request(pb.ListJobsRequest, raw)
            return self.manager.list(request, self._owner_token(context))

        return self.servicer.unary("ListJobs", context, body)

    def CancelJob(self, raw: Any, context: Any) -> pb.Job:
        def body() -> pb.Job:
            request = self.servicer.parse_request(pb.CancelJobRequest, raw)
            return self.manager.cancel(request.id, self._owner_token(context))

        return self.servicer.unary("CancelJob", context, body)

    def WatchJob(self, raw: Any, context: Any) -> Iterator[pb.Job]:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            request = self.servicer.parse_request(pb.GetJobRequest, raw)
            yield from self.manager.watch(request.id, self._owner_token(context), context.is_active)
        except GeneratorExit:
            raise
        except Exception as exc:
            failure = exc
        code, detail = self.servicer.record("WatchJob", context, started, failure)
        if failure is not None:
            context.abort(code, detail)

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "SubmitJob": raw_unary(self.SubmitJob, pb.Job),
                "GetJob": raw_unary(self.GetJob, pb.Job),
                "ListJobs": raw_unary(self.ListJobs, pb.ListJobsResponse),
                "CancelJob": raw_unary(self.CancelJob, pb.Job),
                "WatchJob": raw_stream(self.WatchJob, pb.Job),
            },
        )
