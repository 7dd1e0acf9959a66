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
    edit it is the image the source prompt produced and ``reconstruction_image`` is ``None``.
    """

    source_image: Image.Image
    edited_image: Image.Image
    source_latents: np.ndarray
    edited_latents: np.ndarray
    options: EditOptions
    stats: dict[str, Any]
    reconstruction_image: Image.Image | None = None
    inversion: Inversion | None = None


@dataclass
class Inversion:
    """A DDIM-inverted image: the whole trajectory and, once an edit computed them, the source's maps.

    ``trajectory[k]`` is z_k for k = 0..steps (``trajectory[0]`` the encoded image, ``trajectory[steps]``
    the start of the edit). Edits of the same inversion with other prompts reuse it, and reuse the cached
    source maps when their window, layers and format are covered, running the target branch alone.
    """

    trajectory: torch.Tensor  # (steps + 1, C, h, w) float32 on the engine's device
    steps: int
    image: Image.Image  # the image at its working size
    engine_id: str
    stats: dict[str, Any]
    map_cache_limit: int
    _maps: dict[int, AttentionMaps] = field(default_factory=dict, repr=False)
    _maps_format: str | None = field(default=None, repr=False)
    _maps_layers: frozenset[int] = field(default_factory=frozenset, repr=False)
    _reconstruction: Image.Image | None = field(default=None, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def latent_hw(self) -> tuple[int, int]:
        return int(self.trajectory.shape[-2]), int(self.trajectory.shape[-1])

    def latent(self, k: int) -> torch.Tensor:
        """z_k with a batch axis: (1, C, h, w)."""
        return self.trajectory[k : k + 1]

    @property
    def map_bytes(self) -> int:
        return sum(m.nbytes for m in self._maps.values())

    @property
    def nbytes(self) -> int:
        """Memory held: trajectory plus cached maps (the image and its reconstruction are small)."""
        return self.trajectory.numel() * self.trajectory.element_size() + self.map_bytes

    def drop_maps(self) -> None:
        with self.lock:
            self._maps.clear()
            self._maps_format, self._maps_layers = None, frozenset()

    def cached_maps(self, map_format: str, layers: frozenset[int]) -> dict[int, AttentionMaps]:
        """Cached maps usable for a request (same format, a superset of its layers); empties a stale cache."""
        if self._maps and (self._maps_format != map_format or not layers <= self._maps_layers):
            self.drop_maps()
        return self._maps

    def store_maps(self, map_format: str, layers: frozenset[int], maps: dict[int, AttentionMaps]) -> bool:
        """Keep maps for later edits if they fit in the cache budget; returns whether they were kept."""
        if self._maps and (self._maps_format != map_format or self._maps_layers != layers):
            self.drop_maps()
        added = sum(m.nbytes for i, m in maps.items() if i not in self._maps)
        if self.map_bytes + added > self.map_cache_limit:
            return False
        self._maps.update(maps)
        self._maps_format, self._maps_layers = map_format, layers
        return True
