"""What one request decided, once: the plan its step programs (:mod:`.programs`) run.

An edit's options name a step count, a window, layers (maybe a preset that needs the image's size), a map
format and a guidance scale; the backend decides which layers a capture carries. :class:`EditPlan` resolves
all of it, checks it against the backend before any work starts, and is what every program of the request
takes, so the algorithms read as a few program runs instead of helpers that pass the same six values along.
:class:`InversionPlan` does the same for an inversion (its method and the null-text optimisation's settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backends.base import Backend
from .options import EditOptions
from .schedule import DDIMSchedule, ScheduleCache


@dataclass(frozen=True, eq=False)
class EditPlan:
    """An edit's resolved settings: schedule, layers, the replaced steps and the layers captured for them."""

    options: EditOptions
    schedule: DDIMSchedule
    #: Self-attention layers that take the source's maps (1-based, execution order).
    layers: tuple[int, ...]
    #: Denoising steps (0 = noisiest) whose target takes the source's maps; none when there are no layers.
    replaced: tuple[int, ...]
    #: Layers a source capture records (in replaced steps only): the requested ones, or a fixed-graph
    #: backend's whole set, so a cached source serves any later subset.
    capture_layers: tuple[int, ...]

    @classmethod
    def build(
        cls,
        options: EditOptions,
        backend: Backend,
        schedules: ScheduleCache,
        latent_hw: tuple[int, int] | None,
    ) -> EditPlan:
        """Resolve ``options`` for latents of ``latent_hw`` (``None``: not known yet; the ``"resolution"``
        preset then cannot be resolved) and refuse layers or a map format ``backend`` does not carry."""
        layers = check_layers(options, backend, latent_hw)
        replaced = tuple(options.replaced_steps()) if layers else ()
        return cls(options, schedules(options.steps), layers, replaced, tuple(backend.capture_layers(layers)))

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def map_format(self) -> str:
        return self.options.map_format

    @property
    def guidance(self) -> float:
        return self.options.guidance_scale

    def stats(self) -> dict[str, Any]:
        """What the plan was, for a result's statistics."""
        return {
            "steps": self.steps,
            "replaced_steps": list(self.replaced),
            "layers": list(self.layers),
            "map_format": self.map_format,
        }


def check_layers(
    options: EditOptions, backend: Backend, latent_hw: tuple[int, int] | None
) -> tuple[int, ...]:
    """The request's layers, refused before any work where ``backend``'s graphs lack them or the format."""
    layers = options.layer_numbers(backend.spec, latent_hw)
    if options.replaced_steps() and layers:
        backend.check_map_request(layers, options.map_format)
    return layers


@dataclass(frozen=True, eq=False)
class InversionPlan:
    """How an image is inverted: over ``schedule`` with ``method`` ("ddim": Algorithm 2 with ""; "null-text"
    or "negative-prompt": Algorithm 3 with ``source_prompt``), the null embeddings (null-text) optimised for
    ``guidance`` with at most ``null_text_steps`` Adam iterations per step, stopping at ``null_text_epsilon``."""

    schedule: DDIMSchedule
    method: str
    source_prompt: str
    guidance: float
    null_text_steps: int | None  # None unless null-text
    null_text_epsilon: float | None

    @property
    def steps(self) -> int:
        return self.schedule.steps
