"""Real images: how they are inverted and where a real edit's source branch comes from.

Algorithm 2 inverts with "" and pins the source to the trajectory: its maps are captured from the trajectory
(:func:`~.programs.capture_source_maps`). Algorithm 3 inverts conditionally with the source prompt, then
optimises one null embedding per step (null-text) or takes the source prompt's own (negative-prompt), and
generates the source from z_T (:func:`~.programs.generate_source`). Either way the source does not depend on
the target prompt, so what it produced is left on the :class:`~.results.Inversion` for the next edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import null_text, programs
from .adapters import describe_set
from .backends.capture import CAPTURE_GATE
from .errors import InvalidInputError
from .executor import CancelCheck, ProgressCallback, ProgressEvent, RequestRun
from .maps import AttentionMaps
from .options import EditOptions, refuse_inversion_options
from .plan import EditPlan, InversionPlan, check_layers
from .results import Inversion

if TYPE_CHECKING:  # pragma: no cover
    from .images import ImageInput
    from .pipeline import EditEngine


@dataclass(frozen=True)
class Source:
    """A real edit's source branch: its final latent (the reconstruction's), the replaced steps' maps, how
    many of those came from the inversion's cache, and the unconditional rows the target shares with it (one
    embedding for every step, or one per step: null-text's optimised nulls)."""

    latent: torch.Tensor
    maps: dict[int, AttentionMaps]
    cached_steps: int
    uncond: torch.Tensor

    def context_at(self, target_cond: torch.Tensor) -> Callable[[int], torch.Tensor]:
        """The target's (uncond, cond) rows at step i."""
        if self.uncond.shape[0] == 1:
            context = torch.cat([self.uncond, target_cond])
            return lambda i: context
        return lambda i: torch.cat([self.uncond[i : i + 1], target_cond])


def inversion_to_edit(
    engine: EditEngine,
    image: ImageInput | Inversion,
    options: EditOptions,
    invert_options: dict[str, Any],
    progress: ProgressCallback | None,
    cancel_check: CancelCheck | None,
) -> tuple[Inversion, RequestRun]:
    """The inversion a real edit starts from (``image`` inverted now, or checked against the request) and
    the edit's run, which counts a fresh inversion's work too."""
    if isinstance(image, Inversion):
        check_reuse(engine, image, options, invert_options)
        return image, engine.request_run(progress, cancel_check, options.adapters)
    if options.layers != "resolution":  # that preset needs the image's size; others are checked now,
        check_layers(options, engine.backend, None)  # before the inversion, not after it ran for nothing
    inversion = engine.invert(
        image, options=options, progress=progress, cancel_check=cancel_check, **invert_options
    )
    # Started after the inversion, which absorb() prepends: its time is counted once, not twice.
    run = engine.request_run(progress, cancel_check, options.adapters)
    run.absorb(inversion.stats)  # one call did both: report the whole real edit
    return inversion, run


def check_reuse(
    engine: EditEngine, inversion: Inversion, options: EditOptions, invert_options: dict[str, Any]
) -> None:
    """Refuse an edit of an existing ``inversion`` that this request cannot make: inversion options given
    again, another engine's, another step count, adapter set or (null-text) guidance."""
    refuse_inversion_options(list(invert_options))
    check_inversion(inversion, options, engine.engine_id)
    check_edit_guidance(inversion, options)


def check_inversion(inversion: Inversion, options: EditOptions, engine_id: str) -> None:
    """Refuse an inversion this request cannot use: another engine's, or another step count's."""
    if inversion.engine_id != engine_id:
        raise InvalidInputError("inversion", "was computed by another engine (model or backend)")
    if inversion.steps != options.steps:
        raise InvalidInputError(
            "steps",
            f"the inversion was computed with {inversion.steps} steps, the request asks {options.steps}",
        )
    if inversion.adapters != options.adapters:  # its trajectory and source maps depend on the weights
        raise InvalidInputError(
            "adapters",
            f"the inversion was made with adapters {describe_set(inversion.adapters)}; the request asks "
            f"{describe_set(options.adapters)} (invert the image again under them)",
        )


def check_edit_guidance(inversion: Inversion, options: EditOptions) -> None:
    """Refuse to edit null-text embeddings with another guidance scale than they were optimised for."""
    if inversion.method == "null-text" and inversion.guidance_scale != options.guidance_scale:
        raise InvalidInputError(
            "guidance_scale",
            f"the null-text inversion was optimised for guidance {inversion.guidance_scale}; the edit must "
            f"use it (got {options.guidance_scale}), or invert again",
        )


def source_branch(
    engine: EditEngine,
    inversion: Inversion,
    plan: EditPlan,
    run: RequestRun,
    cross_layers: tuple[int, ...] = (),
) -> Source:
    """The source of an edit of ``inversion`` under ``plan``: what an earlier edit left on the inversion, the
    rest computed now and left there (maps within the inversion's budget). ``cross_layers`` (a word blend of
    an Algorithm 3 edit) also needs the generated source's cross-attention, kept as ``source_cross``."""
    if inversion.method == "ddim":  # Algorithm 2: the source is pinned to the trajectory
        uncond = engine.text.embed("", run)
        maps, cached = _pinned_source_maps(engine, inversion, plan, uncond, run)
        return Source(inversion.latent(0), maps, cached, uncond)
    # Algorithm 3: generated with the source prompt and step i's null embedding (negative-prompt: the source
    # prompt's own, so its two rows are one).
    source_cond = engine.text.embed(inversion.source_prompt, run)
    nulls = None
    if inversion.method == "null-text":
        assert inversion.null_embeddings is not None
        nulls = inversion.null_embeddings.to(source_cond.device, source_cond.dtype)
    uncond = source_cond if nulls is None else nulls
    cached = inversion.cached_maps(plan.map_format, frozenset(plan.layers))
    latent = inversion.source_latent
    need_cross = bool(cross_layers) and inversion.source_cross is None
    if latent is not None and all(i in cached for i in plan.replaced) and not need_cross:
        return Source(latent, {i: cached[i] for i in plan.replaced}, len(plan.replaced), uncond)
    cross: list[torch.Tensor] = []
    program = programs.generate_source(
        inversion.latent(plan.steps), plan, source_cond, nulls, cross_layers if need_cross else (), cross
    )
    latent, maps = engine.executor.run(program, run)
    inversion.keep_source(latent)
    if need_cross:
        inversion.keep_source_cross(cross)
    inversion.store_maps(plan.map_format, frozenset(plan.capture_layers), maps)
    return Source(latent, maps, 0, uncond)


def _pinned_source_maps(
    engine: EditEngine, inversion: Inversion, plan: EditPlan, uncond: torch.Tensor, run: RequestRun
) -> tuple[dict[int, AttentionMaps], int]:
    """Algorithm 2's source maps for every replaced step: those an earlier edit left on the inversion, the
    rest captured from the trajectory in batches of ``engine.capture_batch`` rows. Returns the maps and how
    many steps came from the cache."""
    cached = inversion.cached_maps(plan.map_format, frozenset(plan.layers))
    missing = [i for i in plan.replaced if i not in cached]
    maps = {i: cached[i] for i in plan.replaced if i in cached}
    if missing:
        program = programs.capture_source_maps(
            inversion.trajectory, plan, missing, uncond, engine.capture_batch
        )
        captured = engine.executor.run(program, run)
        inversion.store_maps(plan.map_format, frozenset(plan.capture_layers), captured)
        maps.update(captured)
    return maps, len(plan.replaced) - len(missing)


def invert_latents(
    engine: EditEngine, z0: torch.Tensor, plan: InversionPlan, run: RequestRun
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Invert the encoded image ``z0`` as ``plan`` says. Returns (trajectory, the per-step null embeddings as
    float32 (steps, L, D) or ``None`` for "ddim", statistics of the optimisation)."""
    if plan.method == "ddim":
        uncond = engine.text.embed("", run)
        return engine.executor.run(programs.invert(z0, plan.schedule, uncond), run), None, {}
    # One conditional row per step: guidance on a single row is the identity, which is the authors' unguided
    # inversion; the t = 0 step is skipped as for Algorithm 2.
    cond = engine.text.embed(plan.source_prompt, run)
    trajectory = engine.executor.run(programs.invert(z0, plan.schedule, cond), run)
    if plan.method == "negative-prompt":
        return trajectory, cond.float().expand(plan.steps, -1, -1).contiguous(), {}
    null_init = engine.text.embed("", run)

    def progress(done: int, total: int) -> None:
        if run.progress is not None:
            run.progress(ProgressEvent("null_text", done, total))

    unet = engine.backend.differentiable_unet()
    assert plan.null_text_steps is not None and plan.null_text_epsilon is not None  # null-text's own
    assert unet is not None  # null_text.check_method refused the method where there is none
    # Gradient work on the device outside the backend's entry points: never beside a graph capture (the gate
    # is held per iteration, so a capture waits one iteration, not the whole optimisation).
    with run.stage("null_text"):
        result = null_text.optimize_null_embeddings(
            unet,
            trajectory,
            cond,
            null_init,
            plan.guidance,
            null_text.denoise_steps(plan.schedule),
            inner_steps=plan.null_text_steps,
            epsilon=plan.null_text_epsilon,
            progress=progress,
            cancel_check=run.check,
            device_section=CAPTURE_GATE.shared,
        )
    run.count_unet(result.unet_forwards, calls=0)  # not backend calls: the gradient path runs the module
    stats = {
        "null_text_iterations": result.total_iterations,
        "unet_backward_rows": result.unet_backwards,
        "null_text_final_loss": result.final_losses[-1] if result.final_losses else None,
    }
    return trajectory, result.embeddings, stats
