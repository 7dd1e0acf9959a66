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
serves an fp16 UNet (the backend's :meth:`~.backends.base.Backend.differentiable_unet` is a float32 copy
then), and no autograd state leaks: the result is detached and grad mode is restored on exit. The DDIM step
it differentiates through is the engine's one formula, :func:`.schedule.ddim_move`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .backends.base import Backend
from .errors import InvalidInputError
from .options import DEFAULT_NULL_TEXT_EPSILON, DEFAULT_NULL_TEXT_STEPS, check_inversion_method
from .schedule import DDIMSchedule, ddim_move


@dataclass(frozen=True)
class DenoiseStep:
    """One DDIM denoising step: timestep t, cumulative alpha at t and at the step's target level, and what the
    UNet predicts (``epsilon`` or ``v_prediction``)."""

    timestep: int
    alpha: float
    alpha_prev: float
    prediction_type: str = "epsilon"

    def apply(self, z: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta 0) from ``timestep`` to the next lower level (differentiable)."""
        return ddim_move(z, prediction, self.alpha, self.alpha_prev, self.prediction_type)


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


def optimize_null_embeddings(
    unet: torch.nn.Module,
    trajectory: torch.Tensor,
    cond: torch.Tensor,
    null_init: torch.Tensor,
    guidance: float,
    schedule: Sequence[DenoiseStep],
    *,
    inner_steps: int = DEFAULT_NULL_TEXT_STEPS,
    epsilon: float = DEFAULT_NULL_TEXT_EPSILON,
    progress: Callable[[int, int], None] | None = None,
    cancel_check: Callable[[], None] | None = None,
    device_section: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> NullTextResult:
    """Optimise one null embedding per denoising step (the authors' loop; see the module docstring).

    ``unet`` is a float32 diffusers UNet (any attention processors that run without per-call state);
    ``trajectory`` is (N+1, C, h, w) with ``trajectory[k] = z_k`` from the conditional-only inversion;
    ``cond`` and ``null_init`` are (1, L, D) (the source prompt's and ""'s embeddings); ``schedule`` holds the N
    denoising steps, noisiest first. ``progress(done, N)`` is called after each step; ``cancel_check()`` is
    called before every Adam iteration, and whatever it raises (a deadline, a client gone) stops the work.
    ``device_section()`` is entered around each forward/backward iteration (the engine passes the capture
    gate's shared section: held per iteration, not for the whole optimisation, so a CUDA graph capture, and
    every request queued behind it, waits one iteration rather than the whole inversion).
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
            with device_section(), torch.no_grad():
                eps_c = predict(z, t, cond)
            goal = traj[steps - i - 1 : steps - i]
            param = null.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([param], lr=1e-2 * (1.0 - i / 100.0))
            done, loss_value = 0, math.nan
            for _ in range(inner_steps):
                if cancel_check is not None:
                    cancel_check()
                with device_section():
                    eps_u = predict(z, t, param)
                    loss = F.mse_loss(step.apply(z, eps_u + guidance * (eps_c - eps_u)), goal)
                    (param.grad,) = torch.autograd.grad(loss, [param])
                    result.unet_backwards += 1
                    optimizer.step()
                    loss_value = loss.item()
                done += 1
                if loss_value < epsilon + i * 2e-5:
                    break
            null = param.detach()
            del optimizer, param
            nulls[i] = null[0]
            result.iterations.append(done)
            result.final_losses.append(loss_value)
            with device_section(), torch.no_grad():
                eps_u = predict(z, t, null)
                z = step.apply(z, eps_u + guidance * (eps_c - eps_u))
            if progress is not None:
                progress(i + 1, steps)
    result.embeddings = nulls.detach()
    return result


def denoise_steps(schedule: DDIMSchedule) -> list[DenoiseStep]:
    """The N denoising steps of an engine schedule, noisiest first, with their cumulative alphas."""
    return [
        DenoiseStep(t, alpha, alpha_prev, schedule.prediction_type)
        for t, alpha, alpha_prev in schedule.denoise_alphas()
    ]


# --- request checks (EditEngine.invert calls them before any work) ----------------------------------------


def check_method(method: object, source_prompt: str, backend: Backend | None = None) -> str:
    """Refuse an unknown method, a method that needs a source prompt without one, and (given the backend)
    null-text inversion where there are no gradients, before any work starts. The server calls it without a
    backend before queueing; the engine again with its own."""
    method = check_inversion_method(method, source_prompt)
    if method == "null-text" and backend is not None and not backend.supports_gradients:
        raise InvalidInputError(
            "method",
            f"null-text inversion needs gradients, which the {backend.name} backend does not have: use the "
            "torch backend, or 'negative-prompt' (no optimisation) here",
        )
    return str(method)
