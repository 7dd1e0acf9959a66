"""A Python client for the fpedit gRPC service.

It needs only grpcio, protobuf and the generated stubs (``pip install 'fpedit[client]'``): importing it loads
no torch, diffusers or transformers, so a product backend that only calls the service stays light. Bad
arguments raise ``ValueError`` with a message that says what is wrong, before anything is sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fpedit.engine.options import IMAGE_FILE_FORMATS
from fpedit.v1 import edit_pb2 as pb
from fpedit.v1 import edit_pb2_grpc

MAP_FORMATS = {"qk": pb.MAP_FORMAT_QK, "probs": pb.MAP_FORMAT_PROBS}
IMAGE_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "webp": pb.IMAGE_FORMAT_WEBP}
#: File extension -> the format the service is asked to return (results are written byte for byte).
EXTENSION_FORMATS = {extension: name.lower() for extension, name in IMAGE_FILE_FORMATS.items()}
SEED_LIMIT = 2**63  # the engine's seed range, [0, 2**63)


def format_for_path(path: str | os.PathLike) -> str:
    """``"png"``, ``"jpeg"`` or ``"webp"`` from a file name, so bytes and extension always agree."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSION_FORMATS:
        raise ValueError(
            f"{path}: the extension must be one of {', '.join(EXTENSION_FORMATS)} (it picks the image format)"
        )
    return EXTENSION_FORMATS[suffix]


def _format(output_format: str) -> int:
    if output_format not in IMAGE_FORMATS:
        raise ValueError(f"output_format must be one of {list(IMAGE_FORMATS)}, got {output_format!r}")
    return IMAGE_FORMATS[output_format]


def _non_negative(field: str, value: int | None, limit: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise ValueError(f"{field} must be an integer in [0, {limit}), got {value!r}")
    return value


def edit_options(
    steps: int | None = None,
    guidance_scale: float | None = None,
    replace_window: Sequence[float] | None = None,
    layers: Sequence[int] | str | None = None,
    map_format: str | None = None,
    *,
    mask: bytes | None = None,
    mask_grow: int | None = None,
    blend_words: Sequence[str] = (),
    blend_start: float | None = None,
    blend_threshold: float | None = None,
    adapters: Sequence[tuple[str, float]] = (),
) -> pb.EditOptions:
    """Build an ``EditOptions`` message; ``None`` leaves a field unset (the server's default). ``mask``
    (encoded image bytes, white = may change) and ``blend_words`` enable local blending (docs/design.md);
    ``adapters`` are (name, scale) pairs of the server's ``--lora-dir``."""
    message = pb.EditOptions()
    if steps is not None:
        message.steps = steps
    if guidance_scale is not None:
        message.guidance_scale = guidance_scale
    if replace_window is not None:
        message.replace_start, message.replace_end = replace_window
    if isinstance(layers, str):
        message.layer_preset = layers
    elif layers is not None:
        message.layers.extend(layers)
    if map_format is not None:
        if map_format not in MAP_FORMATS:
            raise ValueError(f"map_format must be one of {list(MAP_FORMATS)}, got {map_format!r}")
        message.map_format = MAP_FORMATS[map_format]
    if mask is not None:
        message.mask = mask
    if mask_grow is not None:
        message.mask_grow = mask_grow
    message.blend_words.extend(blend_words)
    if blend_start is not None:
        message.blend_start = blend_start
    if blend_threshold is not None:
        message.blend_threshold = blend_threshold
    message.adapters.extend(pb.Adapter(name=name, scale=scale) for name, scale in adapters)
    return message


#: Engine method names -> the InversionMethod a request carries.
INVERSION_METHODS = {
    "ddim": pb.INVERSION_METHOD_DDIM,
    "null-text": pb.INVERSION_METHOD_NULL_TEXT,
    "negative-prompt": pb.INVERSION_METHOD_NEGATIVE_PROMPT,
}


def _set_inversion(
    request: pb.EditRequest | pb.InvertRequest,
    source_prompt: str,
    inversion_method: str | None,
    null_text_steps: int | None,
    null_text_epsilon: float | None,
) -> None:
    """Fill an Invert or image Edit request's inversion fields (unset ones take the server's defaults)."""
    if inversion_method is not None:
        if inversion_method not in INVERSION_METHODS:
            raise ValueError(
                f"inversion_method must be one of {list(INVERSION_METHODS)}, got {inversion_method!r}"
            )
        request.inversion_method = INVERSION_METHODS[inversion_method]
    request.source_prompt = source_prompt
    if null_text_steps is not None:
        request.null_text_steps = null_text_steps
    if null_text_epsilon is not None:
        request.null_text_epsilon = null_text_epsilon


def _image_bytes(image: bytes | str | os.PathLike | Any) -> bytes:
    """Encoded bytes from bytes, a path, a binary file object or a PIL image (sent as PNG)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        from fpedit.engine.paths import check_input_image

        path = Path(image)
        check_input_image(path, "image")  # an InvalidInputError, a ValueError
        return path.read_bytes()
    if hasattr(image, "read"):  # an open binary file or io.BytesIO
        data = image.read()
        if not isinstance(data, bytes):
            raise ValueError("image: a file object must be opened in binary mode")
        return data
    if hasattr(image, "save"):  # a PIL image
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(
        f"image must be bytes, a path, a binary file object or a PIL image, not {type(image).__name__}"
    )


class EditClient:
    """Blocking client. ``token`` adds ``authorization: Bearer``; ``root_certificates`` enables TLS."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = edit_pb2_grpc.EditServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {"metadata": self.metadata, "timeout": timeout if timeout is not None else self.timeout}

    def edit(
        self,
        target_prompt: str,
        *,
        image: Any = None,
        inversion_id: str = "",
        options: pb.EditOptions | None = None,
        output_format: str = "png",
        skip_reconstruction: bool = False,
        timeout: float | None = None,
        source_prompt: str = "",
        inversion_method: str | None = None,
        null_text_steps: int | None = None,
        null_text_epsilon: float | None = None,
    ) -> pb.EditResponse:
        """With an image, ``source_prompt``, ``inversion_method`` ("ddim", "null-text", "negative-prompt")
        and the null-text options choose how the server inverts it (unset: DDIM)."""
        request = self._edit_request(
            target_prompt, image, inversion_id, options, output_format, skip_reconstruction
        )
        _set_inversion(request, source_prompt, inversion_method, null_text_steps, null_text_epsilon)
        return self.stub.Edit(request, **self._kw(timeout))

    def edit_stream(
        self,
        target_prompt: str,
        *,
        image: Any = None,
        inversion_id: str = "",
        options: pb.EditOptions | None = None,
        output_format: str = "png",
        timeout: float | None = None,
        source_prompt: str = "",
        inversion_method: str | None = None,
        null_text_steps: int | None = None,
        null_text_epsilon: float | None = None,
    ) -> Iterator[pb.EditEvent]:
        request = self._edit_request(target_prompt, image, inversion_id, options, output_format, False)
        _set_inversion(request, source_prompt, inversion_method, null_text_steps, null_text_epsilon)
        return self.stub.EditStream(request, **self._kw(timeout))

    @staticmethod
    def _edit_request(
        target_prompt: str,
        image: Any,
        inversion_id: str,
        options: pb.EditOptions | None,
        output_format: str,
        skip_reconstruction: bool,
    ) -> pb.EditRequest:
        return pb.EditRequest(
            image=_image_bytes(image) if image is not None else b"",
            inversion_id=inversion_id,
            target_prompt=target_prompt,
            options=options or pb.EditOptions(),
            output_format=_format(output_format),
            skip_reconstruction=skip_reconstruction,
        )

    def generate(
        self,
        source_prompt: str,
        target_prompt: str,
        *,
        seed: int | None = None,
        options: pb.EditOptions | None = None,
        height: int | None = None,
        width: int | None = None,
        output_format: str = "png",
        timeout: float | None = None,
    ) -> pb.GenerateEditResponse:
        seed = _non_negative("seed", seed, SEED_LIMIT)
        height = _non_negative("height", height, 2**32)
        width = _non_negative("width", width, 2**32)
        request = pb.GenerateEditRequest(
            source_prompt=source_prompt,
            target_prompt=target_prompt,
            options=options or pb.EditOptions(),
            output_format=_format(output_format),
        )
        if seed is not None:
            request.seed = seed
        if height is not None:
            request.height = height
        if width is not None:
            request.width = width
        return self.stub.GenerateEdit(request, **self._kw(timeout))

    def invert(
        self,
        image: Any,
        *,
        options: pb.EditOptions | None = None,
        timeout: float | None = None,
        source_prompt: str = "",
        inversion_method: str | None = None,
        null_text_steps: int | None = None,
        null_text_epsilon: float | None = None,
    ) -> pb.InvertResponse:
        request = pb.InvertRequest(image=_image_bytes(image), options=options or pb.EditOptions())
        _set_inversion(request, source_prompt, inversion_method, null_text_steps, null_text_epsilon)
        return self.stub.Invert(request, **self._kw(timeout))

    def info(self, timeout: float | None = None) -> pb.GetInfoResponse:
        return self.stub.GetInfo(pb.GetInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
