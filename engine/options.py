"""Per-request edit options, validated on construction so that a bad request fails before any work starts."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

from .adapters import AdapterSet, normalize_adapters
from .blend import Blend
from .contract import LAYER_PRESETS, MAP_FORMATS, PAPER_LAYERS, ModelSpec, resolve_layers
from .errors import InvalidInputError

MAX_STEPS = 1000
#: Classifier-free guidance above this only saturates the image (1e30 gives black): refuse it.
MAX_GUIDANCE_SCALE = 50.0
#: The inclusive ranges of the numeric options, by their request names: the one table :class:`EditOptions`
#: checks and the editor page's number inputs carry (``min``/``max``).
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "steps": (1, MAX_STEPS),
    "guidance_scale": (0.0, MAX_GUIDANCE_SCALE),
    "replace_start": (0.0, 1.0),
    "replace_end": (0.0, 1.0),
}
#: Longest prompt accepted (characters). CLIP reads 77 tokens; a longer prompt only costs tokenizer time and
#: memory (a 7 MB prompt held a worker for half a minute), so anything past a generous limit is refused.
DEFAULT_MAX_PROMPT_CHARS = 4096
#: Inversion methods: Algorithm 2's DDIM inversion with "", null-text inversion (Algorithm 3), and
#: negative-prompt inversion (Algorithm 3's edit with the source prompt as every step's null embedding).
INVERSION_METHODS = ("ddim", "null-text", "negative-prompt")
#: Null-text inversion's Adam iterations per step (default and most) and early-stop loss threshold.
DEFAULT_NULL_TEXT_STEPS = 10
MAX_NULL_TEXT_STEPS = 100
DEFAULT_NULL_TEXT_EPSILON = 1e-5
#: Image formats a result may be written as, by file extension (PIL's names; the service returns them).
IMAGE_FILE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


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
    (0 = noisiest) when ``int(steps*start) <= i < int(steps*end)``. ``blend`` (:class:`~.blend.Blend`)
    holds the edit to the source outside a mask; ``None``: the whole image may change.
    """

    steps: int = 50
    guidance_scale: float = 7.5
    replace_window: tuple[float, float] = (0.0, 0.8)
    layers: tuple[int, ...] | str = PAPER_LAYERS
    map_format: str = "qk"
    blend: Blend | None = None
    #: LoRA adapters of the server's ``--lora-dir`` for this request: (name, scale) pairs (or
    #: ``NAME[:SCALE]`` strings, ``{name, scale}`` mappings), kept sorted by name; names are checked by the engine.
    adapters: AdapterSet = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", normalize_adapters(self.adapters))
        steps, (low, high) = self.steps, OPTION_RANGES["steps"]
        if isinstance(steps, bool) or not isinstance(steps, Integral) or not low <= steps <= high:
            raise InvalidInputError("steps", f"must be an integer in {low:g}..{high:g}, got {steps!r}")
        object.__setattr__(self, "steps", int(steps))

        g, (low, high) = self.guidance_scale, OPTION_RANGES["guidance_scale"]
        if isinstance(g, bool) or not isinstance(g, Real) or not low <= g <= high:
            raise InvalidInputError("guidance_scale", f"must be a number in {low:g}..{high:g}, got {g!r}")
        object.__setattr__(self, "guidance_scale", float(g))

        window = self.replace_window
        try:
            start, end = (float(x) for x in window)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError("replace_window", f"must be a pair (start, end), got {window!r}") from exc
        (low, _), (_, high) = OPTION_RANGES["replace_start"], OPTION_RANGES["replace_end"]
        if not (math.isfinite(start) and math.isfinite(end)) or not low <= start <= end <= high:
            raise InvalidInputError(
                "replace_window", f"needs {low:g} <= start <= end <= {high:g}, got ({start}, {end})"
            )
        object.__setattr__(self, "replace_window", (start, end))

        if isinstance(self.layers, str):
            if self.layers not in LAYER_PRESETS:
                raise InvalidInputError("layers", f"unknown preset {self.layers!r}; use {LAYER_PRESETS}")
        else:
            object.__setattr__(self, "layers", resolve_layers(self.layers))

        if self.map_format not in MAP_FORMATS:
            raise InvalidInputError("map_format", f"must be one of {MAP_FORMATS}, got {self.map_format!r}")
        if self.blend is not None and not isinstance(self.blend, Blend):
            raise InvalidInputError("blend", f"must be a Blend or None, got {type(self.blend).__name__}")

    def replace(self, **changes: object) -> EditOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def replaced_steps(self) -> range:
        """Step indices whose target self-attention takes the source's maps."""
        start, end = self.replace_window
        return range(int(self.steps * start), int(self.steps * end))

    def layer_numbers(self, spec: ModelSpec, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        return resolve_layers(self.layers, spec, latent_hw)


def check_null_text_options(inner_steps: object, epsilon: object) -> tuple[int, float]:
    """Validate ``null_text_steps`` and ``null_text_epsilon`` (names as the user sees them)."""
    if (
        isinstance(inner_steps, bool)
        or not isinstance(inner_steps, int)
        or not 1 <= inner_steps <= MAX_NULL_TEXT_STEPS
    ):
        raise InvalidInputError(
            "null_text_steps", f"must be an integer in 1..{MAX_NULL_TEXT_STEPS}, got {inner_steps!r}"
        )
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not math.isfinite(epsilon)
        or epsilon < 0
    ):
        raise InvalidInputError("null_text_epsilon", f"must be a finite number >= 0, got {epsilon!r}")
    return inner_steps, float(epsilon)


def check_inversion_method(method: object, source_prompt: str) -> str:
    """Refuse an unknown method, a method that needs a source prompt without one, and a source prompt given
    to DDIM inversion, which does not use it (whether the backend can run the method is the engine's check:
    ``null_text.check_method``)."""
    if method not in INVERSION_METHODS:
        raise InvalidInputError("method", f"must be one of {list(INVERSION_METHODS)}, got {method!r}")
    if method != "ddim" and not source_prompt.strip():
        raise InvalidInputError(
            "source_prompt", f"must describe the image: inversion method {method!r} needs one"
        )
    if method == "ddim" and source_prompt.strip():
        raise InvalidInputError(
            "source_prompt",
            "DDIM inversion (the default) does not use a source prompt; choose inversion method null-text or "
            "negative-prompt to use it, or leave it out",
        )
    return str(method)


#: The inversion options, by their request names: what a request that edits an inversion already made (an
#: :class:`~fpedit.engine.results.Inversion`, a server's inversion id, a saved file) must leave out.
INVERSION_FIELDS = ("source_prompt", "method", "null_text_steps", "null_text_epsilon")


def refuse_inversion_options(given: Sequence[str]) -> None:
    """Refuse inversion options (``given``: the names of those a request set, in the caller's spelling)
    beside an inversion already made: it was made with its own."""
    if given:
        raise InvalidInputError(
            given[0],
            "inversion options do not apply to an inversion already made (it carries its own); leave them "
            "out, or give the image instead",
        )


@dataclass(frozen=True)
class InversionOptions:
    """How to invert a real image (docs/design.md, Algorithms 2 and 3), validated on construction: the one
    place the inversion rules live (the CLI, gRPC, HTTP, eval and the Python API all build one).

    ``method="ddim"`` (default) inverts with prompt "" and refuses a ``source_prompt``; ``"null-text"``
    optimises one null embedding per step (at most ``null_text_steps`` Adam iterations, early stop at
    ``null_text_epsilon``, defaults :data:`DEFAULT_NULL_TEXT_STEPS` and :data:`DEFAULT_NULL_TEXT_EPSILON`;
    torch backend); ``"negative-prompt"`` uses the source prompt's embedding as every step's null embedding.
    Both need ``source_prompt``, what the image shows. The null-text settings are ``None`` for the other
    methods, which refuse them.
    """

    method: str = "ddim"
    source_prompt: str = ""
    null_text_steps: int | None = None
    null_text_epsilon: float | None = None

    def __post_init__(self) -> None:
        # The length limit is the engine's (EditEngine.max_prompt_chars), judged where the request runs.
        check_prompt(self.source_prompt, "source_prompt", allow_empty=True, max_chars=sys.maxsize)
        steps, epsilon = check_null_text_options(
            DEFAULT_NULL_TEXT_STEPS if self.null_text_steps is None else self.null_text_steps,
            DEFAULT_NULL_TEXT_EPSILON if self.null_text_epsilon is None else self.null_text_epsilon,
        )
        method = check_inversion_method(self.method, self.source_prompt)
        object.__setattr__(self, "method", method)
        if method != "null-text":
            given = [
                name for name in ("null_text_steps", "null_text_epsilon") if getattr(self, name) is not None
            ]
            if given:
                raise InvalidInputError(
                    given[0],
                    f"only null-text inversion uses it ({method} inversion does not optimise); choose "
                    "inversion method null-text to use it, or leave it out",
                )
            return
        object.__setattr__(self, "null_text_steps", steps)
        object.__setattr__(self, "null_text_epsilon", epsilon)

    def replace(self, **changes: object) -> InversionOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
