"""fpedit: a production engine for Free-Prompt-Editing with Stable Diffusion 1.x.

from fpedit import EditEngine, EditOptions
engine = EditEngine.from_pretrained("tiny")            # or a local diffusers SD 1.x folder
result = engine.edit_real(image, "a red car", options=EditOptions(steps=50))

The engine names load on first use, so ``import fpedit.server.client`` (the gRPC client, ``fpedit[client]``)
does not pull in torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("fpedit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

_ENGINE_NAMES = (
    "EditEngine",
    "EditOptions",
    "EditResult",
    "EngineConfig",
    "InvalidInputError",
    "Inversion",
    "InversionOptions",
    "ModelLoadError",
    "ProgressEvent",
)

__all__ = [
    "EditEngine",
    "EditOptions",
    "EditResult",
    "EngineConfig",
    "InvalidInputError",
    "Inversion",
    "InversionOptions",
    "ModelLoadError",
    "ProgressEvent",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from fpedit.engine import (
        EditEngine,
        EditOptions,
        EditResult,
        EngineConfig,
        InvalidInputError,
        Inversion,
        InversionOptions,
        ModelLoadError,
        ProgressEvent,
    )


def __getattr__(name: str) -> Any:
    if name not in _ENGINE_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import fpedit.engine

    value = getattr(fpedit.engine, name)
    globals()[name] = value
    return value
