"""Null-text inversion (Mokady et al.), the optimisation behind Algorithm 3 (docs/design.md, issue 13).

For each denoising step i (0 = noisiest) the unconditional ("null") text embedding is tuned with Adam so
that one guided DDIM step from the current latent lands on the image's conditional-inversion trajectory
point z_{N-i-1}. The loop follows the authors' notebook exactly (learning rate ``1e-2 * (1 - i/100)``, at most
``inner_steps`` iterations, early stop once the loss is below ``epsilon + i * 2e-5``, warm start from the
previous step's embedding), with two exact savings:

* the conditional noise prediction is computed once per step, without gradients (as the authors do), and
  reused for the advance after the optimisation, which then needs the unconditional row alone;
* gradients flow to the embedding only (``torch.autograd.grad``), never into the frozen UNet weights.

Gradients are switched on only inside :func:`optimize_null_embeddings`, in float32, even when the engine
serves an fp16 UNet (:func:`float32_unet` keeps one float32 copy per module), and no autograd state leaks:
the result is detached and grad mode is restored on exit.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import programs
from .backends.base import Backend
from .calls import UNetCall
from .errors import InvalidInputError
from .executor import ProgressEvent, RequestRun
from .maps import AttentionMaps, Injection
from .options import EditOptions
from .programs import Program, Step, guide, rows_of
from .results import EditResult, Inversion
from .schedule import DDIMSchedule

if TYPE_CHECKING:
    from .pipeline import EditEngine

DEFAULT_INNER_STEPS = 10
DEFAULT_EPSILON = 1e-5
MAX_INNER_STEPS = 100
#: Inversion methods: Algorithm 2's DDIM inversion with "", null-text inversion (Algorithm 3), and
#: negative-prompt inversion (Algorithm 3's edit with the source prompt as every step's null embedding).
METHODS = ("ddim", "null-text", "negative-prompt")

_float32_copies: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()
_copies_lock = threading.Lock()


@dataclass(frozen=True)
class DenoiseStep:
    """One DDIM denoising step: timestep t, cumulative alpha at t and at the step's target level."""

    timestep: int
    alpha: float
    alpha_prev: float

    def apply(self, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta 0) from ``timestep`` to the next lower level."""
        x0 = (z - math.sqrt(1.0 - self.alpha) * eps) / math.sqrt(self.alpha)
        return math.sqrt(self.alpha_prev) * x0 + math.sqrt(1.0 - self.alpha_prev) * eps


@dataclass
class NullTextResult:
    """The optimised embeddings and what they cost."""

    embeddings: torch.Tensor  # (steps, L, D) float32, detached
    iterations: list[int] = field(default_factory=list)  # Adam iterations per step
    final_losses: list[float] = field(default_factory=list)  # last loss seen per step
    unet_forwards: int = 0  # UNet rows evaluated (with and without gradients)
    unet_backwards: int = 0  # rows back-propagated

    @property
    def total_iterations(self) -> int:
        return sum(self.iterations)


def check_null_text_options(inner_steps: object, epsilon: object) -> tuple[int, float]:
    """Validate ``null_text_steps`` and ``null_text_epsilon`` (names as the user sees them)."""
    if (
        isinstance(inner_steps, bool)
        or not isinstance(inner_steps, int)
        or not 1 <= inner_steps <= MAX_INNER_STEPS
    ):
        raise InvalidInputError(
            "null_text_steps", f"must be an integer in 1..{MAX_INNER_STEPS}, got {inner_steps!r}"
        )
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not math.isfinite(epsilon)
        or epsilon < 0
    ):
        raise InvalidInputError("null_text_epsilon", f"must be a finite number >= 0, got {epsilon!r}")
    return inner_steps, float(epsilon)


def float32_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` itself when it is float32, else one frozen float32 copy made on first use and kept.

    The optimisation needs float32 gradients (fp16 ones underflow in the embedding's Adam moments); serving
    stays in the backend's dtype, so the copy costs the UNet's float32 size once per engine.
    """
    if next(unet.parameters()).dtype == torch.float32:
        return unet
    with _copies_lock:
        copy32 = _float32_copies.get(unet)
        if copy32 is None:
            copy32 = copy.deepcopy(unet).to(torch.float32).eval().requires_grad_(False)
            _float32_copies[unet] = copy32
        return copy32


def optimize_null_embeddings(
    unet: torch.nn.Module,
    trajectory: torch.Tensor,
    cond: torch.Tensor,
    null_init: torch.Tensor,
    guidance: float,
    schedule: Sequence[DenoiseStep],
    *,
    inner_steps: int = DEFAULT_INNER_STEPS,
    epsilon: float = DEFAULT_EPSILON,
    progress: Callable[[int, int], None] | None = None,
    cancel_check: Callable[[], None] | None = None,
) -> NullTextResult:
    """Optimise one null embedding per denoising step (the authors' loop; see the module docstring).

    ``unet`` is a float32 diffusers UNet (any attention processors that run without per-call state);
    ``trajectory`` is (N+1, C, h, w) with ``trajectory[k] = z_k`` from the conditional-only inversion;
    ``cond`` and ``null_init`` are (1, L, D) (the source prompt's and ""'s embeddings); ``schedule`` holds the N
    denoising steps, noisiest first. ``progress(done, N)`` is called after each step; ``cancel_check()`` is
    called before every Adam iteration, and whatever it raises (a deadline, a client gone) stops the work.
    """
    steps = len(schedule)
    if trajectory.shape[0] != steps + 1:
        raise ValueError(f"trajectory has {trajectory.shape[0]} latents for {steps} steps")
    weights = next(unet.parameters())
    device, dtype = weights.device, weights.dtype
    if dtype != torch.float32:
        raise ValueError(f"the null-text optimisation needs a float32 UNet, got {dtype}")
    result = NullTextResult(embeddings=torch.empty(0))

    def predict(z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        result.unet_forwards += z.shape[0]
        return unet(z, t, encoder_hidden_states=context, return_dict=False)[0]

    # inference_mode(False): inputs made under inference mode cannot be saved for backward, so work on
    # ordinary copies; enable_grad: the caller may run under no_grad.
    with torch.inference_mode(False), torch.enable_grad():
        traj = trajectory.detach().to(device, torch.float32).clone()
        cond = cond.detach().to(device, torch.float32).clone()
        null = null_init.detach().to(device, torch.float32).clone()
        z = traj[steps : steps + 1]
        nulls = torch.empty((steps, *null.shape[1:]), dtype=torch.float32, device=device)
        for i, step in enumerate(schedule):
            t = torch.full((1,), float(step.timestep), device=device)
            with torch.no_grad():
                eps_c = predict(z, t, cond)
            goal = traj[steps - i - 1 : steps - i]
            param = null.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([param], lr=1e-2 * (1.0 - i / 100.0))
            done, loss_value = 0, math.nan
            for _ in range(inner_steps):
                if cancel_check is not None:
                    cancel_check()
                eps_u = predict(z, t, param)
                loss = F.mse_loss(step.apply(z, eps_u + guidance * (eps_c - eps_u)), goal)
                (param.grad,) = torch.autograd.grad(loss, [param])
                result.unet_backwards += 1
                optimizer.step()
                done += 1
                loss_value = loss.item()
                if loss_value < epsilon + i * 2e-5:
                    break
            null = param.detach()
            del optimizer, param
            nulls[i] = null[0]
            result.iterations.append(done)
            result.final_losses.append(loss_value)
            with torch.no_grad():
                eps_u = predict(z, t, null)
                z = step.apply(z, eps_u + guidance * (eps_c - eps_u))
            if progress is not None:
                progress(i + 1, steps)
    result.embeddings = nulls.detach()
    return result


def denoise_steps(schedule: DDIMSchedule) -> list[DenoiseStep]:
    """The N denoising steps of an engine schedule, noisiest first, with their cumulative alphas."""
    sampler = schedule._sampler  # diffusers' DDIMScheduler with the reference settings
    r = sampler.config.num_train_timesteps // schedule.steps
    alphas = sampler.alphas_cumprod
    final = float(sampler.final_alpha_cumprod)
    return [
        DenoiseStep(t, float(alphas[t]), float(alphas[t - r]) if t - r >= 0 else final)
        for t in schedule.timesteps
    ]


# --- Algorithm 3's edit as step programs ----------------------------------------------------------------
#
# The source branch does not depend on the target prompt: it runs once (:func:`generate_source`) and its maps
# can be kept on the inversion, so an edit is the source program (first edit only) and the target program
# (:func:`denoise_target`). Source and target never share a call, so a re-edit equals a fresh edit exactly.


def _null(nulls: torch.Tensor | None, source_cond: torch.Tensor, i: int) -> torch.Tensor:
    """Step i's null embedding: optimised (null-text) or the source prompt's (negative-prompt)."""
    return source_cond if nulls is None else nulls[i : i + 1]


def generate_source(
    z_T: torch.Tensor,
    schedule: DDIMSchedule,
    source_cond: torch.Tensor,
    nulls: torch.Tensor | None,
    replaced: Sequence[int],
    capture_layers: Sequence[int],
    map_format: str,
    guidance: float,
) -> Program[tuple[torch.Tensor, dict[int, AttentionMaps]]]:
    """The source branch, generated from ``z_T`` with the source prompt and step i's null embedding
    (``nulls[i]``; the source prompt's own embedding when ``nulls`` is None, where the two rows are identical
    and one is run). Captures the conditional row's maps in ``replaced`` steps. Returns (z_0, maps)."""
    ts = schedule.timestep_tensor(z_T.device)
    n = schedule.steps
    replaced = set(replaced)
    maps: dict[int, AttentionMaps] = {}
    z = z_T
    for i in range(n):
        context = source_cond if nulls is None else torch.cat([nulls[i : i + 1], source_cond])
        rows = context.shape[0]
        capture = tuple(capture_layers) if i in replaced else ()
        call = UNetCall(rows_of(z, rows), ts[i : i + 1].expand(rows), context, map_format, capture)
        result = yield Step("source_generate", i + 1, n, call)
        if capture:
            assert result.maps is not None
            # A copy of the conditional row: a view would keep a whole (maybe merged) batch alive.
            maps[i] = AttentionMaps(
                result.maps.format, {k: t[rows - 1 : rows].clone() for k, t in result.maps.tensors.items()}
            )
        z = schedule.step(guide(result.noise, guidance), i, z)
    return z, maps


def denoise_target(
    z_T: torch.Tensor,
    schedule: DDIMSchedule,
    source_cond: torch.Tensor,
    target_cond: torch.Tensor,
    nulls: torch.Tensor | None,
    source_maps: dict[int, AttentionMaps],
    layers: Sequence[int],
    map_format: str,
    guidance: float,
) -> Program[torch.Tensor]:
    """The target branch from ``z_T``: rows (step i's null, target prompt); in every step of
    ``source_maps`` the conditional row attends with the source's map in ``layers``. Returns z_0."""
    ts = schedule.timestep_tensor(z_T.device)
    n = schedule.steps
    z = z_T
    for i in range(n):
        inject = None
        if i in source_maps:
            inject = Injection.for_rows(source_maps[i].rows([0, 0]), [False, True], layers)
        context = torch.cat([_null(nulls, source_cond, i), target_cond])
        call = UNetCall(rows_of(z, 2), ts[i : i + 1].expand(2), context, map_format, inject=inject)
        result = yield Step("target_denoise", i + 1, n, call, progress="denoise")
        z = schedule.step(guide(result.noise, guidance), i, z)
    return z


# --- the engine's entry points (called by EditEngine.invert and EditEngine.edit_real) -----------------------


def check_method(method: object, source_prompt: str, backend: Backend) -> str:
    """Refuse an unknown method, a method that needs a source prompt without one, and null-text inversion
    where there are no gradients, before any work starts."""
    if method not in METHODS:
        raise InvalidInputError("method", f"must be one of {list(METHODS)}, got {method!r}")
    if method != "ddim" and not source_prompt.strip():
        raise InvalidInputError(
            "source_prompt", f"must describe the image: inversion method {method!r} needs one"
        )
    if method == "null-text" and backend.name != "torch":
        raise InvalidInputError(
            "method",
            f"null-text inversion needs gradients, which the {backend.name} backend does not have: use the "
            "torch backend, or 'negative-prompt' (no optimisation) here",
        )
    return str(method)


def _optimisable_unet(backend: Backend) -> torch.nn.Module:
    """The torch backend's UNet in float32 (the serving module, or its kept float32 copy)."""
    module = getattr(backend, "_unet", None)
    if not isinstance(module, torch.nn.Module):
        raise InvalidInputError("method", f"null-text inversion needs the torch backend, not {backend.name}")
    return float32_unet(module)


def invert_with_source_prompt(
    engine: EditEngine,
    z0: torch.Tensor,
    schedule: DDIMSchedule,
    guidance: float,
    source_prompt: str,
    method: str,
    inner_steps: int,
    epsilon: float,
    run: RequestRun,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Conditional-only DDIM inversion with the source prompt, then (null-text) the per-step null embeddings,
    or (negative-prompt) the source prompt's embedding for every step. Returns (trajectory, nulls as float32
    (steps, L, D), statistics)."""
    cond = engine._embed(source_prompt, run)
    # One conditional row per step: guidance on a single row is the identity, which is the authors' unguided
    # inversion; the t = 0 step is skipped as for Algorithm 2.
    trajectory = engine.executor.run(programs.invert(z0, schedule, cond), run)
    steps = schedule.steps
    if method == "negative-prompt":
        nulls = cond.float().expand(steps, -1, -1).contiguous()
        return trajectory, nulls, {}
    unet = _optimisable_unet(engine.backend)
    null_init = engine._embed("", run)

    def progress(done: int, total: int) -> None:
        if run.progress is not None:
            run.progress(ProgressEvent("null_text", done, total))

    with run.stage("null_text"):
        result = optimize_null_embeddings(
            unet,
            trajectory,
            cond,
            null_init,
            guidance,
            denoise_steps(schedule),
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


def edit_with_nulls(
    engine: EditEngine,
    inversion: Inversion,
    target_prompt: str,
    options: EditOptions,
    run: RequestRun,
) -> EditResult:
    """Algorithm 3 on a null-text or negative-prompt inversion: the source branch (generated once, its maps
    kept on the inversion within its budget), then the target branch."""
    if inversion.method == "null-text" and inversion.guidance_scale != options.guidance_scale:
        raise InvalidInputError(
            "guidance_scale",
            f"the null-text inversion was optimised for guidance {inversion.guidance_scale}; the edit must use "
            f"it (got {options.guidance_scale}), or invert again",
        )
    layers = engine._check_request(options, inversion.latent_hw)
    schedule = engine._schedules(options.steps)
    replaced = list(options.replaced_steps()) if layers else []
    source_cond = engine._embed(inversion.source_prompt, run)
    target_cond = engine._embed(target_prompt, run)
    nulls = None
    if inversion.method == "null-text":
        assert inversion.null_embeddings is not None
        nulls = inversion.null_embeddings.to(source_cond.device, source_cond.dtype)
    z_T = inversion.latent(options.steps)

    cached = inversion.cached_maps(options.map_format, frozenset(layers))
    source_latent = inversion.source_latent
    have_source = source_latent is not None and all(i in cached for i in replaced)
    if have_source:
        source_maps = {i: cached[i] for i in replaced}
    else:
        capture_layers = engine.backend.capture_layers(layers)
        program = generate_source(
            z_T,
            schedule,
            source_cond,
            nulls,
            replaced,
            capture_layers,
            options.map_format,
            options.guidance_scale,
        )
        source_latent, source_maps = engine.executor.run(program, run)
        inversion.keep_source(source_latent)
        inversion.store_maps(options.map_format, frozenset(capture_layers), source_maps)
    program = denoise_target(
        z_T,
        schedule,
        source_cond,
        target_cond,
        nulls,
        source_maps,
        layers,
        options.map_format,
        options.guidance_scale,
    )
    z = engine.executor.run(program, run)

    (edited_image,) = engine._decode(z, run)
    reconstruction = inversion.reconstruction
    if reconstruction is None:
        (reconstruction,) = engine._decode(source_latent, run)
        inversion.keep_reconstruction(reconstruction)
    stats = run.stats(
        steps=options.steps,
        replaced_steps=replaced,
        layers=list(layers),
        map_format=options.map_format,
        size=list(inversion.size),
        method=inversion.method,
        source_maps_cached=len(replaced) if have_source else 0,
        inversion_bytes=inversion.nbytes,
    )
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
