"""Free-Prompt-Editing over one backend: the public engine (docs/design.md §1).

:class:`EditEngine` validates a request, encodes text and images, and runs the algorithms, which are written
once as step programs in :mod:`.programs` (Algorithm 1: :func:`~.programs.generated_edit`; Algorithm 2:
:func:`~.programs.invert`, :func:`~.programs.capture_source_maps`, :func:`~.programs.denoise_target`;
Algorithm 3 adds :func:`~.programs.generate_source` and :mod:`.null_text`'s optimisation), on its
:class:`~.executor.Executor`: alone, or with ``batching=True`` merged with every other running request's
UNet calls into shared backend calls. Text encoding, VAE encode and decode run in the caller's thread.

A real edit's source maps depend on the image, the step count and the model, not on the target prompt:
they are captured eagerly (in batches, once the trajectory is known) and cached on the :class:`Inversion`,
so a further edit runs the target branch alone.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import null_text, programs
from .backends.base import Backend
from .backends.capture import CAPTURE_GATE
from .config import DEFAULT_MAP_CACHE_BYTES, EngineConfig
from .contract import ModelSpec
from .errors import InvalidInputError
from .executor import CancelCheck, Executor, ProgressCallback, ProgressEvent, RequestRun
from .images import (
    DEFAULT_MAX_INPUT_PIXELS,
    DEFAULT_MAX_SIDE,
    ImageInput,
    check_output_size,
    image_to_tensor,
    load_image,
    output_image,
    prepare_image,
    tensor_to_images,
)
from .maps import AttentionMaps
from .options import DEFAULT_MAX_PROMPT_CHARS, EditOptions, InversionOptions, check_prompt
from .results import EditResult, Inversion
from .schedule import DDIMSchedule, ScheduleCache

__all__ = ["EditEngine", "ProgressCallback", "ProgressEvent"]

log = logging.getLogger(__name__)

#: Prompt embeddings kept (LRU, keyed by token ids): a few MB at SD 1.5's 77 x 768 floats each.
TEXT_CACHE_SIZE = 256
#: A Hugging Face fast tokenizer keeps its padding and truncation settings on the shared Rust object and
#: sets them on every call, so two threads tokenizing at once can get each other's settings (an unpadded
#: 9-id prompt where 77 were asked for). Tokenizing takes microseconds: one lock for the whole process
#: also covers engines that share a tokenizer.
_TOKENIZER_LOCK = threading.Lock()
#: An inversion keyword left out (``None`` is a value, and refused as a method).
_NOT_GIVEN: Any = object()


class EditEngine:
    """Text-guided image editing with FPE over one backend (torch, onnxruntime or tensorrt).

    Thread-safe: concurrent requests may share one engine. With ``batching=True`` their UNet calls are
    merged into shared backend calls by one device loop (``max_wait_ms`` may hold a partial batch open for
    more); :meth:`counters` reports the backend calls and their sizes.
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer: Any,
        *,
        source: str = "",
        map_cache_bytes: int = DEFAULT_MAP_CACHE_BYTES,
        max_side: int = DEFAULT_MAX_SIDE,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        capture_batch: int | None = None,
        show_progress: bool = False,
        image_formats: Sequence[str] | None = None,
        batching: bool = False,
        max_wait_ms: float = 0.0,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    ) -> None:
        self.backend = backend
        self.spec: ModelSpec = backend.spec
        self.tokenizer = tokenizer
        self.source = source
        self.map_cache_bytes = int(map_cache_bytes)
        self.max_side = int(max_side)
        self.max_input_pixels = int(max_input_pixels)
        self.capture_batch = max(1, min(capture_batch or backend.max_batch, backend.max_batch))
        self.show_progress = show_progress
        #: Encoded formats accepted for bytes and paths (PIL names); ``None`` accepts whatever PIL decodes.
        self.image_formats = tuple(image_formats) if image_formats else None
        self.max_prompt_chars = int(max_prompt_chars)
        self.engine_id = uuid.uuid4().hex
        self.executor = Executor(backend, batching=batching, max_wait_ms=max_wait_ms)
        self._schedules = ScheduleCache(self.spec.scheduler)
        self._text_cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._text_lock = threading.Lock()

    # --- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: EngineConfig) -> EditEngine:
        """Load the engine ``config`` describes (its backend settled from the model folder when ``None``)."""
        from .backends import create_backend

        config = config.resolved()
        created, tokenizer, source = create_backend(config.model, config.backend, **config.backend_kwargs())
        return cls(created, tokenizer, source=source, **config.engine_kwargs())

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        backend: str = "torch",
        device: str = "cpu",
        dtype: str | None = None,
        *,
        allow_pickle: bool = False,
        providers: Sequence[str] | None = None,
        backend_options: dict[str, Any] | None = None,
        model_config: str | Path | None = None,
        prediction_type: str | None = None,
        loras: Sequence[Any] = (),
        **engine_kwargs: Any,
    ) -> EditEngine:
        """Load ``model`` for ``backend``: :meth:`from_config` with an :class:`EngineConfig` of these keywords.

        torch: ``model`` is a local diffusers-layout SD 1.x/2.x folder, an SD 1.x single-file checkpoint
        (``.safetensors``; ``model_config`` is a diffusers folder describing a non-standard one) or ``"tiny"``;
        ``prediction_type`` (``epsilon``/``v_prediction``) overrides the checkpoint's; ``loras`` (``FILE`` or
        ``FILE:SCALE`` strings, or (path, scale) pairs) are fused into the weights at load; onnxruntime: a folder
        written by ``fpedit export``; tensorrt: a folder written by ``fpedit build-engines``. ``dtype``
        (torch) defaults to float16 on CUDA, float32 on the CPU; ``backend_options`` tune the backend
        (torch: ``vae_dtype``, ``cuda_graphs``, ``channels_last``, ``compile_unet``, ``max_batch``,
        ``max_graphs``). ``engine_kwargs`` are the config's engine fields (e.g. ``batching=True``).
        """
        config = EngineConfig.from_keywords(
            model,
            backend,
            device,
            dtype,
            allow_pickle=allow_pickle,
            providers=providers,
            backend_options=backend_options,
            model_config=model_config,
            prediction_type=prediction_type,
            loras=loras,
            **engine_kwargs,
        )
        return cls.from_config(config)

    def info(self) -> dict[str, Any]:
        defaults = EditOptions()
        return {
            "model": self.source,
            **self.backend.describe(),
            "prediction_type": self.spec.prediction_type,
            "loras": list(getattr(self.backend, "loras", [])),
            "default_image_size": self.spec.default_image_size,
            "max_side": self.max_side,
            "map_cache_bytes": self.map_cache_bytes,
            "batching": self.executor.batching,
            "defaults": {
                "steps": defaults.steps,
                "guidance_scale": defaults.guidance_scale,
                "replace_window": list(defaults.replace_window),
                "layers": list(defaults.layers),
                "map_format": defaults.map_format,
            },
        }

    def counters(self) -> dict[str, Any]:
        """Cumulative backend UNet calls of this engine: ``unet_calls``, ``unet_rows``, ``batch_rows`` (how
        many calls had each row count) and ``mean_rows_per_call``."""
        return self.executor.counters.snapshot()

    def close(self) -> None:
        """Stop the batching device loop (after the calls already queued); the engine takes no more work."""
        self.executor.close()

    # --- inversions on disk (engine.saved) ------------------------------------------------------------------

    @cached_property
    def fingerprint(self) -> dict[str, str]:
        """What a saved inversion must match to be edited here: backend, precision, scheduler betas and a
        sha256 of the weights (computed on first use: seconds for SD 1.5)."""
        from .saved import engine_fingerprint

        return engine_fingerprint(self)

    def save_inversion(self, inversion: Inversion, path: str | Path) -> Path:
        """Write ``inversion`` (computed by this engine) to a ``.safetensors`` file, with this engine's
        fingerprint; :meth:`load_inversion` on an engine with the same model and settings reads it back."""
        from .saved import save_inversion

        return save_inversion(self, inversion, path)

    def load_inversion(self, path: str | Path) -> Inversion:
        """An inversion saved by :meth:`save_inversion`; a file saved by another model or settings is
        refused (``InvalidInputError`` on ``inversion_file`` naming the fingerprint field that differs)."""
        from .saved import load_inversion

        return load_inversion(self, path)

    def _run(self, progress: ProgressCallback | None, cancel_check: CancelCheck | None) -> RequestRun:
        return RequestRun(self.backend, progress, cancel_check, self.show_progress)

    # --- text -----------------------------------------------------------------------------------------------

    def _check_prompt(self, prompt: Any, field: str, *, allow_empty: bool) -> str:
        return check_prompt(prompt, field, allow_empty=allow_empty, max_chars=self.max_prompt_chars)

    def _embed(self, prompt: str, run: RequestRun) -> torch.Tensor:
        """(1, L, D) CLIP embedding of ``prompt``, padded to the tokenizer's max length; cached by token ids
        (prompts that tokenize alike share an entry, and a cache key is at most 77 ids)."""
        max_len = self.spec.text_max_length
        with run.stage("text"):
            with _TOKENIZER_LOCK:
                full = self.tokenizer(prompt, truncation=False).input_ids
                ids = self.tokenizer(
                    prompt, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
                ).input_ids
            if len(full) > max_len:
                # No prompt text: server logs must not carry what users write.
                message = f"prompt has {len(full)} tokens; truncated to {max_len}"
                warnings.warn(message, stacklevel=3)
                log.warning(message)
            key = tuple(int(i) for i in ids[0])
            with self._text_lock:
                cached = self._text_cache.get(key)
                if cached is not None:
                    self._text_cache.move_to_end(key)
                    return cached
            embedding = self.backend.encode_text(ids)
        with self._text_lock:
            self._text_cache[key] = embedding
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return embedding

    # --- shared steps ---------------------------------------------------------------------------------------

    def _check_request(self, options: EditOptions, latent_hw: tuple[int, int] | None) -> tuple[int, ...]:
        layers = options.layer_numbers(self.spec, latent_hw)
        if options.replaced_steps() and layers:
            self.backend.check_map_request(layers, options.map_format)
        return layers

    def _decode(self, latents: torch.Tensor, run: RequestRun) -> list[Image.Image]:
        with run.stage("vae_decode"):
            decoded = self.backend.decode_latents(latents / self.spec.vae_scaling_factor)
            return tensor_to_images(decoded)

    # --- Algorithm 1: generated images ----------------------------------------------------------------------

    def edit_generated(
        self,
        source_prompt: str,
        target_prompt: str,
        *,
        options: EditOptions | None = None,
        seed: int | None = None,
        latents: torch.Tensor | np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        progress: ProgressCallback | None = None,
        cancel_check: CancelCheck | None = None,
    ) -> EditResult:
        """Generate an image from ``source_prompt`` and its edit toward ``target_prompt`` (Algorithm 1).

        z_T is ``latents`` if given, else drawn on the CPU from ``torch.Generator().manual_seed(seed)`` (a
        random seed when none is given; it is reported in ``stats["seed"]``). ``cancel_check`` is called
        before every stage and UNet call; whatever it raises stops the work.
        """
        options = options or EditOptions()
        source_prompt = self._check_prompt(source_prompt, "source_prompt", allow_empty=True)
        target_prompt = self._check_prompt(target_prompt, "target_prompt", allow_empty=False)
        z, seed = self._initial_latents(seed, latents, height, width)
        latent_hw = (z.shape[-2], z.shape[-1])
        layers = self._check_request(options, latent_hw)
        schedule = self._schedules(options.steps)
        replaced = set(options.replaced_steps()) if layers else set()
        run = self._run(progress, cancel_check)

        uncond = self._embed("", run)
        # The source prompt "" needs one row: its cond and uncond rows would be identical.
        src_ctx = uncond if source_prompt == "" else torch.cat([uncond, self._embed(source_prompt, run)])
        tgt_ctx = torch.cat([uncond, self._embed(target_prompt, run)])
        # In-call donors fuse a replaced step into one call where the backend has them and the step's rows
        # fit one call; otherwise the source captures and the target injects.
        donors = self.backend.supports_donors and src_ctx.shape[0] + 2 <= self.backend.max_batch
        program = programs.generated_edit(
            z.to(self.backend.device),
            schedule,
            src_ctx,
            tgt_ctx,
            sorted(replaced),
            layers,
            options.map_format,
            options.guidance_scale,
            donors=donors,
            capture_layers=self.backend.capture_layers(layers) if replaced else (),
        )
        z_src, z_tgt = self.executor.run(program, run)

        source_image, edited_image = self._decode(torch.cat([z_src, z_tgt]), run)
        stats = run.stats(
            seed=seed,
            steps=options.steps,
            replaced_steps=sorted(replaced),
            layers=list(layers),
            map_format=options.map_format,
            size=[edited_image.width, edited_image.height],
        )
        return EditResult(
            source_image=source_image,
            edited_image=edited_image,
            source_latents=z_src.float().cpu().numpy(),
            edited_latents=z_tgt.float().cpu().numpy(),
            options=options,
            stats=stats,
        )

    def _initial_latents(
        self,
        seed: int | None,
        latents: torch.Tensor | np.ndarray | None,
        height: int | None,
        width: int | None,
    ) -> tuple[torch.Tensor, int | None]:
        c, f = self.spec.latent_channels, self.spec.vae_scale_factor
        if latents is not None:
            z = torch.as_tensor(np.asarray(latents) if not torch.is_tensor(latents) else latents)
            if z.ndim == 3:
                z = z.unsqueeze(0)
            if z.ndim != 4 or z.shape[0] != 1 or z.shape[1] != c or z.shape[2] % 8 or z.shape[3] % 8:
                raise InvalidInputError(
                    "latents",
                    f"must have shape (1, {c}, h, w) with h and w multiples of 8, got {tuple(z.shape)}",
                )
            if not torch.isfinite(z).all():
                raise InvalidInputError("latents", "contain NaN or infinity")
            return z.detach().to(torch.float32).cpu(), None
        size = self.spec.default_image_size
        h = size if height is None else height
        w = size if width is None else width
        for name, value in (("height", h), ("width", w)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % (8 * f):
                raise InvalidInputError(name, f"must be a positive multiple of {8 * f}, got {value!r}")
            if value > self.max_side:
                raise InvalidInputError(name, f"must be at most {self.max_side}, got {value}")
        if seed is None:
            seed = secrets.randbelow(2**31)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InvalidInputError("seed", f"must be an integer in [0, 2**63), got {seed!r}")
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((1, c, h // f, w // f), generator=generator, dtype=torch.float32), seed

    # --- Algorithm 2: real images ---------------------------------------------------------------------------

    def invert(
        self,
        image: ImageInput,
        *,
        options: EditOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel_check: CancelCheck | None = None,
        inversion: InversionOptions | None = None,
        source_prompt: str = _NOT_GIVEN,
        method: str = _NOT_GIVEN,
        null_text_steps: int = _NOT_GIVEN,
        null_text_epsilon: float = _NOT_GIVEN,
    ) -> Inversion:
        """Invert ``image`` over ``options.steps`` steps; keep the whole trajectory.

        ``inversion`` (:class:`InversionOptions`, or the same fields as separate keywords) says how:
        ``method="ddim"`` (default): DDIM inversion with prompt "" (Algorithm 2; ``source_prompt`` is
        ignored). ``"null-text"``: conditional-only inversion with ``source_prompt`` and per-step null
        embeddings optimised for ``options.guidance_scale`` (Algorithm 3; torch backend; at most
        ``null_text_steps`` Adam iterations per step, early stop at ``null_text_epsilon``). ``"negative-prompt"``:
        the same inversion with the source prompt's embedding as every step's null embedding (no optimisation).
        """
        options = options or EditOptions()
        given = {
            name: value
            for name, value in (
                ("source_prompt", source_prompt),
                ("method", method),
                ("null_text_steps", null_text_steps),
                ("null_text_epsilon", null_text_epsilon),
            )
            if value is not _NOT_GIVEN
        }
        if inversion is not None and given:
            raise TypeError(f"give inversion=InversionOptions(...) or {next(iter(given))}=, not both")
        if "source_prompt" in given:  # judged by this engine's prompt limit before the options' rules
            self._check_prompt(source_prompt, "source_prompt", allow_empty=True)
        how = inversion if inversion is not None else InversionOptions(**given)
        source_prompt = self._check_prompt(how.source_prompt, "source_prompt", allow_empty=True)
        method = null_text.check_method(how.method, source_prompt, self.backend)
        inner_steps, epsilon = how.null_text_steps, how.null_text_epsilon
        run = self._run(progress, cancel_check)
        run.check()
        given = load_image(image, max_input_pixels=self.max_input_pixels, formats=self.image_formats)
        pil = prepare_image(given, self.max_side)
        schedule = self._schedules(options.steps)
        with run.stage("vae_encode"):
            mean = self.backend.encode_image(image_to_tensor(pil))
            z0 = (mean.float() * self.spec.vae_scaling_factor).to(self.backend.device)
        if method == "ddim":
            uncond = self._embed("", run)
            trajectory = self.executor.run(programs.invert(z0, schedule, uncond), run)
            return Inversion(
                trajectory=trajectory,
                steps=options.steps,
                image=pil,
                engine_id=self.engine_id,
                stats=run.stats(steps=options.steps, size=list(pil.size)),
                map_cache_limit=self.map_cache_bytes,
                original_size=given.size,
            )
        trajectory, nulls, extra = self._invert_with_source_prompt(
            z0, schedule, options.guidance_scale, source_prompt, method, inner_steps, epsilon, run
        )
        return Inversion(
            trajectory=trajectory,
            steps=options.steps,
            image=pil,
            engine_id=self.engine_id,
            stats=run.stats(steps=options.steps, size=list(pil.size), method=method, **extra),
            map_cache_limit=self.map_cache_bytes,
            method=method,
            source_prompt=source_prompt,
            null_embeddings=nulls,
            guidance_scale=options.guidance_scale,
            original_size=given.size,
        )

    def edit_real(
        self,
        image: ImageInput | Inversion,
        target_prompt: str,
        *,
        options: EditOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel_check: CancelCheck | None = None,
        inversion: InversionOptions | None = None,
        source_prompt: str | None = None,
        method: str | None = None,
        null_text_steps: int | None = None,
        null_text_epsilon: float | None = None,
        output_size: str | tuple[int, int] = "input",
    ) -> EditResult:
        """Edit a real image (or an :class:`Inversion` of one) toward ``target_prompt``: Algorithm 2 for a
        "ddim" inversion, Algorithm 3 for a "null-text" or "negative-prompt" one.

        The edit runs at the working size (see :mod:`.images`); ``output_size`` says what size the edited
        image and the reconstruction come back at: ``"input"`` (default: the image's own width and height),
        ``"working"``, or an explicit ``(width, height)``. Latents stay at the working size.

        With an image, ``inversion`` (or its fields as ``source_prompt``, ``method``, ``null_text_steps`` and
        ``null_text_epsilon``) goes to :meth:`invert` (an inversion already has them). ``cancel_check`` is called before every stage, UNet
        call and Adam iteration; whatever it raises stops the work.
        """
        options = options or EditOptions()
        target_prompt = self._check_prompt(target_prompt, "target_prompt", allow_empty=False)
        output_size = check_output_size(output_size, self.max_input_pixels)
        invert_options = {
            name: value
            for name, value in (
                ("inversion", inversion),
                ("source_prompt", source_prompt),
                ("method", method),
                ("null_text_steps", null_text_steps),
                ("null_text_epsilon", null_text_epsilon),
            )
            if value is not None
        }
        if isinstance(image, Inversion):
            if invert_options:
                raise InvalidInputError(
                    next(iter(invert_options)), "applies when inverting an image; the inversion has its own"
                )
            inversion = image
            self._check_inversion(inversion, options)
            run = self._run(progress, cancel_check)
        else:
            if options.layers != "resolution":  # that preset needs the image's size; others are checked now
                self._check_request(options, None)  # before the inversion, not after it ran for nothing
            inversion = self.invert(
                image, options=options, progress=progress, cancel_check=cancel_check, **invert_options
            )
            # Started after the inversion, which absorb() prepends: its time is counted once, not twice.
            run = self._run(progress, cancel_check)
            run.absorb(inversion.stats)  # one call did both: report the whole real edit
        if inversion.method == "null-text" and inversion.guidance_scale != options.guidance_scale:
            raise InvalidInputError(
                "guidance_scale",
                f"the null-text inversion was optimised for guidance {inversion.guidance_scale}; the edit must "
                f"use it (got {options.guidance_scale}), or invert again",
            )
        layers = self._check_request(options, inversion.latent_hw)
        schedule = self._schedules(options.steps)
        replaced = list(options.replaced_steps()) if layers else []
        target_cond = self._embed(target_prompt, run)

        if inversion.method == "ddim":  # Algorithm 2: the source is pinned to the trajectory
            uncond = self._embed("", run)
            context = torch.cat([uncond, target_cond])

            def context_at(i: int) -> torch.Tensor:
                return context

            source_maps, cached_hits = self._source_maps(
                inversion, schedule, replaced, layers, options, uncond, run
            )
            source_latent = inversion.latent(0)
        else:  # Algorithm 3: the source is generated with the source prompt and step i's null embedding
            source_cond = self._embed(inversion.source_prompt, run)
            nulls = None  # negative-prompt: the null is the source prompt's own embedding
            if inversion.method == "null-text":
                assert inversion.null_embeddings is not None
                nulls = inversion.null_embeddings.to(source_cond.device, source_cond.dtype)

            def context_at(i: int) -> torch.Tensor:
                null = source_cond if nulls is None else nulls[i : i + 1]
                return torch.cat([null, target_cond])

            source_latent, source_maps, cached_hits = self._generated_source(
                inversion, schedule, replaced, layers, options, source_cond, nulls, run
            )
        program = programs.denoise_target(
            inversion.latent(options.steps),
            schedule,
            context_at,
            source_maps,
            layers,
            options.map_format,
            options.guidance_scale,
        )
        z = self.executor.run(program, run)

        # Decoded one by one: batch size changes convolution rounding, and an edit from a cached
        # inversion must give the same pixels as a fresh one.
        (edited_image,) = self._decode(z, run)
        reconstruction = inversion.reconstruction
        if reconstruction is None:
            (reconstruction,) = self._decode(source_latent, run)
            inversion.keep_reconstruction(reconstruction)

        stats = run.stats(
            steps=options.steps,
            replaced_steps=replaced,
            layers=list(layers),
            map_format=options.map_format,
            size=list(inversion.size),
            method=inversion.method,
            source_maps_cached=cached_hits,
            inversion_bytes=inversion.nbytes,
        )
        # Resized after the statistics: the reconstruction kept on the inversion stays at the working size.
        edited_image = output_image(edited_image, inversion.input_size, output_size)
        reconstruction = output_image(reconstruction, inversion.input_size, output_size)
        stats["output_size"] = list(edited_image.size)
        return EditResult(
            source_image=reconstruction,
            edited_image=edited_image,
            source_latents=source_latent.float().cpu().numpy(),
            edited_latents=z.float().cpu().numpy(),
            options=options,
            stats=stats,
            reconstruction_image=reconstruction,
            inversion=inversion,
        )

    def _source_maps(
        self,
        inversion: Inversion,
        schedule: DDIMSchedule,
        replaced: Sequence[int],
        layers: Sequence[int],
        options: EditOptions,
        uncond: torch.Tensor,
        run: RequestRun,
    ) -> tuple[dict[int, AttentionMaps], int]:
        """The pinned source's maps for every replaced step: those an earlier edit left on the inversion,
        the rest captured now in batches of ``capture_batch`` rows and left on the inversion when they fit
        its budget. Returns the maps and how many steps came from the cache."""
        cached = inversion.cached_maps(options.map_format, frozenset(layers))
        missing = [i for i in replaced if i not in cached]
        maps = {i: cached[i] for i in replaced if i in cached}
        if missing:
            capture_layers = self.backend.capture_layers(layers)
            program = programs.capture_source_maps(
                inversion.trajectory,
                schedule,
                missing,
                uncond,
                capture_layers,
                options.map_format,
                self.capture_batch,
            )
            captured = self.executor.run(program, run)
            inversion.store_maps(options.map_format, frozenset(capture_layers), captured)
            maps.update(captured)
        return maps, len(replaced) - len(missing)

    def _generated_source(
        self,
        inversion: Inversion,
        schedule: DDIMSchedule,
        replaced: Sequence[int],
        layers: Sequence[int],
        options: EditOptions,
        source_cond: torch.Tensor,
        nulls: torch.Tensor | None,
        run: RequestRun,
    ) -> tuple[torch.Tensor, dict[int, AttentionMaps], int]:
        """Algorithm 3's source branch: what an earlier edit left on the inversion, else generated now and
        left there (its final latent always, its maps within the budget). Returns (z_0, the replaced steps'
        maps, how many steps came from the cache)."""
        cached = inversion.cached_maps(options.map_format, frozenset(layers))
        source_latent = inversion.source_latent
        if source_latent is not None and all(i in cached for i in replaced):
            return source_latent, {i: cached[i] for i in replaced}, len(replaced)
        capture_layers = self.backend.capture_layers(layers)
        program = programs.generate_source(
            inversion.latent(options.steps),
            schedule,
            source_cond,
            nulls,
            replaced,
            capture_layers,
            options.map_format,
            options.guidance_scale,
        )
        source_latent, maps = self.executor.run(program, run)
        inversion.keep_source(source_latent)
        inversion.store_maps(options.map_format, frozenset(capture_layers), maps)
        return source_latent, maps, 0

    def _invert_with_source_prompt(
        self,
        z0: torch.Tensor,
        schedule: DDIMSchedule,
        guidance: float,
        source_prompt: str,
        method: str,
        inner_steps: int,
        epsilon: float,
        run: RequestRun,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Conditional-only DDIM inversion with the source prompt, then the per-step null embeddings:
        optimised (null-text) or the source prompt's own (negative-prompt). Returns (trajectory, nulls as
        float32 (steps, L, D), statistics)."""
        cond = self._embed(source_prompt, run)
        # One conditional row per step: guidance on a single row is the identity, which is the authors'
        # unguided inversion; the t = 0 step is skipped as for Algorithm 2.
        trajectory = self.executor.run(programs.invert(z0, schedule, cond), run)
        if method == "negative-prompt":
            return trajectory, cond.float().expand(schedule.steps, -1, -1).contiguous(), {}
        null_init = self._embed("", run)

        def progress(done: int, total: int) -> None:
            if run.progress is not None:
                run.progress(ProgressEvent("null_text", done, total))

        # Gradient work on the device outside the backend's entry points: never beside a graph capture.
        with run.stage("null_text"), CAPTURE_GATE.shared():
            result = null_text.optimize_null_embeddings(
                self.backend.float32_unet(),
                trajectory,
                cond,
                null_init,
                guidance,
                null_text.denoise_steps(schedule),
                inner_steps=inner_steps,
                epsilon=epsilon,
                progress=progress,
                cancel_check=run.check,
            )
        run.unet_rows += result.unet_forwards
        stats = {
            "null_text_iterations": result.total_iterations,
            "unet_backward_rows": result.unet_backwards,
            "null_text_final_loss": result.final_losses[-1] if result.final_losses else None,
        }
        return trajectory, result.embeddings, stats

    def _check_inversion(self, inversion: Inversion, options: EditOptions) -> None:
        if inversion.engine_id != self.engine_id:
            raise InvalidInputError("inversion", "was computed by another engine (model or backend)")
        if inversion.steps != options.steps:
            raise InvalidInputError(
                "steps",
                f"the inversion was computed with {inversion.steps} steps, the request asks {options.steps}",
            )

    # --- attention maps (Figure 3) --------------------------------------------------------------------------

    def attention_maps(self, prompt: str, image: ImageInput | None = None, **kwargs: Any) -> Any:
        """Per-token cross-attention maps and the top SVD components of self-attention maps (the paper's
        Figure 3) of a generated image (``seed``) or, with ``image``, of that image inverted first (or of an
        :class:`~.results.Inversion` already computed, with its step count); returns an
        :class:`~.attention_maps.AttentionMapResult`. Keywords: ``seed``, ``steps``, ``guidance_scale``,
        ``window`` (the steps averaged, as fractions), ``resolution`` (grid side; default latent side / 4,
        16 at 512 px), ``components``, ``height``, ``width``, ``progress``, ``cancel_check``. Torch backend
        only."""
        from .attention_maps import compute_attention_maps

        return compute_attention_maps(self, prompt, image=image, **kwargs)
