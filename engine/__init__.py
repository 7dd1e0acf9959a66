"""The fpedit engine: FPE algorithms above a small backend interface (torch, ONNX Runtime, TensorRT)."""

from .contract import PAPER_LAYERS, ModelSpec
from .errors import CancelledError, FpeditError, InvalidInputError, ModelLoadError, UnsupportedModelError
from .maps import AttentionMaps, Injection
from .options import EditOptions
from .pipeline import EditEngine, ProgressEvent
from .results import EditResult, Inversion

__all__ = [
    "PAPER_LAYERS",
    "AttentionMaps",
    "CancelledError",
    "EditEngine",
    "EditOptions",
    "EditResult",
    "FpeditError",
    "Injection",
    "InvalidInputError",
    "Inversion",
    "ModelLoadError",
    "ModelSpec",
    "ProgressEvent",
    "UnsupportedModelError",
]
