"""What a failed request means to its client: one table for every runner and transport.

The local runner and the Ray replicas raise the same fpedit errors; the gRPC servicer turns them into status
codes, the Ray boundary carries them by type name, and an HTTP front can map the same outcome names (gRPC
status code names) to HTTP statuses. Device out-of-memory is recognised here and nowhere else.
"""

from __future__ import annotations

from fpedit.engine.errors import (
    CancelledError,
    DeadlineExceededError,
    FpeditError,
    InvalidInputError,
    NotFoundError,
)

from .errors import MessageTooLargeError, OverloadedError, UnavailableError, UnimplementedError

#: Error types a client can act on, most specific first, with their outcome (a gRPC status code name).
CLIENT_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (InvalidInputError, "INVALID_ARGUMENT"),
    (NotFoundError, "NOT_FOUND"),
    (OverloadedError, "RESOURCE_EXHAUSTED"),
    (MessageTooLargeError, "RESOURCE_EXHAUSTED"),
    (UnavailableError, "UNAVAILABLE"),
    (DeadlineExceededError, "DEADLINE_EXCEEDED"),
    (CancelledError, "CANCELLED"),
    (UnimplementedError, "UNIMPLEMENTED"),
)

OUT_OF_MEMORY = "out of memory; retry with a smaller image or fewer steps"


def is_out_of_memory(exc: BaseException) -> bool:
    """Host (MemoryError) or device (torch.OutOfMemoryError) memory ran out."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        return isinstance(exc, torch.OutOfMemoryError)
    except (ImportError, AttributeError):
        return False


def outcome_of(exc: BaseException) -> tuple[str, str]:
    """(outcome name, client-facing message) of an exception raised while serving a request."""
    for kind, outcome in CLIENT_ERRORS:
        if isinstance(exc, kind):
            return outcome, str(exc)
    if is_out_of_memory(exc):
        return "RESOURCE_EXHAUSTED", OUT_OF_MEMORY
    if isinstance(exc, FpeditError):
        return "FAILED_PRECONDITION", str(exc)
    return "INTERNAL", f"internal error ({type(exc).__name__}); see the server log"
