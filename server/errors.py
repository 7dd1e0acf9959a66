"""Errors of the serving layer, beside the engine's (:mod:`fpedit.engine.errors`): a request the service
cannot take now. The engine never raises them; the runners, the servicer and the Ray front do."""

from __future__ import annotations

from fpedit.engine.errors import FpeditError


class OverloadedError(FpeditError):
    """Every worker is busy and the wait queue is full: retry later."""


class UnavailableError(FpeditError):
    """The service is not taking this request now (draining for shutdown, or shut down mid-request)."""


class MessageTooLargeError(FpeditError):
    """A request or response over ``--max-message-mb``: counted and answered like any other refusal."""
