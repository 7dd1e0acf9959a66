"""Translation between protobuf messages and engine calls; nothing here runs a model."""

from __future__ import annotations

import io
import math
from typing import Any

from PIL import Image

from fpedit.engine import EditOptions, InvalidInputError, ProgressEvent
from fpedit.v1 import edit_pb2 as pb

from .results import EditOutcome, GenerateOutcome, InfoOutcome, InvertOutcome

MAP_FORMATS = {pb.MAP_FORMAT_QK: "qk", pb.MAP_FORMAT_PROBS: "probs"}
MAP_FORMAT_ENUM = {v: k for k, v in MAP_FORMATS.items()}
IMAGE_FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: ("PNG", "image/png"),
    pb.IMAGE_FORMAT_PNG: ("PNG", "image/png"),
    pb.IMAGE_FORMAT_JPEG: ("JPEG", "image/jpeg"),
    pb.IMAGE_FORMAT_WEBP: ("WEBP", "image/webp"),
}


def options_from_proto(message: pb.EditOptions, base: EditOptions | None = None) -> EditOptions:
    """Unset fields keep ``base`` (the engine defaults); the engine validates the result."""
    base = base or EditOptions()
    changes: dict[str, Any] = {}
    if message.HasField("steps"):
        changes["steps"] = message.steps
    if message.HasField("guidance_scale"):
        changes["guidance_scale"] = shortest_decimal(message.guidance_scale)
    start = message.replace_start if message.HasField("replace_start") else base.replace_window[0]
    end = message.replace_end if message.HasField("replace_end") else base.replace_window[1]
    if message.HasField("replace_start") or message.HasField("replace_end"):
        # float32 on the wire: 0.8 arrives as 0.800000011920929; keep the decimal the client meant.
        changes["replace_window"] = (shortest_decimal(start), shortest_decimal(end))
    if message.layers and message.HasField("layer_preset"):
        raise InvalidInputError("layers", "give either layers or layer_preset, not both")
    if message.layers:
        changes["layers"] = tuple(message.layers)
    elif message.HasField("layer_preset"):
        changes["layers"] = message.layer_preset
    if message.map_format != pb.MAP_FORMAT_UNSPECIFIED:
        if message.map_format not in MAP_FORMATS:
            raise InvalidInputError("map_format", f"unknown value {message.map_format}")
        changes["map_format"] = MAP_FORMATS[message.map_format]
    return base.replace(**changes) if changes else base


def shortest_decimal(value: float) -> float:
    """The shortest decimal within float32 rounding of ``value``: what the client typed (0.7, not
    0.699999988), so ``int(steps * end)`` and guidance match an in-process call with the same numbers."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        candidate = round(value, digits)
        if abs(candidate - value) <= 1e-7 * max(1.0, abs(value)):
            return candidate
    return value


def options_to_proto(options: EditOptions) -> pb.EditOptions:
    layers = options.layers
    message = pb.EditOptions(
        steps=options.steps,
        guidance_scale=options.guidance_scale,
        replace_start=options.replace_window[0],
        replace_end=options.replace_window[1],
        map_format=MAP_FORMAT_ENUM[options.map_format],
    )
    if isinstance(layers, str):
        message.layer_preset = layers
    else:
        message.layers.extend(layers)
    return message


def image_format_name(value: int) -> str:
    """The wire's ImageFormat as the name runners encode with ("PNG", "JPEG", "WEBP")."""
    if value not in IMAGE_FORMATS:
        raise InvalidInputError("output_format", f"unknown value {value}")
    return IMAGE_FORMATS[value][0]


def encode_image(image: Image.Image, name: str) -> bytes:
    """``image`` as ``name`` ("PNG", "JPEG" or "WEBP") bytes."""
    buf = io.BytesIO()
    if name == "PNG":
        image.save(buf, format="PNG", compress_level=3)
    elif name == "JPEG":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="WEBP", quality=95)
    return buf.getvalue()


def stats_to_proto(stats: dict[str, Any], queue_ms: float = 0.0, replica: str = "") -> pb.Stats:
    return pb.Stats(
        replica=replica,
        stages_ms={k: float(v) for k, v in stats.get("stages_ms", {}).items()},
        engine_ms=float(stats.get("total_ms", 0.0)),
        queue_ms=float(queue_ms),
        unet_rows=int(stats.get("unet_rows", 0)),
        unet_calls=int(stats.get("unet_calls", 0)),
        steps=int(stats.get("steps", 0)),
        replaced_steps=[int(i) for i in stats.get("replaced_steps", [])],
        layers=[int(i) for i in stats.get("layers", [])],
    )


# --- runner results as messages (the transport's side; runners return plain data) ---------------------------


def edit_response(outcome: EditOutcome) -> pb.EditResponse:
    return pb.EditResponse(
        edited_image=outcome.edited_image,
        reconstruction_image=outcome.reconstruction_image,
        inversion_id=outcome.inversion_id,
        width=outcome.width,
        height=outcome.height,
        stats=stats_to_proto(outcome.stats, outcome.queue_ms, outcome.replica),
    )


def generate_response(outcome: GenerateOutcome) -> pb.GenerateEditResponse:
    return pb.GenerateEditResponse(
        source_image=outcome.source_image,
        edited_image=outcome.edited_image,
        seed=outcome.seed,
        width=outcome.width,
        height=outcome.height,
        stats=stats_to_proto(outcome.stats, outcome.queue_ms, outcome.replica),
    )


def invert_response(outcome: InvertOutcome) -> pb.InvertResponse:
    return pb.InvertResponse(
        inversion_id=outcome.inversion_id,
        width=outcome.width,
        height=outcome.height,
        steps=outcome.steps,
        expires_in_s=outcome.expires_in_s,
        stats=stats_to_proto(outcome.stats, outcome.queue_ms, outcome.replica),
    )


def info_response(info: InfoOutcome) -> pb.GetInfoResponse:
    limits = info.limits
    return pb.GetInfoResponse(
        version=info.version,
        model=info.model,
        backend=info.backend,
        device=info.device,
        precision=info.precision,
        layers_available=list(info.layers_available),
        map_formats=[MAP_FORMAT_ENUM[f] for f in info.map_formats],
        defaults=options_to_proto(info.defaults),
        default_image_size=info.default_image_size,
        limits=pb.Limits(
            max_steps=limits.max_steps,
            max_image_pixels=limits.max_image_pixels,
            max_side=limits.max_side,
            max_message_bytes=limits.max_message_bytes,
            workers=limits.workers,
            max_queue=limits.max_queue,
            cache_bytes=limits.cache_bytes,
            cache_ttl_s=limits.cache_ttl_s,
            max_prompt_chars=limits.max_prompt_chars,
        ),
        loras=[pb.LoraInfo(file=file, scale=scale) for file, scale in info.loras],
        prediction_type=info.prediction_type,
    )


def stream_message(item: ProgressEvent | EditOutcome) -> pb.EditEvent:
    """One item of a runner's edit stream as the stream's message (progress, or the final result)."""
    if isinstance(item, ProgressEvent):
        return pb.EditEvent(progress=pb.Progress(stage=item.stage, step=item.step, total=item.total))
    return pb.EditEvent(result=edit_response(item))
