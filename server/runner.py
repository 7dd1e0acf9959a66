"""Runners execute already-validated requests and return plain results (:mod:`fpedit.server.results`); the
gRPC servicer (``service.py``) is the only place that speaks protobuf.

Splitting the two lets another execution layer (Ray Serve replicas) sit behind the same servicer, with the
same validation, status codes, logs and metrics. A runner is any object with these methods (see
:class:`Runner`)::

    edit(call: EditCall, *, progress=None, cancel_check=None) -> EditOutcome
    edit_stream(call: EditCall, *, cancel_check=None) -> Iterator[ProgressEvent | EditOutcome]  # then result
    generate(call: GenerateCall, *, progress=None, cancel_check=None) -> GenerateOutcome
    invert(call: InvertCall, *, progress=None, cancel_check=None) -> InvertOutcome
    attention_maps(prompt, *, image=b"", inversion_id="", progress=None, cancel_check=None, **options)
    info() -> InfoOutcome
    stats() -> RunnerStats            # load and cache figures, read at every metrics scrape
    close() -> None                   # stop workers; queued calls are cancelled

``progress(event)`` receives :class:`~fpedit.engine.ProgressEvent` per step. ``cancel_check()`` is called
before a queued call starts, between engine stages and at every step; it raises
:class:`~fpedit.engine.errors.CancelledError` (or a subclass) to stop the work. Runners raise only fpedit
errors for outcomes a client can act on -- ``InvalidInputError``, ``NotFoundError`` (unknown inversion id),
``OverloadedError`` (queue full), ``CancelledError``/``DeadlineExceededError``, ``UnavailableError`` -- and
the servicer maps each to one status code. Anything else is a bug and becomes INTERNAL.

:class:`LocalRunner` runs an in-process :class:`~fpedit.engine.EditEngine` on a bounded worker pool
(:mod:`.pool`) and keeps inversions in a byte-bounded :class:`~fpedit.server.cache.InversionCache`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError as FutureCancelled
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fpedit.engine import EditEngine, EditOptions, EngineConfig, Inversion, ProgressEvent
from fpedit.engine.errors import CancelledError
from fpedit.engine.options import MAX_STEPS

from .cache import InversionCache
from .config import ServerConfig
from .convert import blend_outputs, encode_image
from .errors import OverloadedError, unknown_inversion
from .pool import WorkerPool, cpu_threads, device_memory, never_cancelled
from .results import AdapterOutcome, EditOutcome, GenerateOutcome, InfoOutcome, InvertOutcome, Limits
from .streaming import stream_of

T = TypeVar("T")
ProgressFn = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], None]

#: The image formats a server decodes (others are refused before decoding).
ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def serving_engine_config(engine: EngineConfig, server: ServerConfig) -> EngineConfig:
    """``engine`` with the server's limits as the engine's own: at most ``--max-image-pixels`` per input
    image, the formats a server decodes, and source maps within the ``--cache-gib`` budget. ``fpedit serve``
    and each Ray replica build their engine from this, so no one changes an engine after it is built."""
    from fpedit.engine.images import DEFAULT_MAX_INPUT_PIXELS

    return engine.replace(
        max_input_pixels=min(engine.max_input_pixels or DEFAULT_MAX_INPUT_PIXELS, server.max_image_pixels),
        image_formats=ACCEPTED_IMAGE_FORMATS,
        map_cache_bytes=min(engine.map_cache_bytes, server.cache_bytes),
    )


# --- validated requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditCall:
    """An Edit/EditStream request after validation: exactly one of ``image`` and ``inversion_id`` is set."""

    target_prompt: str
    options: EditOptions
    steps_given: bool  # False: an edit by id takes the inversion's step count
    image: bytes = b""
    inversion_id: str = ""
    output_format: str = "PNG"  # "PNG", "JPEG" or "WEBP"
    skip_reconstruction: bool = False
    guidance_given: bool = True  # False: an edit by id of a null-text inversion takes its guidance
    #: With an image: EditEngine.invert keywords (source_prompt, method, null_text_steps, null_text_epsilon).
    inversion: dict[str, Any] = field(default_factory=dict)
    #: With an image: the id to keep the new inversion under ("": the cache makes one). A Ray front names
    #: new inversions itself, so that the replica which inverts holds them under the id the client gets.
    new_id: str = ""


@dataclass(frozen=True)
class GenerateCall:
    source_prompt: str
    target_prompt: str
    options: EditOptions
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    output_format: str = "PNG"


def _options_for(inversion: Inversion, call: EditCall) -> EditOptions:
    """An edit by id's options completed from its inversion: its step count and a null-text inversion's
    guidance, where the call gave none."""
    options = call.options
    if not call.steps_given:
        options = options.replace(steps=inversion.steps)
    if not call.guidance_given and inversion.guidance_scale is not None:
        options = options.replace(guidance_scale=inversion.guidance_scale)
    return options


def generate_options(call: GenerateCall) -> dict[str, Any]:
    """``EditEngine.edit_generated``'s keywords for ``call`` (its check takes the same)."""
    return {"options": call.options, "seed": call.seed, "height": call.height, "width": call.width}


@dataclass(frozen=True)
class InvertCall:
    image: bytes
    options: EditOptions
    #: EditEngine.invert keywords (source_prompt, method, null_text_steps, null_text_epsilon).
    inversion: dict[str, Any] = field(default_factory=dict)
    new_id: str = ""  # as EditCall.new_id


@dataclass(frozen=True)
class RunnerStats:
    """Figures a metrics scrape reads; counters only grow."""

    running: int = 0
    queued: int = 0
    cache_entries: int = 0
    cache_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    device_memory_bytes: int | None = None  # CUDA bytes allocated by tensors; None without CUDA
    #: Backend UNet calls of the engine (all requests, merged or not): calls, rows, and calls per row count.
    backend_calls: int = 0
    backend_rows: int = 0
    backend_batch_rows: tuple[tuple[int, int], ...] = ()


class Runner(Protocol):
    def check(self, call: EditCall | GenerateCall | InvertCall) -> None: ...

    def edit(
        self, call: EditCall, *, progress: ProgressFn | None = None, cancel_check: CancelCheck | None = None
    ) -> EditOutcome: ...

    def edit_stream(
        self, call: EditCall, *, cancel_check: CancelCheck | None = None
    ) -> Iterator[ProgressEvent | EditOutcome]: ...

    def generate(
        self,
        call: GenerateCall,
        *,
        progress: ProgressFn | None = None,
        cancel_check: CancelCheck | None = None,
    ) -> GenerateOutcome: ...

    def invert(
        self, call: InvertCall, *, progress: ProgressFn | None = None, cancel_check: CancelCheck | None = None
    ) -> InvertOutcome: ...

    def attention_maps(
        self,
        prompt: str,
        *,
        image: bytes = b"",
        inversion_id: str = "",
        progress: ProgressFn | None = None,
        cancel_check: CancelCheck | None = None,
        **maps_options: Any,
    ) -> Any: ...

    def info(self) -> InfoOutcome: ...

    def stats(self) -> RunnerStats: ...

    def close(self) -> None: ...


# --- the in-process runner ----------------------------------------------------------------------------------


class LocalRunner:
    """An in-process engine behind a bounded worker pool, with the server-side inversion cache.

    The engine is used as built: its input limits are its own (build it from :func:`serving_engine_config`
    to have the server's), so an engine shared with other callers is never changed underneath them."""

    def __init__(self, engine: EditEngine, config: ServerConfig, replica: str = "") -> None:
        """``replica``: the name results carry (a Ray replica's; empty in-process)."""
        self.engine = engine
        self.config = config
        self.replica = replica
        self.cache = InversionCache(config.cache_bytes, config.cache_ttl_s)
        self.pool = WorkerPool(config.workers, config.max_queue)
        self._device = str(engine.info().get("device", "cpu"))
        self.threads = cpu_threads(config, engine, self._device)

    # --- plumbing -------------------------------------------------------------------------------------------

    def _run(
        self,
        work: Callable[[dict[str, Any]], T],
        progress: ProgressFn | None,
        cancel_check: CancelCheck | None,
    ) -> tuple[T, float]:
        """Run ``work(engine_kwargs)`` on the pool; returns (result, queue wait in ms)."""
        check = cancel_check or never_cancelled
        submitted = time.perf_counter()
        started: list[float] = []

        def on_progress(event: ProgressEvent) -> None:
            check()
            if progress is not None:
                progress(event)

        # The engine calls ``check`` between its stages and before every UNet call, ``on_progress`` per step.
        kwargs: dict[str, Any] = {"progress": on_progress, "cancel_check": check}

        def task() -> T:
            started.append(time.perf_counter())
            check()  # a call whose client left, or whose deadline passed, while queued never starts
            return work(kwargs)

        future = self.pool.submit(task)
        try:
            result = future.result()
        except FutureCancelled as exc:  # the pool shut down with this call still queued
            raise CancelledError("cancelled while queued: the server is shutting down") from exc
        queue_ms = ((started[0] if started else time.perf_counter()) - submitted) * 1e3
        return result, queue_ms

    def _by_id(self, call: EditCall) -> tuple[Inversion, EditOptions]:
        """The cached inversion an edit by id names, and the call's options completed from it."""
        inversion = self.cache.get(call.inversion_id)
        if inversion is None:
            raise unknown_inversion(call.inversion_id)
        return inversion, _options_for(inversion, call)

    # --- calls ----------------------------------------------------------------------------------------------

    def check_edit_of(self, inversion: Inversion, call: EditCall) -> None:
        """:meth:`check` of an edit by id whose inversion the caller found (a Ray replica: from the store)."""
        self.engine.check_real(inversion, call.target_prompt, options=_options_for(inversion, call))

    def _too_big_to_keep(self, what: str) -> OverloadedError:
        return OverloadedError(
            f"{what} exceeds the whole inversion cache ({self.cache.max_bytes} bytes, --cache-gib): it "
            "cannot be kept for edits by id; send Edit with the image instead, or use fewer steps or a "
            "smaller image"
        )

    def _check_keepable(self, steps: int, width: int, height: int) -> None:
        """Refuse, before it runs, an inversion the cache could never keep: its trajectory (float32 latents
        of every step) and working-size image alone, the least it holds, exceed the whole cache."""
        spec = self.engine.spec
        factor = spec.vae_scale_factor
        latent = spec.latent_channels * (height // factor) * (width // factor) * 4
        least = (steps + 1) * latent + width * height * 3
        if least > self.cache.max_bytes:
            raise self._too_big_to_keep(
                f"an inversion of {steps} steps at {width}x{height} (at least {least} bytes)"
            )

    def check(self, call: EditCall | GenerateCall | InvertCall) -> None:
        """Raise what running ``call`` would refuse it with, without running it (the engine's checks, the
        image decoded, an inversion id looked up): a job is judged by this when it is submitted."""
        engine = self.engine
        if isinstance(call, GenerateCall):
            engine.check_generated(call.source_prompt, call.target_prompt, **generate_options(call))
        elif isinstance(call, InvertCall):
            width, height = engine.check_invert(call.image, options=call.options, **call.inversion)
            self._check_keepable(call.options.steps, width, height)
        elif call.inversion_id:
            self.check_edit_of(self._by_id(call)[0], call)
        else:
            engine.check_real(call.image, call.target_prompt, options=call.options, **call.inversion)

    def edit(
        self, call: EditCall, *, progress: ProgressFn | None = None, cancel_check: CancelCheck | None = None
    ) -> EditOutcome:
        options = call.options
        if call.inversion_id:
            inversion, options = self._by_id(call)
            result, queue_ms = self._run(
                lambda kw: self.engine.edit_real(inversion, call.target_prompt, options=options, **kw),
                progress,
                cancel_check,
            )
            key = call.inversion_id
            self.cache.refresh(key)  # the edit may have cached the source's maps on the inversion
        else:
            result, queue_ms = self._run(
                lambda kw: self.engine.edit_real(
                    call.image, call.target_prompt, options=options, **call.inversion, **kw
                ),
                progress,
                cancel_check,
            )
            key = self.cache.put(result.inversion, call.new_id)  # "": too big to keep, so no id
        return EditOutcome(
            edited_image=encode_image(result.edited_image, call.output_format),
            reconstruction_image=b""
            if call.skip_reconstruction
            else encode_image(result.reconstruction_image, call.output_format),
            width=result.edited_image.width,
            height=result.edited_image.height,
            stats=result.stats,
            queue_ms=queue_ms,
            inversion_id=key,
            replica=self.replica,
            **blend_outputs(result.blend_mask, result.edited_image.size),
        )

    def edit_stream(
        self, call: EditCall, *, cancel_check: CancelCheck | None = None
    ) -> Iterator[ProgressEvent | EditOutcome]:
        # The edit waits on the pool on its own thread while this one yields its progress, then its result.
        yield from stream_of(lambda emit: self.edit(call, progress=emit, cancel_check=cancel_check))

    def generate(
        self,
        call: GenerateCall,
        *,
        progress: ProgressFn | None = None,
        cancel_check: CancelCheck | None = None,
    ) -> GenerateOutcome:
        result, queue_ms = self._run(
            lambda kw: self.engine.edit_generated(
                call.source_prompt, call.target_prompt, **generate_options(call), **kw
            ),
            progress,
            cancel_check,
        )
        return GenerateOutcome(
            source_image=encode_image(result.source_image, call.output_format),
            edited_image=encode_image(result.edited_image, call.output_format),
            seed=int(result.stats["seed"]),
            width=result.edited_image.width,
            height=result.edited_image.height,
            stats=result.stats,
            queue_ms=queue_ms,
            replica=self.replica,
            **blend_outputs(result.blend_mask, result.edited_image.size),
        )

    def invert(
        self, call: InvertCall, *, progress: ProgressFn | None = None, cancel_check: CancelCheck | None = None
    ) -> InvertOutcome:
        inversion, queue_ms = self._run(
            lambda kw: self.engine.invert(call.image, options=call.options, **call.inversion, **kw),
            progress,
            cancel_check,
        )
        key = self.cache.put(inversion, call.new_id)
        if not key:
            raise self._too_big_to_keep(f"the inversion ({inversion.nbytes} bytes)")
        return InvertOutcome(
            inversion_id=key,
            width=inversion.size[0],
            height=inversion.size[1],
            steps=inversion.steps,
            expires_in_s=int(self.cache.expires_in(key)),
            stats=inversion.stats,
            queue_ms=queue_ms,
            replica=self.replica,
        )

    def attention_maps(
        self,
        prompt: str,
        *,
        image: bytes = b"",
        inversion_id: str = "",
        progress: ProgressFn | None = None,
        cancel_check: CancelCheck | None = None,
        **maps_options: Any,
    ) -> Any:
        """``EditEngine.attention_maps`` on the pool: of an image (inverted first), of a cached inversion (no
        inverting; its step count unless ``steps`` is given) or, with neither, of the prompt's generation.
        Returns the engine's :class:`~fpedit.engine.attention_maps.AttentionMapResult`."""
        source: Any = image or None
        if inversion_id:
            source = self.cache.get(inversion_id)
            if source is None:
                raise unknown_inversion(inversion_id)
            if maps_options.get("steps") is None:
                maps_options["steps"] = source.steps
        maps_options = {k: v for k, v in maps_options.items() if v is not None}
        result, _ = self._run(
            lambda kw: self.engine.attention_maps(prompt, image=source, **maps_options, **kw),
            progress,
            cancel_check,
        )
        return result

    def info(self) -> InfoOutcome:
        import fpedit

        info = self.engine.info()
        cfg = self.config
        return InfoOutcome(
            version=fpedit.__version__,
            model=str(info["model"]),
            backend=info["backend"],
            device=info["device"],
            precision=info.get("precision", info["dtype"]),
            layers_available=tuple(info["map_layers"]),
            map_formats=tuple(info["map_formats"]),
            defaults=EditOptions(),
            default_image_size=info["default_image_size"],
            limits=Limits(
                max_steps=MAX_STEPS,
                max_image_pixels=self.engine.max_input_pixels,
                max_side=self.engine.max_side,
                max_message_bytes=cfg.max_message_bytes,
                workers=cfg.workers,
                max_queue=cfg.max_queue,
                cache_bytes=cfg.cache_bytes,
                cache_ttl_s=int(cfg.cache_ttl_s),
                max_prompt_chars=cfg.max_prompt_chars,
            ),
            loras=tuple((str(lora["file"]), float(lora["scale"])) for lora in info["loras"]),
            prediction_type=str(info["prediction_type"]),
            adapters=tuple(
                AdapterOutcome(str(a["name"]), int(a["rank"]), tuple(a["layers"])) for a in info["adapters"]
            ),
            max_adapters=int(info["max_adapters"]),
        )

    def stats(self) -> RunnerStats:
        counts = self.cache.counters()
        engine_counts = self.engine.counters()
        running = self.pool.running
        return RunnerStats(
            running=running,
            queued=max(0, self.pool.pending - running),
            cache_entries=counts["entries"],
            cache_bytes=counts["bytes"],
            cache_hits=counts["hits"],
            cache_misses=counts["misses"],
            cache_evictions=counts["evictions"],
            device_memory_bytes=device_memory(self._device),
            backend_calls=engine_counts["unet_calls"],
            backend_rows=engine_counts["unet_rows"],
            backend_batch_rows=tuple(sorted(engine_counts["batch_rows"].items())),
        )

    def close(self) -> None:
        self.pool.shutdown()
