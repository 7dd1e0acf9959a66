"""Per-request edit options, validated on construction so that a bad request fails before any work starts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real

from .contract import LAYER_PRESETS, MAP_FORMATS, PAPER_LAYERS, ModelSpec, resolve_layers
from .errors import InvalidInputError

MAX_STEPS = 1000
#: Classifier-free guidance above this only saturates the image (1e30 gives black): refuse it.
MAX_GUIDANCE_SCALE = 50.0
#: Longest prompt accepted (characters). CLIP reads 77 tokens; a longer prompt only costs tokenizer time and
#: memory (a 7 MB prompt held a worker for half a minute), so anything past a generous limit is refused.
DEFAULT_MAX_PROMPT_CHARS = 4096


def check_prompt(
    prompt: object, field: str, *, allow_empty: bool, max_chars: int = DEFAULT_MAX_PROMPT_CHARS
) -> str:
    """Return ``prompt`` if it is a usable prompt, else raise :class:`InvalidInputError` naming ``field``.

    Cheap enough to run before any work is queued (length and type only; tokenizing comes later).
    """
    if not isinstance(prompt, str):
        raise InvalidInputError(field, f"must be a string, got {type(prompt).__name__}")
    if len(prompt) > max_chars:
        raise InvalidInputError(field, f"has {len(prompt)} characters; the limit is {max_chars}")
    if not allow_empty and not prompt.strip():
        raise InvalidInputError(field, "must not be empty")
    return prompt


@dataclass(frozen=True)
class EditOptions:
    """How to edit. Defaults follow the paper and the authors' notebooks (docs/design.md).

    ``layers`` holds 1-based self-attention layer numbers in execution order (down 1-6, mid 7, up 8-16), or a
    preset: ``"paper"`` (4-14) or ``"resolution"`` (layers attending over at most 32x32 tokens at the
    request's size, the authors' code; 3-13 at 512 px). ``replace_window=(start, end)`` replaces step ``i``
    (0 = noisiest) when ``int(steps*start) <= i < int(steps*end)``.
    """

    steps: int = 50
    guidance_scale: float = 7.5
    replace_window: tuple[float, float] = (0.0, 0.8)
    layers: tuple[int, ...] | str = PAPER_LAYERS
    map_format: str = "qk"

    def __post_init__(self) -> None:
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, Integral) or not 1 <= steps <= MAX_STEPS:
            raise InvalidInputError("steps", f"must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        object.__setattr__(self, "steps", int(steps))

        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, Real) or not 0 <= g <= MAX_GUIDANCE_SCALE:
            raise InvalidInputError(
                "guidance_scale", f"must be a number in 0..{MAX_GUIDANCE_SCALE:g}, got {g!r}"
            )
        object.__setattr__(self, "guidance_scale", float(g))

        window = self.replace_window
        try:
            start, end = (float(x) for x in window)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError("replace_window", f"must be a pair (start, end), got {window!r}") from exc
        if not (math.isfinite(start) and math.isfinite(end)) or not 0.0 <= start <= end <= 1.0:
            raise InvalidInputError("replace_window", f"needs 0 <= start <= end <= 1, got ({start}, {end})")
        object.__setattr__(self, "replace_window", (start, end))

        if isinstance(self.layers, str):
            if self.layers not in LAYER_PRESETS:
                raise InvalidInputError("layers", f"unknown preset {self.layers!r}; use {LAYER_PRESETS}")
        else:
            object.__setattr__(self, "layers", resolve_layers(self.layers))

        if self.map_format not in MAP_FORMATS:
            raise InvalidInputError("map_format", f"must be one of {MAP_FORMATS}, got {self.map_format!r}")

    def replace(self, **changes: object) -> EditOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def replaced_steps(self) -> range:
        """Step indices whose target self-attention takes the source's maps."""
        start, end = self.replace_window
        return range(int(self.steps * start), int(self.steps * end))

    def layer_numbers(self, spec: ModelSpec, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        return resolve_layers(self.layers, spec, latent_hw)
