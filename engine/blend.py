"""Local blending (issue 27): edit only where a mask allows, holding the rest of the latent to the source.

A :class:`Blend` (what the request asks) turns into a :class:`BlendRun` (one edit's state) once the latent
size, the prompts and the source are known. After every denoising step ``i >= int(N * start)`` the target's
latent becomes ``z_src + M * (z_tgt - z_src)``; outside M the final latent therefore *is* the source's (the
inversion's z_0 in a real edit), exactly. M is the union of

* a **user mask**: an image (white / non-zero = editable) resized to the working size as the image is,
  averaged over each 8x8 pixel cell, ``> 0.5``, optionally grown by ``mask_grow`` latent cells (max-pool);
* **word masks** (Prompt-to-Prompt's LocalBlend): per prompt, the conditional row's cross-attention
  probabilities of the named words' tokens in the layers whose query grid is 1/4 of the latent side, averaged
  over heads and layers and summed over the steps run so far, 3x3 max-pooled, upsampled (nearest) to the
  latent grid, divided by the maximum and thresholded at ``threshold``; the target's and the source's maps
  (where the source has a prompt) are united.

The blend runs outside the UNet, so user masks work on every backend; word masks need the UNet's
cross-attention probabilities, which only the torch backend hands out (:attr:`Backend.supports_cross_probs`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidInputError

#: LocalBlend's defaults: blend from 20 % of the steps on, keep cells above 30 % of the map's maximum.
DEFAULT_BLEND_START = 0.2
DEFAULT_BLEND_THRESHOLD = 0.3
#: Largest dilation of a user mask, in latent cells (64 covers a 512 px image from a single cell).
MAX_MASK_GROW = 64
MAX_BLEND_WORDS = 16
MAX_WORD_CHARS = 100
#: The side of the query grid the word maps are read at, as a fraction of the latent side's.
WORD_MAP_DOWNSAMPLE = 4
_MASK_TYPES = (Image.Image, np.ndarray, bytes, bytearray, str, os.PathLike)


@dataclass(frozen=True, eq=False)
class Blend:
    """What to blend: a ``mask`` image (PIL image, array, encoded bytes or a path; white = editable),
    grown by ``mask_grow`` latent cells, and/or ``words`` of the prompts whose cross-attention marks the
    editable region; from step ``int(steps * start)`` on, word maps thresholded at ``threshold``.

    Validated on construction (field names as requests spell them). A blend needs a mask or words; without
    one the edit is today's, bit for bit (pass ``blend=None``).
    """

    mask: Any = None
    mask_grow: int = 0
    words: tuple[str, ...] = ()
    start: float = DEFAULT_BLEND_START
    threshold: float = DEFAULT_BLEND_THRESHOLD

    def __post_init__(self) -> None:
        if self.mask is not None and not isinstance(self.mask, _MASK_TYPES):
            raise InvalidInputError(
                "mask", f"expected an image, bytes or a path, got {type(self.mask).__name__}"
            )
        if isinstance(self.mask, (bytes, bytearray)) and not self.mask:
            raise InvalidInputError("mask", "is empty")
        grow = self.mask_grow
        if isinstance(grow, bool) or not isinstance(grow, Integral) or not 0 <= grow <= MAX_MASK_GROW:
            raise InvalidInputError("mask_grow", f"must be an integer in 0..{MAX_MASK_GROW}, got {grow!r}")
        object.__setattr__(self, "mask_grow", int(grow))
        if grow and self.mask is None:
            raise InvalidInputError("mask_grow", "grows a mask image; none was given")
        words = self.words
        if isinstance(words, str) or not isinstance(words, (list, tuple)):
            raise InvalidInputError("blend_words", f"must be a list of words, got {type(words).__name__}")
        if len(words) > MAX_BLEND_WORDS:
            raise InvalidInputError("blend_words", f"has {len(words)} words; the limit is {MAX_BLEND_WORDS}")
        clean = []
        for word in words:
            if not isinstance(word, str) or not word.strip():
                raise InvalidInputError("blend_words", f"each word must be a non-empty string, got {word!r}")
            if len(word) > MAX_WORD_CHARS:
                raise InvalidInputError("blend_words", f"a word has {len(word)} characters; the limit is 100")
            clean.append(word.strip())
        object.__setattr__(self, "words", tuple(clean))
        for name, attr in (("blend_start", "start"), ("blend_threshold", "threshold")):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
                raise InvalidInputError(name, f"must be a number in 0..1, got {value!r}")
            object.__setattr__(self, attr, float(value))
        if self.mask is None and not self.words:
            raise InvalidInputError("mask", "a blend needs a mask image or blend words")

    def start_step(self, steps: int) -> int:
        """The first blended step (0 = noisiest)."""
        return int(steps * self.start)


# --- user masks ------------------------------------------------------------------------------------------


def user_mask(
    mask: Any,
    working_size: tuple[int, int],
    grow: int,
    *,
    max_input_pixels: int,
    formats: Sequence[str] | None = None,
) -> torch.Tensor:
    """The mask image as a (h, w) bool latent grid for an image edited at ``working_size`` (width, height):
    resized there as the image is (Lanczos), each pixel's brightest channel in [0, 1], the mean over every
    8x8 cell ``> 0.5``, then grown by ``grow`` cells (max-pool of side 2 * grow + 1)."""
    from .images import load_image

    picture = load_image(mask, field="mask", max_input_pixels=max_input_pixels, formats=formats)
    if picture.size != working_size:
        picture = picture.resize(working_size, Image.Resampling.LANCZOS)
    values = torch.from_numpy(np.asarray(picture, dtype=np.float32).max(axis=2) / 255.0)
    cells = F.avg_pool2d(values[None, None], kernel_size=8)
    keep = (cells > 0.5).float()
    if grow:
        keep = F.max_pool2d(keep, kernel_size=2 * grow + 1, stride=1, padding=grow)
    return keep[0, 0] > 0.5


# --- word masks ------------------------------------------------------------------------------------------


def word_positions(tokenizer: Any, prompt: str, word: str, max_length: int) -> list[int]:
    """Positions (in the 77 context rows; 0 = start token) of every occurrence of ``word`` in ``prompt``:
    the word's own tokens as a run that starts a pre-token (CLIP ends each pre-token's last BPE token with
    ``</w>``), so "at" does not match inside "cat"."""
    ids = tokenizer(prompt, truncation=True, max_length=max_length).input_ids[:-1]  # no end token
    tokens = tokenizer.convert_ids_to_tokens(ids)
    mine = tokenizer(word).input_ids[1:-1]
    n = len(mine)
    found: list[int] = []
    if not n:
        return found
    for p in range(1, len(ids) - n + 1):
        starts_word = p == 1 or str(tokens[p - 1]).endswith("</w>")
        if starts_word and ids[p : p + n] == mine:
            found.extend(range(p, p + n))
    return sorted(set(found))


def reduce_cross(cross: dict[int, torch.Tensor], row: int) -> torch.Tensor:
    """One row's cross-attention probabilities averaged over the layers (each head-averaged already):
    (query tokens, text tokens) float32."""
    layers = sorted(cross)
    return torch.stack([cross[layer][row].float() for layer in layers]).mean(dim=0)


def word_layers(spec: Any, latent_hw: tuple[int, int]) -> tuple[int, ...]:
    """Self-attention layers whose block's cross-attention queries a grid 1/4 of the latent's side (SD 1.x at
    512 px: the 16x16 layers 5, 6, 8, 9, 10)."""
    return tuple(layer.index for layer in spec.layers if layer.downsample == WORD_MAP_DOWNSAMPLE)


@dataclass
class _WordMap:
    """One prompt's named tokens and their attention summed over the steps so far, (grid h * grid w)."""

    positions: list[int]
    total: torch.Tensor | None = None

    def add(self, probs: torch.Tensor) -> None:
        here = probs[:, self.positions].sum(dim=1)
        self.total = here if self.total is None else self.total + here


class BlendRun:
    """One edit's blend: the user mask, the word maps accumulated over the steps, and the blend step.

    Programs call :meth:`observe` with each step's result (the cross-attention rows of each branch) and
    :meth:`apply` after each scheduler step; :attr:`last_mask` is the mask of the last blended step.
    """

    def __init__(
        self,
        steps: int,
        start: int,
        latent_hw: tuple[int, int],
        *,
        user: torch.Tensor | None = None,
        words: dict[str, list[int]] | None = None,
        layers: tuple[int, ...] = (),
        threshold: float = DEFAULT_BLEND_THRESHOLD,
        source_cross: Sequence[torch.Tensor] | None = None,
        pinned: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        self.steps, self.start, self.latent_hw = steps, start, latent_hw
        self.user = user
        self.maps = {branch: _WordMap(positions) for branch, positions in (words or {}).items() if positions}
        self.layers = layers if self.maps else ()
        self.threshold = threshold
        #: Algorithm 3's source branch ran before the edit: its per-step reduced probabilities.
        self.source_cross = source_cross
        #: A real edit's source latent after step i (the pinned trajectory's).
        self.pinned = pinned
        self.last_mask: torch.Tensor | None = None

    @property
    def cross_probs(self) -> tuple[int, ...]:
        """Layers a step's UNet calls must hand cross-attention probabilities out of."""
        return self.layers

    def observe(self, i: int, cross: dict[int, torch.Tensor] | None, rows: dict[str, int]) -> None:
        """Add step ``i``'s attention: ``rows`` names, per branch, its conditional row in ``cross``."""
        if not self.maps:
            return
        if self.source_cross is not None and "source" in self.maps:
            self.maps["source"].add(self.source_cross[i].float())
        for branch, row in rows.items():
            if branch in self.maps:
                assert cross is not None, "the UNet call returned no cross-attention probabilities"
                self.maps[branch].add(reduce_cross(cross, row))

    def mask(self) -> torch.Tensor:
        """The current (h, w) bool mask: the user mask united with every prompt's word mask."""
        h, w = self.latent_hw
        out = torch.zeros((h, w), dtype=torch.bool) if self.user is None else self.user.cpu().clone()
        grid = (h // WORD_MAP_DOWNSAMPLE, w // WORD_MAP_DOWNSAMPLE)
        for word_map in self.maps.values():
            if word_map.total is None:
                continue
            pooled = F.max_pool2d(
                word_map.total.reshape(1, 1, *grid).cpu(), kernel_size=3, stride=1, padding=1
            )
            upsampled = F.interpolate(pooled, size=(h, w), mode="nearest")[0, 0]
            peak = upsampled.max()
            if peak > 0:
                out |= (upsampled / peak) > self.threshold
        return out

    def apply(self, i: int, z_tgt: torch.Tensor, z_src: torch.Tensor | None = None) -> torch.Tensor:
        """The target after step ``i``: ``z_src + M * (z_tgt - z_src)`` from the start step on."""
        if i < self.start:
            return z_tgt
        if z_src is None:
            assert self.pinned is not None
            z_src = self.pinned(i)
        mask = self.mask()
        self.last_mask = mask
        m = mask.to(z_tgt.device, z_tgt.dtype)
        return z_src + m * (z_tgt - z_src)


# --- from a request to a run -----------------------------------------------------------------------------


def check_words(engine: Any, blend: Blend, target_prompt: str, source_prompt: str) -> dict[str, list[int]]:
    """Per branch ("target", and "source" where the source has a prompt), the token positions of the blend
    words; refuses a word neither prompt contains, and words on a backend without cross-attention outputs."""
    if not blend.words:
        return {}
    if not engine.backend.supports_cross_probs:
        raise InvalidInputError(
            "blend_words",
            f"word masks need cross-attention probabilities, which this {engine.backend.name} model's "
            "graphs do not output; use a mask image, or the torch backend",
        )
    length = engine.spec.text_max_length
    prompts = {"target": target_prompt, **({"source": source_prompt} if source_prompt.strip() else {})}
    positions: dict[str, list[int]] = {branch: [] for branch in prompts}
    for word in blend.words:
        found = False
        for branch, prompt in prompts.items():
            here = word_positions(engine.tokenizer, prompt, word, length)
            positions[branch].extend(here)
            found = found or bool(here)
        if not found:
            where = "the target prompt" if len(prompts) == 1 else "the target or the source prompt"
            raise InvalidInputError("blend_words", f"{word!r} is not a word of {where}")
    return {branch: sorted(set(p)) for branch, p in positions.items() if p}


def start_blend(
    engine: Any,
    blend: Blend,
    steps: int,
    latent_hw: tuple[int, int],
    words: dict[str, list[int]],
    *,
    source_cross: Sequence[torch.Tensor] | None = None,
    pinned: Callable[[int], torch.Tensor] | None = None,
) -> BlendRun:
    """The run of ``blend`` for an edit of ``steps`` steps on a ``latent_hw`` grid (the user mask loaded and
    resized now; ``words`` from :func:`check_words`)."""
    h, w = latent_hw
    user = None
    if blend.mask is not None:
        user = user_mask(
            blend.mask,
            (8 * w, 8 * h),
            blend.mask_grow,
            max_input_pixels=engine.max_input_pixels,
            formats=engine.image_formats,
        )
    return BlendRun(
        steps,
        blend.start_step(steps),
        latent_hw,
        user=user,
        words=words,
        layers=word_layers(engine.spec, latent_hw),
        threshold=blend.threshold,
        source_cross=source_cross,
        pinned=pinned,
    )


def blend_stats(run: BlendRun | None) -> dict[str, Any]:
    """What a result reports of its blend: the cells of the last mask and of the grid."""
    if run is None or run.last_mask is None:
        return {}
    return {
        "blend_cells": int(run.last_mask.sum()),
        "blend_grid": list(run.latent_hw),
        "blend_start": run.start,
    }


def mask_array(run: BlendRun | None) -> np.ndarray | None:
    """The last blended step's mask as a (h, w) bool array (all False when no step was blended)."""
    if run is None:
        return None
    mask = run.last_mask if run.last_mask is not None else torch.zeros(run.latent_hw, dtype=torch.bool)
    return mask.numpy().copy()


def source_prompt_of(image: Any, invert_options: dict[str, Any]) -> str:
    """The source prompt a real edit's source branch will have ("" for a "ddim" inversion), known before
    the inversion runs: the inversion's own, or the one its options give."""
    from .results import Inversion

    if isinstance(image, Inversion):
        return image.source_prompt
    how = invert_options.get("inversion")
    if how is not None:
        return "" if how.method == "ddim" else how.source_prompt
    if invert_options.get("method", "ddim") == "ddim":
        return ""
    prompt = invert_options.get("source_prompt", "")
    return prompt if isinstance(prompt, str) else ""
