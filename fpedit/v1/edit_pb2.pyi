from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class MapFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAP_FORMAT_UNSPECIFIED: _ClassVar[MapFormat]
    MAP_FORMAT_QK: _ClassVar[MapFormat]
    MAP_FORMAT_PROBS: _ClassVar[MapFormat]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]

MAP_FORMAT_UNSPECIFIED: MapFormat
MAP_FORMAT_QK: MapFormat
MAP_FORMAT_PROBS: MapFormat
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat

class EditOptions(_message.Message):
    __slots__ = (
        "guidance_scale",
        "layer_preset",
        "layers",
        "map_format",
        "replace_end",
        "replace_start",
        "steps",
    )
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_START_FIELD_NUMBER: _ClassVar[int]
    REPLACE_END_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_PRESET_FIELD_NUMBER: _ClassVar[int]
    MAP_FORMAT_FIELD_NUMBER: _ClassVar[int]
    steps: int
    guidance_scale: float
    replace_start: float
    replace_end: float
    layers: _containers.RepeatedScalarFieldContainer[int]
    layer_preset: str
    map_format: MapFormat
    def __init__(
        self,
        steps: int | None = ...,
        guidance_scale: float | None = ...,
        replace_start: float | None = ...,
        replace_end: float | None = ...,
        layers: _Iterable[int] | None = ...,
        layer_preset: str | None = ...,
        map_format: MapFormat | str | None = ...,
    ) -> None: ...

class Stats(_message.Message):
    __slots__ = (
        "engine_ms",
        "layers",
        "queue_ms",
        "replaced_steps",
        "stages_ms",
        "steps",
        "unet_calls",
        "unet_rows",
    )
    class StagesMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: str | None = ..., value: float | None = ...) -> None: ...

    STAGES_MS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    UNET_ROWS_FIELD_NUMBER: _ClassVar[int]
    UNET_CALLS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    stages_ms: _containers.ScalarMap[str, float]
    engine_ms: float
    queue_ms: float
    unet_rows: int
    unet_calls: int
    steps: int
    replaced_steps: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(
        self,
        stages_ms: _Mapping[str, float] | None = ...,
        engine_ms: float | None = ...,
        queue_ms: float | None = ...,
        unet_rows: int | None = ...,
        unet_calls: int | None = ...,
        steps: int | None = ...,
        replaced_steps: _Iterable[int] | None = ...,
        layers: _Iterable[int] | None = ...,
    ) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("image", "inversion_id", "options", "output_format", "skip_reconstruction", "target_prompt")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INVERSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SKIP_RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    inversion_id: str
    target_prompt: str
    options: EditOptions
    output_format: ImageFormat
    skip_reconstruction: bool
    def __init__(
        self,
        image: bytes | None = ...,
        inversion_id: str | None = ...,
        target_prompt: str | None = ...,
        options: EditOptions | _Mapping | None = ...,
        output_format: ImageFormat | str | None = ...,
        skip_reconstruction: bool | None = ...,
    ) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("edited_image", "height", "inversion_id", "reconstruction_image", "stats", "width")
    EDITED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_IMAGE_FIELD_NUMBER: _ClassVar[int]
    INVERSION_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    edited_image: bytes
    reconstruction_image: bytes
    inversion_id: str
    width: int
    height: int
    stats: Stats
    def __init__(
        self,
        edited_image: bytes | None = ...,
        reconstruction_image: bytes | None = ...,
        inversion_id: str | None = ...,
        width: int | None = ...,
        height: int | None = ...,
        stats: Stats | _Mapping | None = ...,
    ) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total: int
    def __init__(self, stage: str | None = ..., step: int | None = ..., total: int | None = ...) -> None: ...

class EditEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: EditResponse
    def __init__(
        self, progress: Progress | _Mapping | None = ..., result: EditResponse | _Mapping | None = ...
    ) -> None: ...

class GenerateEditRequest(_message.Message):
    __slots__ = ("height", "options", "output_format", "seed", "source_prompt", "target_prompt", "width")
    SOURCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    source_prompt: str
    target_prompt: str
    seed: int
    options: EditOptions
    height: int
    width: int
    output_format: ImageFormat
    def __init__(
        self,
        source_prompt: str | None = ...,
        target_prompt: str | None = ...,
        seed: int | None = ...,
        options: EditOptions | _Mapping | None = ...,
        height: int | None = ...,
        width: int | None = ...,
        output_format: ImageFormat | str | None = ...,
    ) -> None: ...

class GenerateEditResponse(_message.Message):
    __slots__ = ("edited_image", "height", "seed", "source_image", "stats", "width")
    SOURCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    EDITED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    source_image: bytes
    edited_image: bytes
    seed: int
    width: int
    height: int
    stats: Stats
    def __init__(
        self,
        source_image: bytes | None = ...,
        edited_image: bytes | None = ...,
        seed: int | None = ...,
        width: int | None = ...,
        height: int | None = ...,
        stats: Stats | _Mapping | None = ...,
    ) -> None: ...

class InvertRequest(_message.Message):
    __slots__ = ("image", "options")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    options: EditOptions
    def __init__(self, image: bytes | None = ..., options: EditOptions | _Mapping | None = ...) -> None: ...

class InvertResponse(_message.Message):
    __slots__ = ("expires_in_s", "height", "inversion_id", "stats", "steps", "width")
    INVERSION_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    inversion_id: str
    width: int
    height: int
    steps: int
    expires_in_s: int
    stats: Stats
    def __init__(
        self,
        inversion_id: str | None = ...,
        width: int | None = ...,
        height: int | None = ...,
        steps: int | None = ...,
        expires_in_s: int | None = ...,
        stats: Stats | _Mapping | None = ...,
    ) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = (
        "cache_bytes",
        "cache_ttl_s",
        "max_image_pixels",
        "max_message_bytes",
        "max_queue",
        "max_side",
        "max_steps",
        "workers",
    )
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    max_steps: int
    max_image_pixels: int
    max_side: int
    max_message_bytes: int
    workers: int
    max_queue: int
    cache_bytes: int
    cache_ttl_s: int
    def __init__(
        self,
        max_steps: int | None = ...,
        max_image_pixels: int | None = ...,
        max_side: int | None = ...,
        max_message_bytes: int | None = ...,
        workers: int | None = ...,
        max_queue: int | None = ...,
        cache_bytes: int | None = ...,
        cache_ttl_s: int | None = ...,
    ) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = (
        "backend",
        "default_image_size",
        "defaults",
        "device",
        "layers_available",
        "limits",
        "map_formats",
        "model",
        "precision",
        "version",
    )
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    MAP_FORMATS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: str
    backend: str
    device: str
    precision: str
    layers_available: _containers.RepeatedScalarFieldContainer[int]
    map_formats: _containers.RepeatedScalarFieldContainer[MapFormat]
    defaults: EditOptions
    limits: Limits
    default_image_size: int
    def __init__(
        self,
        version: str | None = ...,
        model: str | None = ...,
        backend: str | None = ...,
        device: str | None = ...,
        precision: str | None = ...,
        layers_available: _Iterable[int] | None = ...,
        map_formats: _Iterable[MapFormat | str] | None = ...,
        defaults: EditOptions | _Mapping | None = ...,
        limits: Limits | _Mapping | None = ...,
        default_image_size: int | None = ...,
    ) -> None: ...
