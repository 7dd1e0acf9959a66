"""A Python client for the fpedit gRPC service."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fpedit.v1 import edit_pb2 as pb
from fpedit.v1 import edit_pb2_grpc

MAP_FORMATS = {"qk": pb.MAP_FORMAT_QK, "probs": pb.MAP_FORMAT_PROBS}
IMAGE_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "webp": pb.IMAGE_FORMAT_WEBP}


def edit_options(
    steps: int | None = None,
    guidance_scale: float | None = None,
    replace_window: Sequence[float] | None = None,
    layers: Sequence[int] | str | None = None,
    map_format: str | None = None,
) -> pb.EditOptions:
    """Build an ``EditOptions`` message; ``None`` leaves a field unset (the server's default)."""
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
        message.map_format = MAP_FORMATS[map_format]
    return message


def _image_bytes(image: bytes | str | os.PathLike | Any) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")  # a PIL image
    return buf.getvalue()


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
    ) -> pb.EditResponse:
        return self.stub.Edit(
            self._edit_request(
                target_prompt, image, inversion_id, options, output_format, skip_reconstruction
            ),
            **self._kw(timeout),
        )

    def edit_stream(
        self,
        target_prompt: str,
        *,
        image: Any = None,
        inversion_id: str = "",
        options: pb.EditOptions | None = None,
        output_format: str = "png",
        timeout: float | None = None,
    ) -> Iterator[pb.EditEvent]:
        request = self._edit_request(target_prompt, image, inversion_id, options, output_format, False)
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
            output_format=IMAGE_FORMATS[output_format],
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
        request = pb.GenerateEditRequest(
            source_prompt=source_prompt,
            target_prompt=target_prompt,
            options=options or pb.EditOptions(),
            output_format=IMAGE_FORMATS[output_format],
        )
        if seed is not None:
            request.seed = seed
        if height is not None:
            request.height = height
        if width is not None:
            request.width = width
        return self.stub.GenerateEdit(request, **self._kw(timeout))

    def invert(
        self, image: Any, *, options: pb.EditOptions | None = None, timeout: float | None = None
    ) -> pb.InvertResponse:
        request = pb.InvertRequest(image=_image_bytes(image), options=options or pb.EditOptions())
        return self.stub.Invert(request, **self._kw(timeout))

    def info(self, timeout: float | None = None) -> pb.GetInfoResponse:
        return self.stub.GetInfo(pb.GetInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
