"""Exceptions a caller can act on.

Every user mistake is an :class:`InvalidInputError` (a ``ValueError``) that names the offending field, so the
CLI can print one line and the gRPC server can map it to INVALID_ARGUMENT without parsing messages.
"""

from __future__ import annotations


class FpeditError(Exception):
    """Base class for errors raised by fpedit."""


class InvalidInputError(FpeditError, ValueError):
    """A request field is invalid; ``field`` names it (e.g. ``"layers"``, ``"image"``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}")


class ModelLoadError(FpeditError):
    """A model folder, an export directory or an engine file is missing, malformed or refused."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is not shaped like Stable Diffusion 1.x (16 self-attention layers, epsilon prediction)."""


class CancelledError(FpeditError):
    """The caller asked to stop (client went away, server shutting down); raised by a cancel check."""


class DeadlineExceededError(CancelledError):
    """The request's deadline passed before or while it ran."""


class NotFoundError(FpeditError):
    """A referenced object (an inversion id) is unknown or has expired."""
