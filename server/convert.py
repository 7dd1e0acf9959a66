"""Translation between protobuf messages and engine calls; nothing here runs a model."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from PIL import Image

from fpedit.engine import EditOptions, InvalidInputError, ProgressEvent
from fpedit.engine.blend import DEFAULT_BLEND_START, DEFAULT_BLEND_THRESHOLD, Blend
from fpedit.engine.options import DEFAULT_NULL_TEXT_EPSILON, DEFAULT_NULL_TEXT_STEPS, check_null_text_options
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
    """Unset fields keep ``base`` (the engine defaults); the engine validates the result, and a refusal names
    the field by its path in the request (``options.steps``)."""
    try:
        return _options_from_proto(message, base)
    except InvalidInputError as exc:
        raise InvalidInputError(f"options.{exc.field}", exc.reason) from None


def _options_from_proto(message: pb.EditOptions, base: EditOptions | None) -> EditOptions:
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
    blend = blend_from_proto(message)
    if blend is not None:
        changes["blend"] = blend
    if message.adapters:
        # float32 on the wire: keep the decimal the client meant (0.7, not 0.699999988).
        changes["adapters"] = [
            (a.name, shortest_decimal(a.scale) if a.HasField("scale") else 1.0) for a in message.adapters
        ]
    return base.replace(**changes) if changes else base


def blend_from_proto(message: pb.EditOptions) -> Blend | None:
    """The blend fields as a :class:`Blend`; ``None`` when none is set. Settings without a mask or words
    are refused by :class:`Blend` itself (naming the field)."""
    settings = ("mask_grow", "blend_start", "blend_threshold")
    if not message.mask and not message.blend_words and not any(message.HasField(f) for f in settings):
        return None
    return Blend(
        mask=bytes(message.mask) or None,
        mask_grow=message.mask_grow,
        words=tuple(message.blend_words),
        start=shortest_decimal(message.blend_start)
        if message.HasField("blend_start")
        else DEFAULT_BLEND_START,
        threshold=shortest_decimal(message.blend_threshold)
        if message.HasField("blend_threshold")
        else DEFAULT_BLEND_THRESHOLD,
    )


# --- JSON requests --------------------------------------------------------------------------------------------

#: The engine's rule for a request field, by the field's full proto name: called with a JSON value that the
#: field's proto type cannot hold (steps -3 in a uint32), it raises the InvalidInputError that gRPC validation
#: raises for a value out of the same rule's range (steps 0). Fields without one get their proto type's rule.
VALUE_RULES: dict[str, Callable[[Any], object]] = {
    "fpedit.v1.EditOptions.steps": lambda value: EditOptions(steps=value),
    "fpedit.v1.EditOptions.guidance_scale": lambda value: EditOptions(guidance_scale=value),
    "fpedit.v1.EditOptions.replace_start": lambda value: EditOptions(replace_window=(value, 1.0)),
    "fpedit.v1.EditOptions.replace_end": lambda value: EditOptions(replace_window=(0.0, value)),
    "fpedit.v1.EditOptions.layers": lambda value: EditOptions(layers=value),
    "fpedit.v1.EditOptions.mask_grow": lambda value: Blend(mask=b"?", mask_grow=value),
    "fpedit.v1.EditOptions.blend_start": lambda value: Blend(words=("?",), start=value),
    "fpedit.v1.EditOptions.blend_threshold": lambda value: Blend(words=("?",), threshold=value),
    "null_text_steps": lambda value: check_null_text_options(value, DEFAULT_NULL_TEXT_EPSILON),
    "null_text_epsilon": lambda value: check_null_text_options(DEFAULT_NULL_TEXT_STEPS, value),
}
#: How a bytes field that is not base64 is refused (the JSON fronts' one wording).
NOT_BASE64 = "is not valid base64"
#: proto3 JSON bytes: base64, standard or URL-safe alphabet, padding optional.
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
_INTEGER_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def parse_json(data: dict[str, Any], message: Message, path: str = "") -> Message:
    """Fill ``message`` from ``data`` (the proto3 JSON mapping). A value the field cannot take is refused with
    the field's path and its rule (``options.steps: must be an integer in 1..1000, got -3``): the engine's rule
    where :data:`VALUE_RULES` has one, else the proto type's; never protobuf's parser text."""
    bad_bytes = _bad_base64(data, message.DESCRIPTOR, path)
    if bad_bytes is not None:
        raise bad_bytes
    try:
        json_format.ParseDict(data, message)
    except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        refusal = _first_bad_value(data, message.DESCRIPTOR, path)
        if refusal is not None:
            raise refusal from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInputError(path or "request", reason) from None
    return message


def _field(descriptor: Descriptor, key: str) -> FieldDescriptor | None:
    return descriptor.fields_by_camelcase_name.get(key) or descriptor.fields_by_name.get(key)


def _is_single_message(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated


def _bad_base64(data: Any, descriptor: Descriptor, path: str) -> InvalidInputError | None:
    """protobuf's JSON parser reads ``"!!!"`` as empty bytes (it drops what is not base64): refuse it."""
    if not isinstance(data, dict):
        return None
    for key, value in data.items():
        field = _field(descriptor, str(key))
        if field is None:
            continue
        where = f"{path}.{field.name}" if path else field.name
        if field.type == FieldDescriptor.TYPE_BYTES and not field.is_repeated and isinstance(value, str):
            if not _BASE64.fullmatch(value):
                return InvalidInputError(where, NOT_BASE64)
        elif _is_single_message(field) and isinstance(value, dict):
            nested = _bad_base64(value, field.message_type, where)
            if nested is not None:
                return nested
    return None


def _first_bad_value(data: Any, descriptor: Descriptor, path: str) -> InvalidInputError | None:
    """The refusal for the first field of ``data`` whose value its proto type cannot take; None when the
    fault is elsewhere (an unknown field name)."""
    if not isinstance(data, dict):
        return None
    message_type = message_factory.GetMessageClass(descriptor)
    for key, value in data.items():
        field = _field(descriptor, str(key))
        if field is None:
            continue
        where = f"{path}.{field.name}" if path else field.name
        if _is_single_message(field) and isinstance(value, dict):
            nested = _first_bad_value(value, field.message_type, where)
            if nested is not None:
                return nested
            continue
        try:
            json_format.ParseDict({key: value}, message_type())
        except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError):
            return _value_refusal(field, value, where)
    return None


def _value_refusal(field: FieldDescriptor, value: Any, where: str) -> InvalidInputError:
    rule = VALUE_RULES.get(field.full_name) or VALUE_RULES.get(field.name)
    if rule is not None:
        try:
            rule(value)
        except InvalidInputError as exc:
            return InvalidInputError(where, exc.reason)
        except (TypeError, ValueError):
            pass
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return InvalidInputError(where, f"{_type_rule(field)}, got {shown}")


def _type_rule(field: FieldDescriptor) -> str:
    """What the proto type of ``field`` takes, in words."""
    if field.is_repeated:
        return "must be a list"
    if field.type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[field.type]
        return f"must be an integer in {low}..{high}"
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return "must be a number"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "must be true or false"
    if field.type == FieldDescriptor.TYPE_STRING:
        return "must be a string"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return "must be base64"
    if field.type == FieldDescriptor.TYPE_ENUM:
        return f"must be one of {', '.join(v.name for v in field.enum_type.values)}"
    return "must be a JSON object"


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
    message.adapters.extend(pb.Adapter(name=name, scale=scale) for name, scale in options.adapters)
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
        blend_mask=outcome.blend_mask,
        notes=list(outcome.notes),
    )


def generate_response(outcome: GenerateOutcome) -> pb.GenerateEditResponse:
    return pb.GenerateEditResponse(
        source_image=outcome.source_image,
        edited_image=outcome.edited_image,
        seed=outcome.seed,
        width=outcome.width,
        height=outcome.height,
        stats=stats_to_proto(outcome.stats, outcome.queue_ms, outcome.replica),
        blend_mask=outcome.blend_mask,
        notes=list(outcome.notes),
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
        adapters=[pb.AdapterInfo(name=a.name, rank=a.rank, layers=list(a.layers)) for a in info.adapters],
        max_adapters=info.max_adapters,
    )


def stream_message(item: ProgressEvent | EditOutcome) -> pb.EditEvent:
    """One item of a runner's edit stream as the stream's message (progress, or the final result)."""
    if isinstance(item, ProgressEvent):
        return pb.EditEvent(progress=pb.Progress(stage=item.stage, step=item.step, total=item.total))
    return pb.EditEvent(result=edit_response(item))


def blend_outputs(mask: Any, size: tuple[int, int]) -> dict[str, Any]:
    """An outcome's ``blend_mask`` (a PNG of the latent mask at ``size``, each cell a block) and ``notes``
    for a result's ``blend_mask`` (``None``: no blend, nothing to add)."""
    if mask is None:
        return {}
    import numpy as np

    cells = np.asarray(mask, dtype=bool)
    picture = Image.fromarray(cells.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    notes = []
    if not cells.any():
        notes.append("the blend mask selects nothing: the edited image is the source's")
    elif cells.all():
        notes.append("the blend mask selects everything: the blend changed nothing")
    return {"blend_mask": encode_image(picture, "PNG"), "notes": tuple(notes)}
