"""Whether the ``ray`` extra is installed: checked before anything starts, answered in one CLI line."""

from __future__ import annotations

from fpedit.engine.errors import InvalidInputError

RAY_MISSING = "Ray Serve is not installed: pip install 'fpedit[ray]'"


def require_ray() -> None:
    """Raise :class:`InvalidInputError` (one CLI line) when the ``ray`` extra is missing."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise InvalidInputError("ray", RAY_MISSING) from exc
