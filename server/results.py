"""What runners return: plain data, no protobuf, so that each transport encodes it its own way.

The local runner and the Ray replicas build these; the gRPC servicer (``service.py``, which the HTTP front
calls too) turns them into messages with :mod:`fpedit.server.convert`. Images are already encoded in the
call's output format (the work is done where the engine runs, not on the front).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fpedit.engine import EditOptions


@dataclass(frozen=True)
class EditOutcome:
    edited_image: bytes
    reconstruction_image: bytes  # b"" when the call skipped it
    width: int
    height: int
    stats: dict[str, Any]  # the engine's figures (stages_ms, total_ms, unet_rows, ...)
    queue_ms: float = 0.0
    inversion_id: str = ""  # the id an edit by image's inversion is kept under; "" when too big to keep
    replica: str = ""  # the Ray replica that ran it; "" in-process
    blend_mask: bytes = b""  # with a blend: the mask it used, a PNG at the image's size
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateOutcome:
    source_image: bytes
    edited_image: bytes
    seed: int
    width: int
    height: int
    stats: dict[str, Any]
    queue_ms: float = 0.0
    replica: str = ""
    blend_mask: bytes = b""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class InvertOutcome:
    inversion_id: str
    width: int
    height: int
    steps: int
    expires_in_s: int
    stats: dict[str, Any]
    queue_ms: float = 0.0
    replica: str = ""


@dataclass(frozen=True)
class Limits:
    max_steps: int
    max_image_pixels: int
    max_side: int
    max_message_bytes: int
    workers: int
    max_queue: int
    cache_bytes: int
    cache_ttl_s: int
    max_prompt_chars: int


@dataclass(frozen=True)
class AdapterOutcome:
    """One adapter a server offers: name (file stem), rank and the layers it touches."""

    name: str
    rank: int
    layers: tuple[str, ...]


@dataclass(frozen=True)
class InfoOutcome:
    version: str
    model: str
    backend: str
    device: str
    precision: str
    layers_available: tuple[int, ...]
    map_formats: tuple[str, ...]  # the engine's names ("qk", "probs")
    defaults: EditOptions
    default_image_size: int
    limits: Limits
    #: LoRAs fused at load as (file, scale), in order; and what the UNet predicts.
    loras: tuple[tuple[str, float], ...] = ()
    prediction_type: str = "epsilon"
    #: Adapters requests may pick (``--lora-dir``), and how many one request may combine.
    adapters: tuple[AdapterOutcome, ...] = ()
    max_adapters: int = 0
