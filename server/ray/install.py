"""Whether the ``ray`` extra is installed, and keeping a Ray instance this process starts on loopback."""

from __future__ import annotations

import os
import sys

from fpedit.engine.errors import InvalidInputError

RAY_MISSING = "Ray Serve is not installed: pip install 'fpedit[ray]'"

#: Read by Ray once, when it is imported. "0" gives a Ray instance started by this process the loopback
#: address as its node address (Ray's default on macOS and Windows); on Linux Ray otherwise takes the
#: machine's outside address, and its GCS, raylet, workers and agents listen there or on every interface.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def require_ray(local: bool = False) -> None:
    """Raise :class:`InvalidInputError` (one CLI line) when the ``ray`` extra is missing. ``local``: this
    process will start its own Ray instance, so it is kept on loopback (:func:`local_ray_on_loopback`),
    which must happen before Ray is first imported."""
    if local:
        local_ray_on_loopback()
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise InvalidInputError("ray", RAY_MISSING) from exc


def starts_local_ray(address: str | None) -> bool:
    """Whether ``ray.init(address)`` starts a new local instance rather than joining one."""
    return not address and not os.environ.get("RAY_ADDRESS")


def local_ray_on_loopback() -> bool:
    """Ask that a Ray instance this process starts listens on loopback; False when it is too late (Ray was
    imported already with multi-node addressing on), so that the caller can say so. An operator's own
    setting of :data:`LOCAL_ONLY_ENV` wins."""
    os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    constants = sys.modules.get("ray._private.ray_constants")
    return constants is None or not getattr(constants, "ENABLE_RAY_CLUSTER", True)
