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
This module is the request's value and imports no torch (clients build it); :mod:`.local_blend` runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from .errors import InvalidInputError

#: LocalBlend's defaults: blend from 20 % of the steps on, keep cells above 30 % of the map's maximum.
DEFAULT_BLEND_START = 0.2
DEFAULT_BLEND_THRESHOLD = 0.3
#: Largest dilation of a user mask, in latent cells (64 covers a 512 px image from a single cell).
MAX_MASK_GROW = 64
MAX_BLEND_WORDS = 16
MAX_WORD_CHARS = 100


def _is_mask_input(mask: object) -> bool:
    """An image input: encoded bytes, a path, or (imported only when one is given) a PIL image or array."""
    if isinstance(mask, (bytes, bytearray, str, os.PathLike)):
        return True
    import numpy as np
    from PIL import Image

    return isinstance(mask, (Image.Image, np.ndarray))


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
        if self.mask is not None and not _is_mask_input(self.mask):
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
