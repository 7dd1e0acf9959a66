"""DDIM sampling and inversion with the reference settings of docs/design.md, on diffusers' schedulers.

Only the checkpoint's betas and prediction type (``epsilon`` or ``v_prediction``) are taken (SD 1.5 ships a
PNDM config); the rest is fixed: eta 0,
``set_alpha_to_one=False``, ``steps_offset=0``, no clipping, "leading" spacing, so that with N steps the
timesteps are ``r*(N-1), ..., r, 0`` with ``r = 1000 // N``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from . import contract
from .errors import InvalidInputError

_FIXED = {
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
#: What the UNet may predict: the noise (SD 1.x, SD 2.x base) or v = sqrt(a) eps - sqrt(1 - a) x0 (SD 2.x
#: 768, some fine-tunes). Sampling, inversion and the null-text optimisation convert with the alpha-bar of
#: the level the sample is at.
PREDICTION_TYPES = contract.PREDICTION_TYPES
SD1_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def ddim_move(
    sample: torch.Tensor,
    prediction: torch.Tensor,
    alpha: float | torch.Tensor,
    alpha_to: float | torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The deterministic DDIM move (eta 0) of ``sample``, at cumulative alpha ``alpha``, to the level
    ``alpha_to``: lower noise when denoising, higher when inverting. ``prediction`` is the UNet's output at
    ``sample`` (the noise, or v = sqrt(a) eps - sqrt(1 - a) x0, turned into x0 and eps with ``alpha``).

    The one DDIM formula of the engine: sampling, inversion and the null-text optimisation's differentiable
    step all take it; the arithmetic is diffusers' (``DDIMScheduler``/``DDIMInverseScheduler.step``) term for
    term, so with their float32 alphas it gives their results bit for bit. Alphas are Python floats or 0-dim
    tensors.
    """
    beta = 1 - alpha
    if prediction_type == "v_prediction":
        x0 = (alpha**0.5) * sample - (beta**0.5) * prediction
        eps = (alpha**0.5) * prediction + (beta**0.5) * sample
    else:
        x0 = (sample - beta**0.5 * prediction) / alpha**0.5
        eps = prediction
    return alpha_to**0.5 * x0 + (1 - alpha_to) ** 0.5 * eps


class DDIMSchedule:
    """The timesteps of one step count, with the denoising step and the inversion step."""

    def __init__(self, betas: Mapping[str, Any], steps: int) -> None:
        config = {**SD1_BETAS, "prediction_type": "epsilon", **betas, **_FIXED}
        if config["prediction_type"] not in PREDICTION_TYPES:
            raise InvalidInputError(
                "prediction_type",
                f"must be one of {list(PREDICTION_TYPES)}, got {config['prediction_type']!r}",
            )
        self.prediction_type: str = config["prediction_type"]
        if steps > config["num_train_timesteps"]:
            raise InvalidInputError(
                "steps", f"must be at most the model's {config['num_train_timesteps']} training timesteps"
            )
        self.steps = steps
        self._sampler = DDIMScheduler(**config)
        self._sampler.set_timesteps(steps)
        self._inverter = DDIMInverseScheduler(**config)
        self._inverter.set_timesteps(steps)
        #: Denoising order: index 0 is the noisiest step.
        self.timesteps: list[int] = [int(t) for t in self._sampler.timesteps]
        # Per step, the cumulative alphas (float32, as the schedulers keep them) of the level left and the
        # level reached. Denoising from t lands on t - r (the final alpha below 0); inverting to t leaves
        # t - r (the initial alpha below 0), so the UNet, evaluated at t, is used at t - r as diffusers does.
        r = config["num_train_timesteps"] // steps
        alphas, last = self._sampler.alphas_cumprod, config["num_train_timesteps"] - 1
        self._denoise = [
            (alphas[t], alphas[t - r] if t - r >= 0 else self._sampler.final_alpha_cumprod)
            for t in self.timesteps
        ]
        self._invert = [
            (alphas[min(t - r, last)] if t - r >= 0 else self._inverter.initial_alpha_cumprod, alphas[t])
            for t in (int(t) for t in self._inverter.timesteps)
        ]
        self._on_device: dict[tuple[str, bool], torch.Tensor] = {}
        self._lock = threading.Lock()

    @cached_property
    def inversion_timesteps(self) -> list[int]:
        return [int(t) for t in self._inverter.timesteps]

    def timestep_tensor(self, device: torch.device, inversion: bool = False) -> torch.Tensor:
        """The timesteps as float32 on ``device``, copied there once per schedule and device, so steps
        index them without a host copy each."""
        key = (str(device), inversion)
        with self._lock:
            tensor = self._on_device.get(key)
            if tensor is None:
                values = self.inversion_timesteps if inversion else self.timesteps
                tensor = self._on_device[key] = torch.tensor(values, dtype=torch.float32).to(device)
            return tensor

    def denoise_alphas(self) -> list[tuple[int, float, float]]:
        """Per denoising step, noisiest first: (t, alpha_bar(t), alpha_bar of the level it lands on). What a
        differentiable DDIM step needs (the null-text optimisation back-propagates through it)."""
        return [
            (t, float(a), float(a_to)) for t, (a, a_to) in zip(self.timesteps, self._denoise, strict=True)
        ]

    def step(self, noise_pred: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """One DDIM (eta 0) step from denoising step ``index``'s timestep to the next lower one."""
        alpha, alpha_to = self._denoise[index]
        return ddim_move(sample, noise_pred, alpha, alpha_to, self.prediction_type)

    def invert_step(self, noise_pred: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """One DDIM inversion step; ``index`` counts over ``reversed(timesteps)`` (0 is t = 0)."""
        alpha, alpha_to = self._invert[index]
        return ddim_move(sample, noise_pred, alpha, alpha_to, self.prediction_type)


#: Step counts whose schedules are kept (LRU); a server sees few distinct counts, a scan of all 1000 stays
#: bounded.
SCHEDULE_CACHE_SIZE = 64


class ScheduleCache:
    """Schedules are immutable once built: keep the :data:`SCHEDULE_CACHE_SIZE` most recently used."""

    def __init__(self, betas: Mapping[str, Any], max_entries: int = SCHEDULE_CACHE_SIZE) -> None:
        self._betas = dict(betas)
        self.max_entries = max(1, int(max_entries))
        self._by_steps: OrderedDict[int, DDIMSchedule] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_steps)

    def __call__(self, steps: int) -> DDIMSchedule:
        with self._lock:
            schedule = self._by_steps.get(steps)
            if schedule is not None:
                self._by_steps.move_to_end(steps)
                return schedule
        schedule = DDIMSchedule(self._betas, steps)
        with self._lock:
            self._by_steps[steps] = schedule
            while len(self._by_steps) > self.max_entries:
                self._by_steps.popitem(last=False)
        return schedule
