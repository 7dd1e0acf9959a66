"""fpedit: a production engine for Free-Prompt-Editing with Stable Diffusion 1.x.

from fpedit import EditEngine, EditOptions
engine = EditEngine.from_pretrained("tiny")            # or a local diffusers SD 1.x folder
result = engine.edit_real(image, "a red car", options=EditOptions(steps=50))
"""

from importlib.metadata import PackageNotFoundError, version

from fpedit.engine import (
    EditEngine,
    EditOptions,
    EditResult,
    InvalidInputError,
    Inversion,
    ModelLoadError,
    ProgressEvent,
)

try:
    __version__ = version("fpedit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = [
    "EditEngine",
    "EditOptions",
    "EditResult",
    "InvalidInputError",
    "Inversion",
    "ModelLoadError",
    "ProgressEvent",
    "__version__",
]
