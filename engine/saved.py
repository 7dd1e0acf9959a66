"""Inversions on disk: one safetensors file per inversion, checked against the engine that loads it.

An inversion is only meaningful to the model that computed it: its trajectory is that UNet's DDIM path from
that VAE's encoding, and its null embeddings live in that text encoder's space. So the file records the
engine's *fingerprint* — backend, UNet/text precision (and the torch backend's VAE decoder precision), the
scheduler's betas, and a sha256 of the weights with their configs — and :func:`load_inversion` refuses a file
whose fingerprint differs, naming the first field that does. The device is left out on purpose: a trajectory
computed on a GPU is valid on the CPU (their results differ by rounding only).

Saved: the trajectory (float32, exact bits), the null embeddings (Algorithm 3), the working-size image, the
method, source prompt, guidance, step count, working and original sizes, and the inversion's statistics.
Cached source maps and the reconstruction are not saved: the first edit after loading recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import normalize_adapters
from .errors import InvalidInputError
from .paths import write_atomically

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .pipeline import EditEngine
    from .results import Inversion

# Imports stay light (no torch) so that the command line can check a file before it loads a model.

FORMAT = "fpedit-inversion"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
#: Fingerprint fields in the order they are compared: the cheapest explanation of a mismatch comes first.
FINGERPRINT_FIELDS = ("backend", "dtype", "vae_dtype", "scheduler", "weights")
FIELD = "inversion_file"
#: A safetensors header longer than this is not one of ours (ours are a few kB).
MAX_HEADER_BYTES = 16 * 1024 * 1024


def engine_fingerprint(engine: EditEngine) -> dict[str, str]:
    """What makes a trajectory valid for ``engine``: see the module docstring."""
    described = engine.backend.describe()
    return {
        "backend": str(described["backend"]),
        "dtype": str(described["dtype"]),
        "vae_dtype": str(described.get("vae_dtype", "")),
        "scheduler": json.dumps(engine.spec.scheduler, sort_keys=True, default=str),
        "weights": engine.backend.weights_digest(),
    }


def fingerprint_digest(fields: dict[str, str]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def check_save_path(path: str | os.PathLike, field: str = "path") -> Path:
    """Refuse, before any work, a path an inversion could not be saved to."""
    target = Path(path).expanduser()
    if target.suffix.lower() != SUFFIX:
        raise InvalidInputError(field, f"{target}: the file name must end in {SUFFIX}")
    if target.is_dir():
        raise InvalidInputError(field, f"{target} is a directory; give a file name such as inversion{SUFFIX}")
    if target.parent.exists() and not target.parent.is_dir():
        raise InvalidInputError(field, f"{target.parent} is not a directory")
    return target


def save_inversion(engine: EditEngine, inversion: Inversion, path: str | os.PathLike) -> Path:
    """Write ``inversion`` (computed by ``engine``) to ``path`` atomically: a reader never sees half a file."""
    import numpy as np
    import torch
    from safetensors.torch import save

    from .results import Inversion

    if not isinstance(inversion, Inversion):
        raise InvalidInputError("inversion", f"expected an Inversion, got {type(inversion).__name__}")
    if inversion.engine_id != engine.engine_id:
        raise InvalidInputError("inversion", "was computed by another engine; save it with that engine")
    target = check_save_path(path)
    tensors = {
        "trajectory": inversion.trajectory.detach().to("cpu", torch.float32).contiguous(),
        "image": torch.from_numpy(np.array(inversion.image.convert("RGB"), dtype=np.uint8)),
    }
    if inversion.null_embeddings is not None:
        tensors["null_embeddings"] = inversion.null_embeddings.detach().to("cpu", torch.float32).contiguous()
    fingerprint = engine.fingerprint
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": inversion.method,
        "source_prompt": inversion.source_prompt,
        "guidance_scale": json.dumps(inversion.guidance_scale),
        "steps": str(inversion.steps),
        "working_size": json.dumps(list(inversion.size)),
        "original_size": json.dumps(list(inversion.input_size)),
        "engine": json.dumps(fingerprint, sort_keys=True),
        "fingerprint": fingerprint_digest(fingerprint),
        "stats": json.dumps(inversion.stats, default=str),
        # The adapter set it was made with (by name and scale; the files' contents are not fingerprinted).
        "adapters": json.dumps([list(pair) for pair in inversion.adapters]),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, save(tensors, metadata=metadata))
    return target


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a saved inversion, read from the safetensors header alone (no tensors, no torch);
    refuses a missing file, a file that is not safetensors, and a safetensors file that is not an fpedit
    inversion of this format version."""
    source = Path(path).expanduser()
    if source.is_dir():
        raise InvalidInputError(FIELD, f"{source} is a directory, not a saved inversion")
    if not source.is_file():
        raise InvalidInputError(FIELD, f"no such file: {source}")
    not_ours = InvalidInputError(FIELD, f"{source} is not a safetensors file saved by `--save-inversion`")
    try:
        with source.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise not_ours
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise not_ours
            header = json.loads(handle.read(length))
    except (ValueError, UnicodeDecodeError):
        raise not_ours from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise InvalidInputError(FIELD, f"{source} is not an fpedit inversion (written by `--save-inversion`)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise InvalidInputError(
            FIELD,
            f"{source} has format version {metadata.get('format_version')!r}; this fpedit reads "
            f"{FORMAT_VERSION!r}",
        )
    return {str(k): str(v) for k, v in metadata.items()}


def load_inversion(engine: EditEngine, path: str | os.PathLike) -> Inversion:
    """Read an inversion saved by :func:`save_inversion` for ``engine``; refuse (``InvalidInputError`` on
    ``inversion_file``) a file that is not one, is damaged, or was saved by an engine with another
    fingerprint (checked before any tensor is read)."""
    source = Path(path).expanduser()
    metadata = read_metadata(source)
    saved = _json(metadata, "engine", source)
    here = engine.fingerprint
    for name in FINGERPRINT_FIELDS:
        if not isinstance(saved, dict) or saved.get(name) != here[name]:
            theirs = saved.get(name) if isinstance(saved, dict) else None
            raise InvalidInputError(
                FIELD,
                f"{source} was saved by an engine with another {name} ({_short(theirs)}; this engine: "
                f"{_short(here[name])}); invert the image again with this model and settings",
            )
    return _inversion(engine, source, metadata, _read_tensors(source))


def _read_tensors(source: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for truncated or altered files
        raise InvalidInputError(FIELD, f"{source} is damaged ({exc})") from None


def _json(metadata: dict[str, str], key: str, source: Path) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError):
        raise InvalidInputError(
            FIELD, f"{source} is damaged: its {key!r} entry is missing or malformed"
        ) from None


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:31] + "…" + text[-8:]


def _inversion(
    engine: EditEngine, source: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]
) -> Inversion:
    """The checked contents as an :class:`Inversion` owned by ``engine``."""
    import torch
    from PIL import Image

    from .options import INVERSION_METHODS as METHODS
    from .results import Inversion

    def damaged(what: str) -> InvalidInputError:
        return InvalidInputError(FIELD, f"{source} is damaged: {what}")

    method = metadata.get("method")
    if method not in METHODS:
        raise damaged(f"unknown method {method!r}")
    try:
        steps = int(metadata["steps"])
    except (KeyError, ValueError):
        raise damaged("no step count") from None
    trajectory, image = tensors.get("trajectory"), tensors.get("image")
    f, channels = engine.spec.vae_scale_factor, engine.spec.latent_channels
    if trajectory is None or trajectory.dtype != torch.float32 or trajectory.ndim != 4:
        raise damaged("no float32 trajectory")
    steps_h_w = (trajectory.shape[0], trajectory.shape[1], trajectory.shape[2] % 8, trajectory.shape[3] % 8)
    if steps < 1 or steps_h_w != (steps + 1, channels, 0, 0):
        raise damaged(f"a trajectory of shape {tuple(trajectory.shape)} does not fit {steps} steps")
    if not torch.isfinite(trajectory).all():
        raise damaged("the trajectory holds NaN or infinity")
    h, w = trajectory.shape[2] * f, trajectory.shape[3] * f
    if image is None or image.dtype != torch.uint8 or tuple(image.shape) != (h, w, 3):
        raise damaged(f"no {w}x{h} RGB image beside the trajectory")
    nulls = tensors.get("null_embeddings")
    if (nulls is None) != (method == "ddim"):
        raise damaged(f"null embeddings {'missing' if nulls is None else 'present'} for method {method!r}")
    if nulls is not None and (nulls.dtype != torch.float32 or nulls.ndim != 3 or nulls.shape[0] != steps):
        raise damaged(f"null embeddings of shape {tuple(nulls.shape)} do not fit {steps} steps")
    guidance = _json(metadata, "guidance_scale", source)
    original = _json(metadata, "original_size", source)
    if guidance is not None and not isinstance(guidance, (int, float)):
        raise damaged("guidance_scale is not a number")
    if not (
        isinstance(original, list)
        and len(original) == 2
        and all(isinstance(v, int) and v > 0 for v in original)
    ):
        raise damaged("original_size is not a (width, height) pair")
    try:
        stats = json.loads(metadata.get("stats", "{}"))
    except ValueError:
        stats = {}
    device = engine.backend.device
    return Inversion(
        trajectory=trajectory.to(device),
        steps=steps,
        image=Image.fromarray(image.numpy(), "RGB"),
        engine_id=engine.engine_id,
        stats=stats if isinstance(stats, dict) else {},
        map_cache_limit=engine.map_cache_bytes,
        method=method,
        source_prompt=metadata.get("source_prompt", ""),
        null_embeddings=None if nulls is None else nulls.to(device),
        guidance_scale=None if guidance is None else float(guidance),
        original_size=(original[0], original[1]),
        adapters=normalize_adapters(_json(metadata, "adapters", source) if "adapters" in metadata else ()),
    )
