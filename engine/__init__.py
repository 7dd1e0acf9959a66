"""The fpedit engine: FPE algorithms above a small backend interface (torch, ONNX Runtime, TensorRT).

Names are imported on first use (PEP 562): ``fpedit.engine.errors`` or ``.contract`` cost nothing, so the gRPC
client and the CLI's ``--help`` never import torch, diffusers or transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

#: public name -> submodule that defines it
_EXPORTS = {
    "PAPER_LAYERS": "contract",
    "ModelSpec": "contract",
    "CancelledError": "errors",
    "FpeditError": "errors",
    "InvalidInputError": "errors",
    "ModelLoadError": "errors",
    "UnsupportedModelError": "errors",
    "AttentionMaps": "maps",
    "Injection": "maps",
    "EditOptions": "options",
    "InversionOptions": "options",
    "EngineConfig": "config",
    "EditEngine": "pipeline",
    "ProgressEvent": "pipeline",
    "EditResult": "results",
    "Inversion": "results",
}

__all__ = [
    "PAPER_LAYERS",
    "AttentionMaps",
    "CancelledError",
    "EditEngine",
    "EditOptions",
    "EditResult",
    "EngineConfig",
    "FpeditError",
    "Injection",
    "InvalidInputError",
    "Inversion",
    "InversionOptions",
    "ModelLoadError",
    "ModelSpec",
    "ProgressEvent",
    "UnsupportedModelError",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .config import EngineConfig
    from .contract import PAPER_LAYERS, ModelSpec
    from .errors import CancelledError, FpeditError, InvalidInputError, ModelLoadError, UnsupportedModelError
    from .maps import AttentionMaps, Injection
    from .options import EditOptions, InversionOptions
    from .pipeline import EditEngine, ProgressEvent
    from .results import EditResult, Inversion


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
