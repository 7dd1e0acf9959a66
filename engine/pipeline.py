"""Free-Prompt-Editing, written once above the backend interface (DESIGN §1).

Algorithm 1 (:meth:`EditEngine.edit_generated`): source and target start from the same z_T; in replaced
steps and layers the target's conditional row attends with the source's conditional self-attention map.

Algorithm 2 (:meth:`EditEngine.invert`, :meth:`EditEngine.edit_real`): DDIM-invert the image with prompt "",
then denoise the target from z_T while the source is pinned to the trajectory.

The exact shortcuts of DESIGN §1 are applied here, and only here:

* the source prompt "" needs one UNet row, not two (guidance on identical rows is the identity);
* the first inversion step (t = 0) maps z_0 to itself: no UNet call;
* a real edit's source rows run only for their maps, only inside the window, all at once in a few large
  batches once the trajectory is known, and may stop after the last captured layer;
* those maps depend on the image, the step count and the model, not on the target prompt: they are cached
  on the :class:`Inversion`, so a further edit runs the target branch alone.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .backends.base import Backend
from .contract import ModelSpec
from .errors import InvalidInputError
from .images import (
    DEFAULT_MAX_INPUT_PIXELS,
    DEFAULT_MAX_SIDE,
    ImageInput,
    image_to_tensor,
    load_image,
    prepare_image,
    tensor_to_images,
)
from .maps import AttentionMaps, Injection
from .options import EditOptions
from .results import EditResult, Inversion
from .schedule import DDIMSchedule, ScheduleCache

log = logging.getLogger(__name__)

DEFAULT_MAP_CACHE_BYTES = 4 * 1024**3
TEXT_CACHE_SIZE = 256


@dataclass(frozen=True)
class ProgressEvent:
    """Reported once per UNet step of a stage; a callback that raises stops the work."""

    stage: str  # "inversion", "source_capture", "denoise"
    step: int  # 1-based count of completed steps in this stage
    total: int


ProgressCallback = Callable[[ProgressEvent], None]


class _Run:
    """Per-call bookkeeping: stage wall times (device-synchronized), UNet rows and calls, progress."""

    def __init__(self, backend: Backend, progress: ProgressCallback | None, show_progress: bool) -> None:
        self.backend = backend
        self.stages_ms: dict[str, float] = {}
        self.unet_rows = 0
        self.unet_calls = 0
        self.progress = progress
        self.show_progress = show_progress
        self.started = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.backend.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.backend.synchronize()
            self.stages_ms[name] = self.stages_ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def steps(self, stage: str, total: int) -> Iterator[int]:
        """Yield 0..total-1 with a tqdm bar (when asked) and the progress callback after each step."""
        bar = None
        if self.show_progress and total > 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=stage, unit="step", leave=False)
        try:
            for i in range(total):
                yield i
                if bar is not None:
                    bar.update(1)
                if self.progress is not None:
                    self.progress(ProgressEvent(stage, i + 1, total))
        finally:
            if bar is not None:
                bar.close()

    def stats(self, **extra: Any) -> dict[str, Any]:
        return {
            "unet_rows": self.unet_rows,
            "unet_calls": self.unet_calls,
            "stages_ms": dict(self.stages_ms),
            "total_ms": (time.perf_counter() - self.started) * 1e3,
            **extra,
        }


class EditEngine:
    """Text-guided image editing with FPE over one backend (torch, onnxruntime or tensorrt)."""

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
        self.engine_id = uuid.uuid4().hex
        self._schedules = ScheduleCache(self.spec.scheduler)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_lock = threading.Lock()

    # --- construction ---------------------------------------------------------------------------------------

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
        **engine_kwargs: Any,
    ) -> EditEngine:
        """Load ``model`` for ``backend``.

        torch: ``model`` is a local diffusers-layout SD 1.x folder or ``"tiny"``; onnxruntime: a folder
        written by ``fpedit export``; tensorrt: a folder written by ``fpedit build-engines``. ``dtype``
        (torch) defaults to float16 on CUDA, float32 on the CPU; ``backend_options`` tune the backend
        (torch: ``vae_dtype``, ``cuda_graphs``, ``channels_last``, ``compile_unet``, ``max_batch``).
        """
        from .backends import create_backend

        created, tokenizer, source = create_backend(
            model,
            backend,
            device=device,
            dtype=dtype,
            allow_pickle=allow_pickle,
            providers=providers,
            backend_options=backend_options,
        )
        return cls(created, tokenizer, source=source, **engine_kwargs)

    def info(self) -> dict[str, Any]:
        defaults = EditOptions()
        return {
            "model": self.source,
            **self.backend.describe(),
            "default_image_size": self.spec.default_image_size,
            "max_side": self.max_side,
            "map_cache_bytes": self.map_cache_bytes,
            "defaults": {
                "steps": defaults.steps,
                "guidance_scale": defaults.guidance_scale,
                "replace_window": list(defaults.replace_window),
                "layers": list(defaults.layers),
                "map_format": defaults.map_format,
            },
        }

    # --- text -----------------------------------------------------------------------------------------------

    def _embed(self, prompt: str, run: _Run) -> torch.Tensor:
        """(1, L, D) CLIP embedding of ``prompt``, padded to the tokenizer's max length; cached."""
        with self._text_lock:
            cached = self._text_cache.get(prompt)
            if cached is not None:
                self._text_cache.move_to_end(prompt)
                return cached
        max_len = self.spec.text_max_length
        with run.stage("text"):
            full = self.tokenizer(prompt, truncation=False).input_ids
            if len(full) > max_len:
                message = f"prompt has {len(full)} tokens; truncated to {max_len}: {prompt[:60]!r}"
                warnings.warn(message, stacklevel=3)
                log.warning(message)
            ids = self.tokenizer(
                prompt, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
            ).input_ids
            embedding = self.backend.encode_text(ids)
        with self._text_lock:
            self._text_cache[prompt] = embedding
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return embedding

    # --- UNet calls -----------------------------------------------------------------------------------------

    def _unet(
        self,
        run: _Run,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        *,
        capture: Sequence[int] | None = None,
        map_format: str = "qk",
        inject: Injection | None = None,
        need_noise_pred: bool = True,
        donors: Sequence[int] | None = None,
        donor_layers: Sequence[int] = (),
    ) -> tuple[torch.Tensor | None, AttentionMaps | None]:
        """Run the UNet on rows (``timesteps``: (B,) on the device), in calls of at most ``max_batch`` rows."""
        rows = sample.shape[0]
        limit = self.backend.max_batch
        if rows <= limit or donors is not None:
            noise, captured = self.backend.unet(
                sample,
                timesteps,
                context,
                capture=capture,
                map_format=map_format,
                inject=inject,
                need_noise_pred=need_noise_pred,
                donors=donors,
                donor_layers=donor_layers,
            )
            run.unet_rows += rows
            run.unet_calls += 1
            return (noise.float() if noise is not None else None), captured
        noises: list[torch.Tensor] = []
        maps: list[AttentionMaps] = []
        for lo in range(0, rows, limit):
            hi = min(rows, lo + limit)
            part_inject = None
            if inject is not None:
                part_inject = Injection(inject.maps.rows(range(lo, hi)), inject.gate[lo:hi])
            noise, captured = self.backend.unet(
                sample[lo:hi],
                timesteps[lo:hi],
                context[lo:hi],
                capture=capture,
                map_format=map_format,
                inject=part_inject,
                need_noise_pred=need_noise_pred,
            )
            run.unet_rows += hi - lo
            run.unet_calls += 1
            if noise is not None:
                noises.append(noise.float())
            if captured is not None:
                maps.append(captured)
        noise_all = torch.cat(noises) if noises else None
        maps_all = (maps[0] if len(maps) == 1 else AttentionMaps.cat(maps)) if maps else None
        return noise_all, maps_all

    def _device_timesteps(self, timesteps: Sequence[int]) -> torch.Tensor:
        """All of a schedule's timesteps on the device once, so steps index them without host copies."""
        return torch.tensor(list(timesteps), dtype=torch.float32).to(self.backend.device)

    @staticmethod
    def _guide(noise: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance over (uncond, cond) rows; a single row is its own guidance."""
        if noise.shape[0] == 1:
            return noise
        uncond, cond = noise.chunk(2)
        return uncond + scale * (cond - uncond)

    def _check_request(self, options: EditOptions, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        layers = options.layer_numbers(self.spec, latent_hw)
        if options.replaced_steps() and layers:
            self.backend.check_map_request(layers, options.map_format)
        return layers

    @staticmethod
    def _check_prompt(prompt: Any, field: str, *, allow_empty: bool) -> str:
        if not isinstance(prompt, str):
            raise InvalidInputError(field, f"must be a string, got {type(prompt).__name__}")
        if not allow_empty and not prompt.strip():
            raise InvalidInputError(field, "must not be empty")
        return prompt

    def _decode(self, latents: torch.Tensor, run: _Run) -> list[Image.Image]:
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
    ) -> EditResult:
        """Generate an image from ``source_prompt`` and its edit toward ``target_prompt`` (Algorithm 1).

        z_T is ``latents`` if given, else drawn on the CPU from ``torch.Generator().manual_seed(seed)`` (a
        random seed when none is given; it is reported in ``stats["seed"]``).
        """
        options = options or EditOptions()
        source_prompt = self._check_prompt(source_prompt, "source_prompt", allow_empty=True)
        target_prompt = self._check_prompt(target_prompt, "target_prompt", allow_empty=False)
        z, seed = self._initial_latents(seed, latents, height, width)
        latent_hw = (z.shape[-2], z.shape[-1])
        layers = self._check_request(options, latent_hw)
        schedule = self._schedules(options.steps)
        replaced = set(options.replaced_steps()) if layers else set()
        capture_layers = self.backend.capture_layers(layers) if replaced else ()
        run = _Run(self.backend, progress, self.show_progress)

        uncond = self._embed("", run)
        one_source_row = source_prompt == ""  # its cond and uncond rows would be identical
        src_ctx = uncond if one_source_row else torch.cat([uncond, self._embed(source_prompt, run)])
        tgt_ctx = torch.cat([uncond, self._embed(target_prompt, run)])
        n_src = src_ctx.shape[0]
        src_cond_row = n_src - 1

        z = z.to(self.backend.device)
        z_src, z_tgt = z.clone(), z.clone()
        ts = self._device_timesteps(schedule.timesteps)
        fused = self.backend.supports_donors
        context = torch.cat([src_ctx, tgt_ctx])
        with run.stage("denoise"):
            for i in run.steps("denoise", options.steps):
                t = ts[i : i + 1]
                rows = torch.cat([z_src.expand(n_src, -1, -1, -1), z_tgt.expand(2, -1, -1, -1)])
                if i in replaced and fused:
                    # One call: the target's cond row (last) attends with the source's cond row's map.
                    donors = [*range(n_src + 1), src_cond_row]
                    eps, _ = self._unet(
                        run,
                        rows,
                        t.expand(n_src + 2),
                        context,
                        map_format=options.map_format,
                        donors=donors,
                        donor_layers=layers,
                    )
                elif i in replaced:
                    eps_src, maps = self._unet(
                        run,
                        rows[:n_src],
                        t.expand(n_src),
                        src_ctx,
                        capture=capture_layers,
                        map_format=options.map_format,
                    )
                    assert maps is not None and eps_src is not None
                    inject = Injection.for_rows(
                        maps.rows([src_cond_row, src_cond_row]), [False, True], layers
                    )
                    eps_tgt, _ = self._unet(
                        run, rows[n_src:], t.expand(2), tgt_ctx, map_format=options.map_format, inject=inject
                    )
                    assert eps_tgt is not None
                    eps = torch.cat([eps_src, eps_tgt])
                else:
                    eps, _ = self._unet(run, rows, t.expand(n_src + 2), context)
                assert eps is not None
                guided = torch.cat(
                    [
                        self._guide(eps[:n_src], options.guidance_scale),
                        self._guide(eps[n_src:], options.guidance_scale),
                    ]
                )
                stepped = schedule.step(guided, i, torch.cat([z_src, z_tgt]))
                z_src, z_tgt = stepped[:1], stepped[1:]

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
    ) -> Inversion:
        """DDIM-invert ``image`` with prompt "" over ``options.steps`` steps; keep the whole trajectory."""
        options = options or EditOptions()
        pil = prepare_image(
            load_image(image, max_input_pixels=self.max_input_pixels, formats=self.image_formats),
            self.max_side,
        )
        schedule = self._schedules(options.steps)
        run = _Run(self.backend, progress, self.show_progress)
        with run.stage("vae_encode"):
            mean = self.backend.encode_image(image_to_tensor(pil))
            z0 = (mean.float() * self.spec.vae_scaling_factor).to(self.backend.device)
        uncond = self._embed("", run)
        trajectory = self._invert_latents(z0, schedule, uncond, run)
        stats = run.stats(steps=options.steps, size=list(pil.size))
        return Inversion(
            trajectory=trajectory,
            steps=options.steps,
            image=pil,
            engine_id=self.engine_id,
            stats=stats,
            map_cache_limit=self.map_cache_bytes,
        )

    def _invert_latents(
        self, z0: torch.Tensor, schedule: DDIMSchedule, uncond: torch.Tensor, run: _Run
    ) -> torch.Tensor:
        steps = schedule.steps
        trajectory = torch.empty((steps + 1, *z0.shape[1:]), dtype=torch.float32, device=z0.device)
        trajectory[0] = z0[0]
        trajectory[1] = z0[0]  # the t = 0 step maps z_0 to itself (alpha_t == alpha_next)
        z = z0
        ts = self._device_timesteps(schedule.inversion_timesteps)
        with run.stage("inversion"):
            for k in run.steps("inversion", steps - 1):
                k += 1
                eps, _ = self._unet(run, z, ts[k : k + 1], uncond)
                assert eps is not None
                z = schedule.invert_step(eps, k, z)
                trajectory[k + 1] = z[0]
        return trajectory

    def edit_real(
        self,
        image: ImageInput | Inversion,
        target_prompt: str,
        *,
        options: EditOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> EditResult:
        """Edit a real image (or an :class:`Inversion` of one) toward ``target_prompt`` (Algorithm 2)."""
        options = options or EditOptions()
        target_prompt = self._check_prompt(target_prompt, "target_prompt", allow_empty=False)
        if isinstance(image, Inversion):
            inversion, invert_stats = image, None
            self._check_inversion(inversion, options)
        else:
            inversion = self.invert(image, options=options, progress=progress)
            invert_stats = inversion.stats
        latent_hw = inversion.latent_hw
        layers = self._check_request(options, latent_hw)
        schedule = self._schedules(options.steps)
        replaced = sorted(options.replaced_steps()) if layers else []
        run = _Run(self.backend, progress, self.show_progress)

        uncond = self._embed("", run)
        context = torch.cat([uncond, self._embed(target_prompt, run)])
        feed = _SourceMapFeed(self, inversion, schedule, replaced, layers, options.map_format, uncond, run)
        n = options.steps
        z = inversion.latent(n).clone()
        ts = self._device_timesteps(schedule.timesteps)
        with run.stage("target_denoise"):
            for i in run.steps("denoise", n):
                inject = None
                if feed.replaces(i):
                    maps = feed.get(i)
                    inject = Injection.for_rows(maps.rows([0, 0]), [False, True], layers)
                eps, _ = self._unet(
                    run,
                    z.expand(2, -1, -1, -1),
                    ts[i : i + 1].expand(2),
                    context,
                    map_format=options.map_format,
                    inject=inject,
                )
                assert eps is not None
                z = schedule.step(self._guide(eps, options.guidance_scale), i, z)
        # Source capture ran inside the loop (lazily, in batches): report the target's own time.
        run.stages_ms["target_denoise"] -= run.stages_ms.get("source_capture", 0.0)

        with inversion.lock:
            reconstruction = inversion._reconstruction
        # Decoded one by one: batch size changes convolution rounding, and an edit from a cached
        # inversion must give the same pixels as a fresh one.
        (edited_image,) = self._decode(z, run)
        if reconstruction is None:
            (reconstruction,) = self._decode(inversion.latent(0), run)
            with inversion.lock:
                inversion._reconstruction = reconstruction

        stats = run.stats(
            steps=n,
            replaced_steps=replaced,
            layers=list(layers),
            map_format=options.map_format,
            size=list(inversion.size),
            source_maps_cached=feed.cached_hits,
            inversion_bytes=inversion.nbytes,
        )
        if invert_stats is not None:  # one call did both: report the whole real edit
            stats["unet_rows"] += invert_stats["unet_rows"]
            stats["unet_calls"] += invert_stats["unet_calls"]
            stats["total_ms"] += invert_stats["total_ms"]
            for name, ms in invert_stats["stages_ms"].items():
                stats["stages_ms"][name] = stats["stages_ms"].get(name, 0.0) + ms
        return EditResult(
            source_image=reconstruction,
            edited_image=edited_image,
            source_latents=inversion.latent(0).float().cpu().numpy(),
            edited_latents=z.float().cpu().numpy(),
            options=options,
            stats=stats,
            reconstruction_image=reconstruction,
            inversion=inversion,
        )

    def _check_inversion(self, inversion: Inversion, options: EditOptions) -> None:
        if inversion.engine_id != self.engine_id:
            raise InvalidInputError("inversion", "was computed by another engine (model or backend)")
        if inversion.steps != options.steps:
            raise InvalidInputError(
                "steps",
                f"the inversion was computed with {inversion.steps} steps, the request asks {options.steps}",
            )


class _SourceMapFeed:
    """Serves the source's maps for each replaced step of a real edit.

    Cached maps on the inversion are used as they are. Missing steps are captured in batches of up to
    ``capture_batch`` rows (step i's source row is ``traj[N - i]`` at ``t_i`` with prompt ""), and kept on the
    inversion when they fit its budget; otherwise only one batch is held at a time.
    """

    def __init__(
        self,
        engine: EditEngine,
        inversion: Inversion,
        schedule: DDIMSchedule,
        replaced: Sequence[int],
        layers: Sequence[int],
        map_format: str,
        uncond: torch.Tensor,
        run: _Run,
    ) -> None:
        self.engine, self.inversion, self.schedule = engine, inversion, schedule
        self.replaced = list(replaced)
        self._replaced_set = set(replaced)
        self.layers = frozenset(layers)
        self.capture_layers = engine.backend.capture_layers(layers)
        self.map_format = map_format
        self.uncond, self.run = uncond, run
        with inversion.lock:
            cached = inversion.cached_maps(map_format, self.layers)
            #: Replaced steps whose maps an earlier edit had already left on the inversion.
            self.cached_hits = sum(1 for s in replaced if s in cached)
        self._batch: dict[int, AttentionMaps] = {}
        self._keep = self._fits_cache()
        self._captured = 0

    def replaces(self, i: int) -> bool:
        return i in self._replaced_set

    def _fits_cache(self) -> bool:
        spec, (h, w) = self.engine.spec, self.inversion.latent_hw
        per_step = (
            sum(
                int(np.prod(spec.layer(layer).map_shape(self.map_format, 1, h, w)))
                for layer in self.capture_layers
            )
            * torch.empty((), dtype=self.engine.backend.dtype).element_size()
        )
        return per_step * len(self.replaced) <= self.inversion.map_cache_limit

    def get(self, i: int) -> AttentionMaps:
        with self.inversion.lock:
            cached = self.inversion.cached_maps(self.map_format, self.layers).get(i)
        if cached is not None:
            return cached
        if i not in self._batch:
            self._capture_from(i)
        return self._batch[i]

    def _capture_from(self, i: int) -> None:
        """Capture step i and the next missing replaced steps, up to one batch."""
        with self.inversion.lock:
            cached = self.inversion.cached_maps(self.map_format, self.layers)
            pending = [s for s in self.replaced if s >= i and s not in cached]
        chunk = pending[: self.engine.capture_batch] if not self._keep else pending
        n = self.schedule.steps
        run = self.run
        batch: dict[int, AttentionMaps] = {}
        with run.stage("source_capture"):
            for lo in range(0, len(chunk), self.engine.capture_batch):
                part = chunk[lo : lo + self.engine.capture_batch]
                sample = torch.cat([self.inversion.latent(n - s) for s in part])
                timesteps = self.engine._device_timesteps([self.schedule.timesteps[s] for s in part])
                context = self.uncond.expand(len(part), -1, -1)
                _, maps = self.engine._unet(
                    run,
                    sample,
                    timesteps,
                    context,
                    capture=self.capture_layers,
                    map_format=self.map_format,
                    need_noise_pred=False,
                )
                assert maps is not None
                for j, s in enumerate(part):
                    batch[s] = AttentionMaps(
                        maps.format, {layer: t[j : j + 1] for layer, t in maps.tensors.items()}
                    )
                self._captured += len(part)
                if run.progress is not None:
                    run.progress(ProgressEvent("source_capture", self._captured, len(self.replaced)))
        if self._keep:
            with self.inversion.lock:
                self._keep = self.inversion.store_maps(self.map_format, frozenset(self.capture_layers), batch)
        self._batch = batch
