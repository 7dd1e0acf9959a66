"""Free-Prompt-Editing over one backend: the public engine (docs/design.md §1).

:class:`EditEngine` validates a request, encodes text and images, and runs the algorithms, which are written
once as step programs in :mod:`.programs` (Algorithm 1: :func:`~.programs.generated_edit`; Algorithm 2:
:func:`~.programs.invert`, :func:`~.programs.capture_source_maps`, :func:`~.programs.denoise_target`;
Algorithm 3 adds :func:`~.programs.generate_source` and :mod:`.null_text`'s optimisation), on its
:class:`~.executor.Executor`: alone, or with ``batching=True`` merged with every other running request's
UNet calls into shared backend calls. Text encoding (:class:`~.text.TextEncoderCache`), VAE encode and
decode run in the caller's thread. Each request resolves its options once into a plan (:mod:`.plan`) that
its programs take; where a real edit's source branch comes from is :mod:`.real`'s part.

A real edit's source maps depend on the image, the step count and the model, not on the target prompt:
they are captured eagerly (in batches, once the trajectory is known) and cached on the :class:`Inversion`,
so a further edit runs the target branch alone.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import local_blend as blending
from . import null_text, programs, real
from .adapters import DEFAULT_ADAPTER_BATCHING, DEFAULT_MAX_ADAPTERS, AdapterSet
from .backends.base import Backend
from .config import DEFAULT_MAP_CACHE_BYTES, EngineConfig
from .contract import ModelSpec
from .executor import CancelCheck, Executor, ProgressCallback, ProgressEvent, RequestRun
from .images import (
    DEFAULT_MAX_INPUT_PIXELS,
    DEFAULT_MAX_SIDE,
    ImageInput,
    check_output_size,
    image_to_tensor,
    initial_latents,
    load_image,
    output_image,
    prepare_image,
    tensor_to_images,
    working_size,
)
from .options import DEFAULT_MAX_PROMPT_CHARS, EditOptions, InversionOptions, check_prompt
from .plan import EditPlan, InversionPlan, check_layers
from .results import EditResult, Inversion
from .schedule import ScheduleCache
from .text import TextEncoderCache

__all__ = ["EditEngine", "ProgressCallback", "ProgressEvent"]

log = logging.getLogger(__name__)

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
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
        adapter_batching: str = DEFAULT_ADAPTER_BATCHING,
    ) -> None:
        self.backend = backend
        self.spec: ModelSpec = backend.spec
        self.source = source
        self.map_cache_bytes = int(map_cache_bytes)
        self.max_side = int(max_side)
        self.max_input_pixels = int(max_input_pixels)
        self.capture_batch = max(1, min(capture_batch or backend.max_batch, backend.max_batch))
        self.show_progress = show_progress
        #: Encoded formats accepted for bytes and paths (PIL names); ``None`` accepts whatever PIL decodes.
        self.image_formats = tuple(image_formats) if image_formats else None
        self.max_prompt_chars = int(max_prompt_chars)
        #: Most adapters (``EditOptions.adapters``) one request may combine.
        self.max_adapters = int(max_adapters)
        self.engine_id = uuid.uuid4().hex
        self.executor = Executor(
            backend, batching=batching, max_wait_ms=max_wait_ms, adapter_batching=adapter_batching
        )
        #: DDIM schedules by step count (``schedules(steps)``), the recent ones cached.
        self.schedules = ScheduleCache(self.spec.scheduler)
        #: Prompt embeddings of this engine's text encoder, the recent ones cached.
        self.text = TextEncoderCache(backend, tokenizer, self.spec.text_max_length)

    @property
    def tokenizer(self) -> Any:
        """The CLIP tokenizer prompts go through (the text cache's)."""
        return self.text.tokenizer

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
            "loras": list(self.backend.loras),
            "adapters": self.backend.adapters.describe() if self.backend.adapters is not None else [],
            "max_adapters": self.max_adapters,
            "adapter_batching": self.executor.adapter_batching,
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

    # --- the surface the engine's sibling modules (.real, .attention_maps) build on ----------------------------

    def request_run(
        self,
        progress: ProgressCallback | None,
        cancel_check: CancelCheck | None,
        adapters: AdapterSet = (),
    ) -> RequestRun:
        """A new request's bookkeeping (stage times, UNet counts, progress, cancellation) on this engine;
        ``adapters`` (checked by :meth:`check_adapters`) ride on each of its UNet calls and text encodes."""
        return RequestRun(self.backend, progress, cancel_check, self.show_progress, adapters)

    def check_adapters(self, adapters: AdapterSet) -> AdapterSet:
        """``adapters`` if this engine offers each of them and they are at most :attr:`max_adapters`, else
        InvalidInputError naming the problem (before any work starts)."""
        if not adapters:
            return adapters
        if self.backend.adapters is None:
            from .errors import InvalidInputError

            where = "started without --lora-dir" if self.backend.name == "torch" else "torch backend only"
            raise InvalidInputError(
                "adapters", f"this engine offers no adapters ({self.backend.name} backend, {where})"
            )
        self.backend.adapters.check(adapters, self.max_adapters)
        return adapters

    def check_prompt(self, prompt: Any, field: str, *, allow_empty: bool) -> str:
        """``prompt`` if it is a usable prompt within this engine's length limit, else InvalidInputError."""
        return check_prompt(prompt, field, allow_empty=allow_empty, max_chars=self.max_prompt_chars)

    # --- shared steps ---------------------------------------------------------------------------------------

    def _plan(self, options: EditOptions, latent_hw: tuple[int, int]) -> EditPlan:
        return EditPlan.build(options, self.backend, self.schedules, latent_hw)

    def decode(self, latents: torch.Tensor, run: RequestRun) -> list[Image.Image]:
        """Latents (B, C, h, w) as B images, timed as ``run``'s ``vae_decode`` stage."""
        with run.stage("vae_decode"):
            decoded = self.backend.decode_latents(latents / self.spec.vae_scaling_factor)
            return tensor_to_images(decoded)

    # --- refusals without running: what a server judges a job by when it is submitted ------------------------

    def check_generated(
        self,
        source_prompt: str,
        target_prompt: str,
        *,
        options: EditOptions | None = None,
        seed: int | None = None,
        latents: torch.Tensor | np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        """Raise what :meth:`edit_generated` would refuse these inputs with, without running any model (a job
        is refused at submit, never accepted to fail later)."""
        options = options or EditOptions()
        source_prompt = self.check_prompt(source_prompt, "source_prompt", allow_empty=True)
        target_prompt = self.check_prompt(target_prompt, "target_prompt", allow_empty=False)
        z, _ = initial_latents(self.spec, self.max_side, seed, latents, height, width)
        latent_hw = (int(z.shape[-2]), int(z.shape[-1]))
        plan = self._plan(options, latent_hw)
        self.check_adapters(options.adapters)
        if options.blend is not None:  # its words, then its mask image decoded, as the edit does
            words = blending.check_words(self, options.blend, target_prompt, source_prompt)
            blending.start_blend(self, options.blend, plan.steps, latent_hw, words)

    def check_invert(
        self,
        image: ImageInput,
        *,
        options: EditOptions | None = None,
        inversion: InversionOptions | None = None,
        source_prompt: str = _NOT_GIVEN,
        method: str = _NOT_GIVEN,
        null_text_steps: int = _NOT_GIVEN,
        null_text_epsilon: float = _NOT_GIVEN,
    ) -> tuple[int, int]:
        """Raise what :meth:`invert` would refuse these inputs with (the image decoded, not encoded); returns
        the (width, height) the image would be inverted at."""
        self._inversion_plan(
            options or EditOptions(), inversion, source_prompt, method, null_text_steps, null_text_epsilon
        )
        given = load_image(image, max_input_pixels=self.max_input_pixels, formats=self.image_formats)
        return working_size(*given.size, max_side=self.max_side)

    def check_real(
        self,
        image: ImageInput | Inversion,
        target_prompt: str,
        *,
        options: EditOptions | None = None,
        inversion: InversionOptions | None = None,
        source_prompt: str | None = None,
        method: str | None = None,
        null_text_steps: int | None = None,
        null_text_epsilon: float | None = None,
        output_size: str | tuple[int, int] = "input",
    ) -> None:
        """Raise what :meth:`edit_real` would refuse these inputs with, without inverting or editing."""
        options = options or EditOptions()
        target_prompt = self.check_prompt(target_prompt, "target_prompt", allow_empty=False)
        self.check_adapters(options.adapters)
        check_output_size(output_size, self.max_input_pixels)
        invert_options = given_options(
            inversion=inversion,
            source_prompt=source_prompt,
            method=method,
            null_text_steps=null_text_steps,
            null_text_epsilon=null_text_epsilon,
        )
        words: dict[str, list[int]] = {}
        if options.blend is not None:  # as the edit: its words first, before anything about the inversion
            words = blending.check_words(
                self, options.blend, target_prompt, blending.source_prompt_of(image, invert_options)
            )
        if isinstance(image, Inversion):
            real.check_reuse(self, image, options, invert_options)
            latent_hw = image.latent_hw
        else:
            if options.layers != "resolution":
                check_layers(options, self.backend, None)
            width, height = self.check_invert(image, options=options, **invert_options)
            factor = self.spec.vae_scale_factor
            latent_hw = (height // factor, width // factor)
        plan = self._plan(options, latent_hw)
        if options.blend is not None:  # its mask image decoded at the working size, as the edit does
            blending.start_blend(self, options.blend, plan.steps, latent_hw, words)

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
        source_prompt = self.check_prompt(source_prompt, "source_prompt", allow_empty=True)
        target_prompt = self.check_prompt(target_prompt, "target_prompt", allow_empty=False)
        z, seed = initial_latents(self.spec, self.max_side, seed, latents, height, width)
        plan = self._plan(options, (z.shape[-2], z.shape[-1]))
        run = self.request_run(progress, cancel_check, self.check_adapters(options.adapters))

        uncond = self.text.embed("", run)
        # The source prompt "" needs one row: its cond and uncond rows would be identical.
        src_ctx = uncond if source_prompt == "" else torch.cat([uncond, self.text.embed(source_prompt, run)])
        tgt_ctx = torch.cat([uncond, self.text.embed(target_prompt, run)])
        # In-call donors fuse a replaced step into one call where the backend has them and the step's rows
        # fit one call; otherwise the source captures and the target injects.
        donors = self.backend.supports_donors and src_ctx.shape[0] + 2 <= self.backend.max_batch
        blend = None
        if options.blend is not None:
            words = blending.check_words(self, options.blend, target_prompt, source_prompt)
            blend = blending.start_blend(self, options.blend, plan.steps, tuple(z.shape[-2:]), words)
        program = programs.generated_edit(
            z.to(self.backend.device), plan, src_ctx, tgt_ctx, donors=donors, blend=blend
        )
        z_src, z_tgt = self.executor.run(program, run)

        source_image, edited_image = self.decode(torch.cat([z_src, z_tgt]), run)
        stats = run.stats(
            seed=seed,
            **plan.stats(),
            size=[edited_image.width, edited_image.height],
            **blending.blend_stats(blend),
        )
        return EditResult(
            source_image=source_image,
            edited_image=edited_image,
            source_latents=z_src.float().cpu().numpy(),
            edited_latents=z_tgt.float().cpu().numpy(),
            options=options,
            stats=stats,
            blend_mask=blending.mask_array(blend),
        )

    # --- Algorithm 2: real images ---------------------------------------------------------------------------

    def _inversion_plan(
        self,
        options: EditOptions,
        inversion: InversionOptions | None,
        source_prompt: Any = _NOT_GIVEN,
        method: Any = _NOT_GIVEN,
        null_text_steps: Any = _NOT_GIVEN,
        null_text_epsilon: Any = _NOT_GIVEN,
    ) -> InversionPlan:
        """How :meth:`invert` inverts under ``options`` and the inversion options (given as
        ``InversionOptions`` or as keywords, not both): every refusal of those options, before any work."""
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
            self.check_prompt(source_prompt, "source_prompt", allow_empty=True)
        how = inversion if inversion is not None else InversionOptions(**given)
        source = self.check_prompt(how.source_prompt, "source_prompt", allow_empty=True)
        chosen = null_text.check_method(how.method, source, self.backend)
        self.check_adapters(options.adapters)
        if options.adapters and chosen == "null-text":
            from .errors import InvalidInputError

            raise InvalidInputError(
                "adapters",
                "null-text inversion's gradient steps run without adapters; use ddim or negative-prompt",
            )
        ddim = chosen == "ddim"
        return InversionPlan(
            self.schedules(options.steps),
            chosen,
            "" if ddim else source,
            options.guidance_scale,
            how.null_text_steps,
            how.null_text_epsilon,
        )

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
        ``method="ddim"`` (default): DDIM inversion with prompt "" (Algorithm 2; a ``source_prompt`` is
        refused). ``"null-text"``: conditional-only inversion with ``source_prompt`` and per-step null
        embeddings optimised for ``options.guidance_scale`` (Algorithm 3; torch backend; at most
        ``null_text_steps`` Adam iterations per step, early stop at ``null_text_epsilon``). ``"negative-prompt"``:
        the same inversion with the source prompt's embedding as every step's null embedding (no optimisation).
        """
        options = options or EditOptions()
        plan = self._inversion_plan(
            options, inversion, source_prompt, method, null_text_steps, null_text_epsilon
        )
        run = self.request_run(progress, cancel_check, options.adapters)
        run.check()
        given = load_image(image, max_input_pixels=self.max_input_pixels, formats=self.image_formats)
        pil = prepare_image(given, self.max_side)
        with run.stage("vae_encode"):
            mean = self.backend.encode_image(image_to_tensor(pil))
            z0 = (mean.float() * self.spec.vae_scaling_factor).to(self.backend.device)
        trajectory, nulls, extra = real.invert_latents(self, z0, plan, run)
        method = plan.method
        ddim = method == "ddim"
        return Inversion(
            trajectory=trajectory,
            steps=plan.steps,
            image=pil,
            engine_id=self.engine_id,
            stats=run.stats(
                steps=plan.steps, size=list(pil.size), **({} if ddim else {"method": method}), **extra
            ),
            map_cache_limit=self.map_cache_bytes,
            method=method,
            source_prompt=plan.source_prompt,
            null_embeddings=nulls,
            guidance_scale=None if ddim else plan.guidance,
            original_size=given.size,
            adapters=options.adapters,
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
        target_prompt = self.check_prompt(target_prompt, "target_prompt", allow_empty=False)
        self.check_adapters(options.adapters)
        output_size = check_output_size(output_size, self.max_input_pixels)
        invert_options = given_options(
            inversion=inversion,
            source_prompt=source_prompt,
            method=method,
            null_text_steps=null_text_steps,
            null_text_epsilon=null_text_epsilon,
        )
        if options.blend is not None:  # refused before the inversion runs
            blending.check_words(
                self, options.blend, target_prompt, blending.source_prompt_of(image, invert_options)
            )
        inversion, run = real.inversion_to_edit(self, image, options, invert_options, progress, cancel_check)
        plan = self._plan(options, inversion.latent_hw)
        target_cond = self.text.embed(target_prompt, run)
        blend, words = None, {}
        if options.blend is not None:
            words = blending.check_words(self, options.blend, target_prompt, inversion.source_prompt)
        cross_layers = blending.word_layers(self.spec, inversion.latent_hw) if "source" in words else ()
        source = real.source_branch(self, inversion, plan, run, cross_layers)
        if options.blend is not None:
            blend = blending.start_blend(
                self,
                options.blend,
                plan.steps,
                inversion.latent_hw,
                words,
                source_cross=inversion.source_cross if cross_layers else None,
                pinned=lambda i: inversion.latent(plan.steps - 1 - i),
            )
        program = programs.denoise_target(
            inversion.latent(plan.steps), plan, source.context_at(target_cond), source.maps, blend
        )
        z = self.executor.run(program, run)

        # Decoded one by one: batch size changes convolution rounding, and an edit from a cached
        # inversion must give the same pixels as a fresh one.
        (edited_image,) = self.decode(z, run)
        reconstruction = inversion.reconstruction
        if reconstruction is None:
            (reconstruction,) = self.decode(source.latent, run)
            inversion.keep_reconstruction(reconstruction)
        stats = run.stats(
            **plan.stats(),
            size=list(inversion.size),
            method=inversion.method,
            source_maps_cached=source.cached_steps,
            inversion_bytes=inversion.nbytes,
            **blending.blend_stats(blend),
        )
        # Resized after the statistics: the reconstruction kept on the inversion stays at the working size.
        edited_image = output_image(edited_image, inversion.input_size, output_size)
        reconstruction = output_image(reconstruction, inversion.input_size, output_size)
        stats["output_size"] = list(edited_image.size)
        return EditResult(
            source_image=reconstruction,
            edited_image=edited_image,
            source_latents=source.latent.float().cpu().numpy(),
            edited_latents=z.float().cpu().numpy(),
            options=options,
            stats=stats,
            reconstruction_image=reconstruction,
            inversion=inversion,
            blend_mask=blending.mask_array(blend),
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


def given_options(**options: Any) -> dict[str, Any]:
    """The inversion options a real edit was given (``None``: not given), as :meth:`EditEngine.invert` takes
    them."""
    return {name: value for name, value in options.items() if value is not None}
