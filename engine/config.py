"""What an engine is built from, as one typed value (:class:`EngineConfig`).

The CLI maps its flags to it once (``fpedit.engine.flags``), the server passes it on, and Ray pickles it to every
replica: nothing below the command line sees argparse. Importing this module costs no torch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import ADAPTER_BATCHING, DEFAULT_ADAPTER_BATCHING, DEFAULT_MAX_ADAPTERS
from .errors import InvalidInputError
from .lora import parse_lora

#: The backends and the engine dtypes (torch names): the one table the CLI choices and the loaders read.
BACKENDS = ("torch", "onnxruntime", "tensorrt")
DTYPES = ("float32", "float16", "bfloat16")
#: The backend an export or engine folder was made for, by its manifest's ``format``.
BACKEND_BY_FORMAT = {"fpedit-onnx": "onnxruntime", "fpedit-tensorrt": "tensorrt"}
#: Bytes of captured source maps an engine keeps per inversion set (LRU over inversions).
DEFAULT_MAP_CACHE_BYTES = 4 * 1024**3


def manifest_backend(model: str | Path) -> str | None:
    """The backend the folder ``model`` was exported for (its ``manifest.json``), or None (a diffusers
    folder, ``tiny``, or an unreadable manifest)."""
    manifest = Path(model).expanduser() / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return BACKEND_BY_FORMAT.get(json.loads(manifest.read_text()).get("format"))
    except (OSError, ValueError, AttributeError):
        return None


def resolve_backend(model: str | Path, backend: str | None) -> str:
    """``backend``, or the one ``model``'s manifest names (else torch); an explicit backend that is not the
    one the folder was made for is refused here, before any loading."""
    made_for = manifest_backend(model)
    if backend is None:
        return made_for or "torch"
    if made_for and backend != made_for:
        raise InvalidInputError(
            "backend",
            f"{Path(model).expanduser()} was made for --backend {made_for}; add --backend {made_for} "
            "(or leave it out)",
        )
    return backend


@dataclass(frozen=True)
class EngineConfig:
    """Everything :meth:`EditEngine.from_config <fpedit.engine.pipeline.EditEngine.from_config>` needs.

    ``backend=None`` takes the one the model folder's manifest names (torch for a diffusers folder or
    ``"tiny"``); ``dtype=None`` the backend's default (float16 on CUDA, float32 on the CPU, an export's own).
    ``backend_options`` tune the backend (torch: ``vae_dtype``, ``cuda_graphs``, ``compile_unet``, ...).
    ``model_config``, ``prediction_type`` and ``loras`` describe a single-file checkpoint and what is fused
    into it (torch; docs/models.md). The engine limits left ``None`` take the engine's defaults.
    """

    model: str = "tiny"
    backend: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    #: A single-file checkpoint's description: a diffusers folder with its configs and tokenizer (torch).
    model_config: str | None = None
    #: ``epsilon`` or ``v_prediction`` where the checkpoint does not say (torch).
    prediction_type: str | None = None
    #: LoRA files fused into the weights at load, as (path, scale) pairs (``FILE[:SCALE]`` strings accepted).
    loras: tuple[tuple[str, float], ...] = ()
    #: A folder of LoRA files (``*.safetensors``, name = stem) requests may pick per request (torch).
    lora_dir: str | None = None
    #: Most adapters one request may combine.
    max_adapters: int = DEFAULT_MAX_ADAPTERS
    allow_pickle: bool = False
    providers: tuple[str, ...] | None = None
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    batching: bool = False
    max_wait_ms: float = 0.0
    #: With batching: ``mix`` lets calls of different adapter sets share a backend call (a scale per row),
    #: ``group`` runs only calls of one set together, ``auto`` is group under CUDA graphs and mix elsewhere.
    adapter_batching: str = DEFAULT_ADAPTER_BATCHING
    map_cache_bytes: int = DEFAULT_MAP_CACHE_BYTES
    max_side: int | None = None
    max_input_pixels: int | None = None
    max_prompt_chars: int | None = None
    capture_batch: int | None = None
    show_progress: bool = False
    image_formats: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Device, dtype and backend names are judged where they are used (create_backend), with the same
        # messages for a config as for from_pretrained's keywords; the CLI's choices refuse them earlier.
        object.__setattr__(self, "model", str(self.model))
        if self.model_config is not None:
            object.__setattr__(self, "model_config", str(self.model_config))
        pairs = tuple((str(spec.path), spec.scale) for spec in map(parse_lora, self.loras or ()))
        object.__setattr__(self, "loras", pairs)
        if self.lora_dir is not None:
            object.__setattr__(self, "lora_dir", str(self.lora_dir))
        if (
            isinstance(self.max_adapters, bool)
            or not isinstance(self.max_adapters, int)
            or self.max_adapters < 0
        ):
            raise InvalidInputError("max_adapters", f"must be an integer >= 0, got {self.max_adapters!r}")
        if self.adapter_batching not in ADAPTER_BATCHING:
            raise InvalidInputError(
                "adapter_batching",
                f"must be one of {', '.join(ADAPTER_BATCHING)}, got {self.adapter_batching!r}",
            )
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))
        if self.image_formats is not None:
            object.__setattr__(self, "image_formats", tuple(self.image_formats))
        object.__setattr__(self, "backend_options", dict(self.backend_options))

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolved(self) -> EngineConfig:
        """This config with ``backend`` settled (see :func:`resolve_backend`)."""
        backend = resolve_backend(self.model, self.backend)
        return self if backend == self.backend else self.replace(backend=backend)

    def backend_kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`fpedit.engine.backends.create_backend` besides the model and backend."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "allow_pickle": self.allow_pickle,
            "providers": list(self.providers) if self.providers is not None else None,
            "backend_options": dict(self.backend_options),
            "model_config": self.model_config,
            "prediction_type": self.prediction_type,
            "loras": list(self.loras),
            "lora_dir": self.lora_dir,
        }

    def engine_kwargs(self) -> dict[str, Any]:
        """Keywords of the :class:`EditEngine` constructor (limits left ``None`` are left out)."""
        kwargs: dict[str, Any] = {
            "batching": self.batching,
            "max_wait_ms": self.max_wait_ms,
            "adapter_batching": self.adapter_batching,
            "map_cache_bytes": self.map_cache_bytes,
            "show_progress": self.show_progress,
            "max_adapters": self.max_adapters,
        }
        optional = {
            "max_side": self.max_side,
            "max_input_pixels": self.max_input_pixels,
            "max_prompt_chars": self.max_prompt_chars,
            "capture_batch": self.capture_batch,
            "image_formats": self.image_formats,
        }
        kwargs.update({name: value for name, value in optional.items() if value is not None})
        return kwargs

    @classmethod
    def from_keywords(
        cls,
        model: str | Path,
        backend: str | None,
        device: str,
        dtype: str | None,
        *,
        allow_pickle: bool = False,
        providers: Sequence[str] | None = None,
        backend_options: Mapping[str, Any] | None = None,
        **engine_kwargs: Any,
    ) -> EngineConfig:
        """``EditEngine.from_pretrained``'s keywords as a config; an unknown engine keyword is a TypeError,
        as the constructor's would be."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine keyword {unknown[0]!r}")
        return cls(
            model=str(model),
            backend=backend,
            device=device,
            dtype=dtype,
            allow_pickle=allow_pickle,
            providers=tuple(providers) if providers is not None else None,
            backend_options=dict(backend_options or {}),
            **engine_kwargs,
        )
