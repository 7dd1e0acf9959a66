"""Running a :class:`~.blend.Blend` in an edit (docs/design.md, local blending): the user mask on the latent
grid, the word maps from the UNet's cross-attention, and the blend step the step programs call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .blend import DEFAULT_BLEND_THRESHOLD, Blend
from .errors import InvalidInputError
from .tokenizing import TOKENIZER_LOCK

#: The side of the query grid the word maps are read at, as a fraction of the latent side's.
WORD_MAP_DOWNSAMPLE = 4


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
    ``</w>``), so "at" does not match inside "cat". Under the process's tokenizer lock: a thread encoding
    text at the same time would otherwise swap this call's settings (and lose the word)."""
    with TOKENIZER_LOCK:
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
