"""What the engine hands back: edit results and reusable inversions."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .maps import AttentionMaps
from .options import EditOptions


@dataclass
class EditResult:
    """Images, final latents (before VAE decode) and per-stage statistics of one edit.

    For a real edit ``source_image`` is the reconstruction (also ``reconstruction_image``); for a generated
    edit it is the image the source prompt produced and ``reconstruction_image`` is ``None``. A real edit's
    images are at the requested ``output_size`` (by default the input's own size); latents are always at the
    working size (``stats["size"]``).
    """

    source_image: Image.Image
    edited_image: Image.Image
    source_latents: np.ndarray
    edited_latents: np.ndarray
    options: EditOptions
    stats: dict[str, Any]
    reconstruction_image: Image.Image | None = None
    inversion: Inversion | None = None
    #: The latent-grid (h, w) bool mask a blend used in its last step (1 = edited); ``None`` without a blend.
    blend_mask: np.ndarray | None = None


def image_nbytes(image: Image.Image | None) -> int:
    """Bytes a decoded PIL image holds (width x height x bytes per pixel)."""
    if image is None:
        return 0
    bands = len(image.getbands())
    bits = {"1": 1, "I": 32, "F": 32, "I;16": 16}.get(image.mode, 8)
    return image.width * image.height * max(1, bands * bits // 8)


def tensor_nbytes(value: Any) -> int:
    """Bytes of a tensor, or of the tensors in a list, tuple or dict (e.g. per-step embeddings)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_nbytes(v) for v in value.values())
    return 0


@dataclass
class Inversion:
    """A DDIM-inverted image: the whole trajectory and, once an edit computed them, the source's maps.

    ``trajectory[k]`` is z_k for k = 0..steps (``trajectory[0]`` the encoded image, ``trajectory[steps]``
    the start of the edit). Edits of the same inversion with other prompts reuse it, and reuse the cached
    source maps when their window, layers and format are covered, running the target branch alone. Safe to
    share between threads (its caches change under :attr:`lock`).
    """

    trajectory: torch.Tensor  # (steps + 1, C, h, w) float32 on the engine's device
    steps: int
    image: Image.Image  # the image at its working size
    engine_id: str
    stats: dict[str, Any]
    map_cache_limit: int
    #: "ddim" (Algorithm 2), "null-text" or "negative-prompt" (Algorithm 3; see ``engine.null_text``).
    method: str = "ddim"
    #: The prompt describing the image ("" for "ddim"); Algorithm 3's source branch uses it.
    source_prompt: str = ""
    #: Per-step unconditional embeddings (steps, L, D) float32: optimised (null-text) or the source
    #: prompt's (negative-prompt); None for "ddim".
    null_embeddings: torch.Tensor | None = None
    #: The guidance the null embeddings were optimised for (null-text edits must use it).
    guidance_scale: float | None = None
    #: (width, height) of the image as given (after EXIF orientation): edits come back at this size by
    #: default. ``None`` means the working size.
    original_size: tuple[int, int] | None = None
    #: The LoRA adapters ((name, scale) pairs) it was made with: only an edit under the same set may use it.
    adapters: tuple[tuple[str, float], ...] = ()
    _source_latent: torch.Tensor | None = field(default=None, repr=False)
    _maps: dict[int, AttentionMaps] = field(default_factory=dict, repr=False)
    _maps_format: str | None = field(default=None, repr=False)
    _maps_layers: frozenset[int] = field(default_factory=frozenset, repr=False)
    _reconstruction: Image.Image | None = field(default=None, repr=False)
    #: Algorithm 3's source branch: per step, its conditional row's cross-attention probabilities in the word
    #: map layers (engine.blend), once a word-mask edit needed them.
    _source_cross: list[torch.Tensor] | None = field(default=None, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """The working size (width, height) the image was inverted at."""
        return self.image.size

    @property
    def input_size(self) -> tuple[int, int]:
        """The (width, height) of the image as given: what edits return by default."""
        return self.original_size or self.image.size

    @property
    def latent_hw(self) -> tuple[int, int]:
        return int(self.trajectory.shape[-2]), int(self.trajectory.shape[-1])

    def latent(self, k: int) -> torch.Tensor:
        """z_k with a batch axis: (1, C, h, w)."""
        return self.trajectory[k : k + 1]

    @property
    def reconstruction(self) -> Image.Image | None:
        """z_0 decoded, once an edit has decoded it (later edits reuse it)."""
        with self.lock:
            return self._reconstruction

    @property
    def source_latent(self) -> torch.Tensor | None:
        """Algorithm 3: the generated source branch's final latent, once an edit has run it."""
        with self.lock:
            return self._source_latent

    def keep_source(self, latent: torch.Tensor) -> None:
        with self.lock:
            self._source_latent = latent

    @property
    def source_cross(self) -> list[torch.Tensor] | None:
        with self.lock:
            return self._source_cross

    def keep_source_cross(self, cross: list[torch.Tensor]) -> None:
        with self.lock:
            self._source_cross = cross

    def keep_reconstruction(self, image: Image.Image) -> None:
        with self.lock:
            self._reconstruction = image

    @property
    def map_bytes(self) -> int:
        with self.lock:
            return sum(m.nbytes for m in self._maps.values())

    @property
    def nbytes(self) -> int:
        """Every byte this inversion keeps: the trajectory, the cached maps, the working-size image, the
        reconstruction, and any other tensor attribute (what a cache of inversions must budget)."""
        with self.lock:
            tensors = sum(tensor_nbytes(value) for name, value in vars(self).items() if name != "_maps")
            return tensors + self.map_bytes + image_nbytes(self.image) + image_nbytes(self._reconstruction)

    def drop_maps(self) -> None:
        with self.lock:
            self._maps.clear()
            self._maps_format, self._maps_layers = None, frozenset()

    def cached_maps(self, map_format: str, layers: frozenset[int]) -> dict[int, AttentionMaps]:
        """A copy of the cached maps usable for a request (same format, a superset of its layers); empties a
        stale cache."""
        with self.lock:
            if self._maps and (self._maps_format != map_format or not layers <= self._maps_layers):
                self.drop_maps()
            return dict(self._maps)

    def store_maps(self, map_format: str, layers: frozenset[int], maps: dict[int, AttentionMaps]) -> bool:
        """Keep maps for later edits if they fit in the cache budget; returns whether they were kept."""
        with self.lock:
            if self._maps and (self._maps_format != map_format or self._maps_layers != layers):
                self.drop_maps()
            added = sum(m.nbytes for i, m in maps.items() if i not in self._maps)
            if self.map_bytes + added > self.map_cache_limit:
                return False
            self._maps.update(maps)
            self._maps_format, self._maps_layers = map_format, layers
            return True
