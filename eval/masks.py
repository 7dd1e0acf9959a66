"""Edit masks: PIE-Bench's run-length encoding or a mask image, as 0/1 arrays at an image's size.

1 marks the edited region; the background ("unedit part") is where the mask is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fpedit.engine.errors import InvalidInputError

#: PIE-Bench annotates masks on its 512x512 images.
PIE_MASK_SIZE = 512


def decode_rle(encoded: Sequence[int], size: int = PIE_MASK_SIZE) -> np.ndarray:
    """PIE-Bench's mask encoding: flat (start, length) pairs over a ``size`` x ``size`` row-major grid.

    Runs are clipped at the end of the grid and the one-pixel border is set to 1, as PIE-Bench's evaluation
    does (its annotations are unreliable there), so numbers stay comparable with its tables.
    """
    values = [int(v) for v in encoded]
    if len(values) % 2:
        raise InvalidInputError(
            "mask", f"run-length mask needs (start, length) pairs, got {len(values)} numbers"
        )
    total = size * size
    flat = np.zeros(total, dtype=np.uint8)
    for start, length in zip(values[0::2], values[1::2], strict=True):
        if start < 0 or length < 0:
            raise InvalidInputError("mask", f"run ({start}, {length}) is negative")
        flat[start : min(start + length, total)] = 1
    mask = flat.reshape(size, size)
    mask[0, :] = mask[-1, :] = 1
    mask[:, 0] = mask[:, -1] = 1
    return mask


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` at ``size`` (width, height), nearest neighbour so it stays 0/1."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    image = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    return (np.asarray(image.resize(tuple(size), Image.NEAREST)) > 127).astype(np.uint8)


def load_mask_image(path: str | Path, flag: str = "--mask") -> np.ndarray:
    """A mask picture (white = edited): grey levels above 127 count as 1."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(flag, f"no such file: {path}")
    try:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"))
    except OSError as exc:
        raise InvalidInputError(flag, f"{path} is not a readable image ({exc})") from None
    return (grey > 127).astype(np.uint8)
