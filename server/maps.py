"""``POST /v1/maps``: the cross-attention heatmaps of a prompt (the paper's Figure 3, upper row) over HTTP.

Why here and not in the proto: the maps are an inspection tool of the editor page and of ``fpedit maps``, not
an edit, and the gRPC service does not expose them yet. The body still follows the proto3 JSON conventions
(lowerCamelCase names, bytes as base64, ``options`` is an ``EditOptions``, parsed by ``json_format``) and the
call goes through the servicer's admission, drain, status mapping, log line and metrics like every other
route (method ``AttentionMaps``). Every runner declares ``attention_maps``; the local one serves it, the Ray
front's refuses it (``UnimplementedError``), which the route answers as 501 UNIMPLEMENTED.

Request: ``prompt`` (required), then the picture the maps are of: ``image`` (inverted first with DDIM),
``inversionId`` (a kept inversion: no inverting), or neither (the prompt's own generation from ``seed``,
``width``, ``height``); ``options`` (``steps``, ``guidanceScale``, ``replaceStart``/``replaceEnd``: the steps
averaged, all by default) and ``resolution`` (the map side; default latent side / 4, 16 at 512 px).

Response: ``tokens`` (the prompt's tokens, start/end left out), ``heatmaps`` (per token a PNG, base64, of its
map at map resolution, scaled to its own range and coloured blue (low) to red (high)), ``crossAttention``
(per token the map's values, rows of floats), ``mapWidth``/``mapHeight``, ``layers``, ``steps`` (the step
indices averaged), ``image`` (PNG of the picture the maps are of), ``width``/``height``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from fpedit.engine.errors import InvalidInputError
from fpedit.engine.options import check_prompt
from fpedit.v1 import edit_pb2 as pb

from .convert import NOT_BASE64, options_from_proto, parse_json

#: The body's fields (proto3 JSON names); anything else is refused like an unknown proto field.
FIELDS = ("prompt", "image", "inversionId", "seed", "width", "height", "resolution", "options")
MAX_INVERSION_ID_CHARS = 64

#: Heatmap colours from low to high (blue, cyan, yellow, red): red rises and blue falls along the ramp.
RAMP = np.array([[30, 40, 230], [40, 170, 220], [240, 220, 60], [250, 30, 30]], dtype=np.float64)


@dataclass(frozen=True)
class MapsCall:
    """A validated maps request: keywords for ``runner.attention_maps``."""

    prompt: str
    image: bytes = b""
    inversion_id: str = ""
    options: dict[str, Any] | None = None

    def runner_kwargs(self) -> dict[str, Any]:
        return {"image": self.image, "inversion_id": self.inversion_id, **(self.options or {})}


def _integer(data: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():  # proto3 JSON writes 64-bit integers as strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInputError(name, f"must be an integer from {low} to {high}, got {value!r}")
    return value


def parse_maps(raw: Any, max_prompt_chars: int) -> MapsCall:
    """Decode and judge a ``/v1/maps`` body (``raw`` is the HTTP front's JsonBody) before any work queues."""
    if getattr(raw, "error", None) is not None:
        raise InvalidInputError("request", raw.error)
    try:
        data = json.loads(raw.text) if raw.text.strip() else {}
    except (ValueError, RecursionError):
        raise InvalidInputError("request", "is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidInputError("request", "must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InvalidInputError(
            "request", f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}"
        )
    prompt = check_prompt(data.get("prompt", ""), "prompt", allow_empty=False, max_chars=max_prompt_chars)
    image, inversion_id = data.get("image") or "", data.get("inversionId") or ""
    if not isinstance(image, str) or not isinstance(inversion_id, str):
        raise InvalidInputError("image" if not isinstance(image, str) else "inversionId", "must be a string")
    if image and inversion_id:
        raise InvalidInputError("image", "give image or inversionId (or neither, for a generation), not both")
    if len(inversion_id) > MAX_INVERSION_ID_CHARS:
        raise InvalidInputError("inversionId", "is not an id this server issued")
    try:
        image_bytes = base64.b64decode(image, validate=True) if image else b""
    except (binascii.Error, ValueError):
        raise InvalidInputError("image", NOT_BASE64) from None
    options: dict[str, Any] = {}
    seed = _integer(data, "seed", 0, 2**63 - 1)
    width, height = _integer(data, "width", 8, 4096), _integer(data, "height", 8, 4096)
    if (image or inversion_id) and (seed is not None or width is not None or height is not None):
        name = "seed" if seed is not None else "width" if width is not None else "height"
        raise InvalidInputError(name, "applies to a generation (no image, no inversionId)")
    options.update(seed=seed, width=width, height=height)
    options["resolution"] = _integer(data, "resolution", 1, 512)
    options_json = data.get("options") or {}
    if not isinstance(options_json, dict):
        raise InvalidInputError("options", "must be a JSON object")
    message = parse_json(options_json, pb.EditOptions(), "options")
    given = {"layers": bool(message.layers), "layer_preset": message.HasField("layer_preset"),
             "map_format": message.map_format != pb.MAP_FORMAT_UNSPECIFIED}  # fmt: skip
    for field, present in given.items():
        if present:
            raise InvalidInputError(
                field, "does not apply to attention maps: they average every layer at `resolution`"
            )
    edit = options_from_proto(message)  # the engine's ranges for steps, guidance and window
    # Unset fields keep the engine's maps defaults (every step averaged), as ``fpedit maps`` does.
    options["steps"] = edit.steps if message.HasField("steps") else None
    if message.HasField("guidance_scale"):
        options["guidance_scale"] = edit.guidance_scale
    if message.HasField("replace_start") or message.HasField("replace_end"):
        start = edit.replace_window[0] if message.HasField("replace_start") else 0.0
        end = edit.replace_window[1] if message.HasField("replace_end") else 1.0
        options["window"] = (start, end)
    return MapsCall(prompt=prompt, image=image_bytes, inversion_id=inversion_id, options=options)


def heatmap_rgb(values: np.ndarray) -> np.ndarray:
    """(h, w) map -> (h, w, 3) uint8: scaled to its own range, then coloured along :data:`RAMP`."""
    low, span = float(values.min()), float(values.max() - values.min())
    unit = (values - low) / span if span > 0 else np.zeros_like(values, dtype=np.float64)
    position = unit * (len(RAMP) - 1)
    index = np.minimum(position.astype(np.int64), len(RAMP) - 2)
    frac = (position - index)[..., None]
    return np.rint(RAMP[index] * (1 - frac) + RAMP[index + 1] * frac).astype(np.uint8)


def _png_b64(picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def maps_json(result: Any) -> dict[str, Any]:
    """The response body for an :class:`~fpedit.engine.attention_maps.AttentionMapResult`."""
    cross = np.asarray(result.cross_attention, dtype=np.float64)
    return {
        "tokens": list(result.tokens),
        "heatmaps": [_png_b64(Image.fromarray(heatmap_rgb(m), "RGB")) for m in cross],
        "crossAttention": [[[float(f"{v:.6g}") for v in row] for row in m] for m in cross],
        "mapWidth": int(result.resolution[1]),
        "mapHeight": int(result.resolution[0]),
        "layers": [int(i) for i in result.layers],
        "steps": [int(i) for i in result.steps],
        "image": _png_b64(result.image.convert("RGB")),
        "width": int(result.image.width),
        "height": int(result.image.height),
    }


_INT = {"type": "integer"}
_B64 = {"type": "string", "format": "byte"}

#: OpenAPI schemas of the route (written by hand: the body is not a proto message).
MAPS_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["prompt"],
    "description": "At most one of image, inversionId; with neither, the maps of the prompt's generation "
    "(seed, width, height).",
    "properties": {
        "prompt": {"type": "string", "description": "the prompt whose tokens get a map each"},
        "image": {**_B64, "description": "PNG, JPEG or WebP; inverted (DDIM) first"},
        "inversionId": {"type": "string", "description": "a kept inversion (from /v1/invert or /v1/edit)"},
        "seed": {"type": "string", "format": "int64", "description": "generation only; default 0"},
        "width": _INT,
        "height": _INT,
        "resolution": {**_INT, "description": "map side; default latent side / 4 (16 at 512 px)"},
        "options": {
            "$ref": "#/components/schemas/EditOptions",
            "description": "steps, guidanceScale, replaceStart/replaceEnd (the steps averaged)",
        },
    },
}
MAPS_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tokens": {"type": "array", "items": {"type": "string"}},
        "heatmaps": {
            "type": "array",
            "items": _B64,
            "description": "per token a PNG of its map (mapWidth x mapHeight), blue low to red high",
        },
        "crossAttention": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "description": "per token its map's rows: attention probability averaged over heads, layers, steps",
        },
        "mapWidth": _INT,
        "mapHeight": _INT,
        "layers": {"type": "array", "items": _INT},
        "steps": {"type": "array", "items": _INT},
        "image": {**_B64, "description": "PNG of the picture the maps are of"},
        "width": _INT,
        "height": _INT,
    },
}
