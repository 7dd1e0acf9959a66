"""Errors across the Ray boundary: fpedit errors travel by value and come out of the front as the same types
a :class:`~fpedit.server.runner.LocalRunner` raises; Ray's and Serve's own failures map onto them."""

from __future__ import annotations

import asyncio

from fpedit.engine.errors import CancelledError, InvalidInputError

from ..errors import OverloadedError, UnavailableError
from ..outcomes import CLIENT_ERRORS, is_out_of_memory

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


def translate(exc: BaseException) -> BaseException:
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
