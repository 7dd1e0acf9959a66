"""Errors of the serving layer, beside the engine's (:mod:`fpedit.engine.errors`): a request the service
cannot take now. The engine never raises them; the runners, the servicer and the Ray front do."""

from __future__ import annotations

from fpedit.engine.errors import FpeditError, NotFoundError


class OverloadedError(FpeditError):
    """Every worker is busy and the wait queue is full: retry later."""

    @classmethod
    def busy(cls, pending: int, capacity: int) -> OverloadedError:
        return cls(f"server busy: {pending} requests running or queued (limit {capacity})")


def unknown_inversion(inversion_id: str) -> NotFoundError:
    """An inversion id the cache does not hold (never issued here, or evicted or expired)."""
    return NotFoundError(f"inversion_id {inversion_id!r} is unknown or expired; send the image again")


class UnavailableError(FpeditError):
    """The service is not taking this request now (draining for shutdown, or shut down mid-request)."""


class UnimplementedError(FpeditError):
    """This runner does not serve the call (the Ray front has no attention maps): UNIMPLEMENTED, 501."""


class MessageTooLargeError(FpeditError):
    """A request or response over ``--max-message-mb``: counted and answered like any other refusal."""
