from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MapFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAP_FORMAT_UNSPECIFIED: _ClassVar[MapFormat]
    MAP_FORMAT_QK: _ClassVar[MapFormat]
    MAP_FORMAT_PROBS: _ClassVar[MapFormat]

class InversionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVERSION_METHOD_UNSPECIFIED: _ClassVar[InversionMethod]
    INVERSION_METHOD_DDIM: _ClassVar[InversionMethod]
    INVERSION_METHOD_NULL_TEXT: _ClassVar[InversionMethod]
    INVERSION_METHOD_NEGATIVE_PROMPT: _ClassVar[InversionMethod]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
MAP_FORMAT_UNSPECIFIED: MapFormat
MAP_FORMAT_QK: MapFormat
MAP_FORMAT_PROBS: MapFormat
INVERSION_METHOD_UNSPECIFIED: InversionMethod
INVERSION_METHOD_DDIM: InversionMethod
INVERSION_METHOD_NULL_TEXT: InversionMethod
INVERSION_METHOD_NEGATIVE_PROMPT: InversionMethod
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class EditOptions(_message.Message):
    __slots__ = ("steps", "guidance_scale", "replace_start", "replace_end", "layers", "layer_preset", "map_format", "mask", "mask_grow", "blend_words", "blend_start", "blend_threshold", "adapters")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_START_FIELD_NUMBER: _ClassVar[int]
    REPLACE_END_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_PRESET_FIELD_NUMBER: _ClassVar[int]
    MAP_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_GROW_FIELD_NUMBER: _ClassVar[int]
    BLEND_WORDS_FIELD_NUMBER: _ClassVar[int]
    BLEND_START_FIELD_NUMBER: _ClassVar[int]
    BLEND_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    guidance_scale: float
    replace_start: float
    replace_end: float
    layers: _containers.RepeatedScalarFieldContainer[int]
    layer_preset: str
    map_format: MapFormat
    mask: bytes
    mask_grow: int
    blend_words: _containers.RepeatedScalarFieldContainer[str]
    blend_start: float
    blend_threshold: float
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., replace_start: _Optional[float] = ..., replace_end: _Optional[float] = ..., layers: _Optional[_Iterable[int]] = ..., layer_preset: _Optional[str] = ..., map_format: _Optional[_Union[MapFormat, str]] = ..., mask: _Optional[bytes] = ..., mask_grow: _Optional[int] = ..., blend_words: _Optional[_Iterable[str]] = ..., blend_start: _Optional[float] = ..., blend_threshold: _Optional[float] = ..., adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("name", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("stages_ms", "engine_ms", "queue_ms", "unet_rows", "unet_calls", "steps", "replaced_steps", "layers", "replica")
    class StagesMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STAGES_MS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    UNET_ROWS_FIELD_NUMBER: _ClassVar[int]
    UNET_CALLS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    stages_ms: _containers.ScalarMap[str, float]
    engine_ms: float
    queue_ms: float
    unet_rows: int
    unet_calls: int
    steps: int
    replaced_steps: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    replica: str
    def __init__(self, stages_ms: _Optional[_Mapping[str, float]] = ..., engine_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., unet_rows: _Optional[int] = ..., unet_calls: _Optional[int] = ..., steps: _Optional[int] = ..., replaced_steps: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[int]] = ..., replica: _Optional[str] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("image", "inversion_id", "target_prompt", "options", "output_format", "skip_reconstruction", "source_prompt", "inversion_method", "null_text_steps", "null_text_epsilon")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INVERSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SKIP_RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    INVERSION_METHOD_FIELD_NUMBER: _ClassVar[int]
    NULL_TEXT_STEPS_FIELD_NUMBER: _ClassVar[int]
    NULL_TEXT_EPSILON_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    inversion_id: str
    target_prompt: str
    options: EditOptions
    output_format: ImageFormat
    skip_reconstruction: bool
    source_prompt: str
    inversion_method: InversionMethod
    null_text_steps: int
    null_text_epsilon: float
    def __init__(self, image: _Optional[bytes] = ..., inversion_id: _Optional[str] = ..., target_prompt: _Optional[str] = ..., options: _Optional[_Union[EditOptions, _Mapping]] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., skip_reconstruction: _Optional[bool] = ..., source_prompt: _Optional[str] = ..., inversion_method: _Optional[_Union[InversionMethod, str]] = ..., null_text_steps: _Optional[int] = ..., null_text_epsilon: _Optional[float] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("edited_image", "reconstruction_image", "inversion_id", "width", "height", "stats", "blend_mask", "notes")
    EDITED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_IMAGE_FIELD_NUMBER: _ClassVar[int]
    INVERSION_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    BLEND_MASK_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    edited_image: bytes
    reconstruction_image: bytes
    inversion_id: str
    width: int
    height: int
    stats: Stats
    blend_mask: bytes
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, edited_image: _Optional[bytes] = ..., reconstruction_image: _Optional[bytes] = ..., inversion_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., blend_mask: _Optional[bytes] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total: int
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class EditEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: EditResponse
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[EditResponse, _Mapping]] = ...) -> None: ...

class GenerateEditRequest(_message.Message):
    __slots__ = ("source_prompt", "target_prompt", "seed", "options", "height", "width", "output_format")
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
    def __init__(self, source_prompt: _Optional[str] = ..., target_prompt: _Optional[str] = ..., seed: _Optional[int] = ..., options: _Optional[_Union[EditOptions, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class GenerateEditResponse(_message.Message):
    __slots__ = ("source_image", "edited_image", "seed", "width", "height", "stats", "blend_mask", "notes")
    SOURCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    EDITED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    BLEND_MASK_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    source_image: bytes
    edited_image: bytes
    seed: int
    width: int
    height: int
    stats: Stats
    blend_mask: bytes
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source_image: _Optional[bytes] = ..., edited_image: _Optional[bytes] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., blend_mask: _Optional[bytes] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class InvertRequest(_message.Message):
    __slots__ = ("image", "options", "source_prompt", "inversion_method", "null_text_steps", "null_text_epsilon")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    INVERSION_METHOD_FIELD_NUMBER: _ClassVar[int]
    NULL_TEXT_STEPS_FIELD_NUMBER: _ClassVar[int]
    NULL_TEXT_EPSILON_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    options: EditOptions
    source_prompt: str
    inversion_method: InversionMethod
    null_text_steps: int
    null_text_epsilon: float
    def __init__(self, image: _Optional[bytes] = ..., options: _Optional[_Union[EditOptions, _Mapping]] = ..., source_prompt: _Optional[str] = ..., inversion_method: _Optional[_Union[InversionMethod, str]] = ..., null_text_steps: _Optional[int] = ..., null_text_epsilon: _Optional[float] = ...) -> None: ...

class InvertResponse(_message.Message):
    __slots__ = ("inversion_id", "width", "height", "steps", "expires_in_s", "stats")
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
    def __init__(self, inversion_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., expires_in_s: _Optional[int] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_steps", "max_image_pixels", "max_side", "max_message_bytes", "workers", "max_queue", "cache_bytes", "cache_ttl_s", "max_prompt_chars")
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    max_steps: int
    max_image_pixels: int
    max_side: int
    max_message_bytes: int
    workers: int
    max_queue: int
    cache_bytes: int
    cache_ttl_s: int
    max_prompt_chars: int
    def __init__(self, max_steps: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_side: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., workers: _Optional[int] = ..., max_queue: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., cache_ttl_s: _Optional[int] = ..., max_prompt_chars: _Optional[int] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("version", "model", "backend", "device", "precision", "layers_available", "map_formats", "defaults", "limits", "default_image_size", "loras", "prediction_type", "adapters", "max_adapters")
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
    LORAS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
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
    loras: _containers.RepeatedCompositeFieldContainer[LoraInfo]
    prediction_type: str
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    max_adapters: int
    def __init__(self, version: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., layers_available: _Optional[_Iterable[int]] = ..., map_formats: _Optional[_Iterable[_Union[MapFormat, str]]] = ..., defaults: _Optional[_Union[EditOptions, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., default_image_size: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[LoraInfo, _Mapping]]] = ..., prediction_type: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., max_adapters: _Optional[int] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "rank", "layers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class LoraInfo(_message.Message):
    __slots__ = ("file", "scale")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    file: str
    scale: float
    def __init__(self, file: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("edit", "generate", "invert", "webhook_url")
    EDIT_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    INVERT_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    edit: EditRequest
    generate: GenerateEditRequest
    invert: InvertRequest
    webhook_url: str
    def __init__(self, edit: _Optional[_Union[EditRequest, _Mapping]] = ..., generate: _Optional[_Union[GenerateEditRequest, _Mapping]] = ..., invert: _Optional[_Union[InvertRequest, _Mapping]] = ..., webhook_url: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "limit", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    limit: int
    page_token: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "status", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    status: str
    message: str
    def __init__(self, code: _Optional[int] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class WebhookAttempt(_message.Message):
    __slots__ = ("time", "status", "error")
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    time: float
    status: int
    error: str
    def __init__(self, time: _Optional[float] = ..., status: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "state", "progress", "created", "started", "finished", "edit", "generate", "invert", "error", "result_evicted", "webhook_url", "webhook_attempts", "webhook_delivery", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    EDIT_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    INVERT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_EVICTED_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    state: JobState
    progress: Progress
    created: float
    started: float
    finished: float
    edit: EditResponse
    generate: GenerateEditResponse
    invert: InvertResponse
    error: JobError
    result_evicted: bool
    webhook_url: str
    webhook_attempts: _containers.RepeatedCompositeFieldContainer[WebhookAttempt]
    webhook_delivery: str
    attempts: int
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., created: _Optional[float] = ..., started: _Optional[float] = ..., finished: _Optional[float] = ..., edit: _Optional[_Union[EditResponse, _Mapping]] = ..., generate: _Optional[_Union[GenerateEditResponse, _Mapping]] = ..., invert: _Optional[_Union[InvertResponse, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., result_evicted: _Optional[bool] = ..., webhook_url: _Optional[str] = ..., webhook_attempts: _Optional[_Iterable[_Union[WebhookAttempt, _Mapping]]] = ..., webhook_delivery: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...
