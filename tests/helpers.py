"""Helpers shared by the test modules: the structured test image, its encodings and its pixels.

Fixtures live in conftest.py; plain functions live here so that a test module imports them by name.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def make_image(width: int = 128, height: int = 128, seed: int = 0) -> Image.Image:
    """A structured RGB test image: gradients, a disc and a bar, plus mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = np.full_like(x, 80.0)
    disc = (x - width * 0.4) ** 2 + (y - height * 0.55) ** 2 < (min(width, height) * 0.22) ** 2
    bar = (np.abs(x - width * 0.75) < width * 0.06) & (y > height * 0.2)
    rgb = np.stack([r, g, b], axis=-1)
    rgb[disc] = (230, 40, 40)
    rgb[bar] = (20, 20, 200)
    rgb += rng.normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image | None = None, **save_args) -> bytes:
    """``image`` (default: a 64x64 test image) encoded as PNG, as a client would send it."""
    buf = io.BytesIO()
    (image if image is not None else make_image(64, 64)).save(buf, format="PNG", **save_args)
    return buf.getvalue()


def decoded_pixels(data: bytes | Image.Image) -> np.ndarray:
    """RGB pixels of encoded image bytes (or an image) as int16, so differences do not wrap around."""
    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def model_input(image: Image.Image) -> torch.Tensor:
    """An RGB image as the VAE's input, (1, 3, H, W) in [-1, 1], computed here rather than by the engine."""
    arr = np.asarray(image, dtype=np.float64) / 127.5 - 1.0
    return torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1)[None]


#: Relative L2 allowed between two computations of the same edit whose UNet calls batch rows differently (a
#: re-edit reusing maps captured in a call of another batch size, cross-request batching, batched capture).
#: CPU kernels pick blockings by batch shape, and CPUs differ, so such runs agree only up to float rounding:
#: 3.3e-6 measured (re-edit of tests/test_real.py) on two machines. Each test using it also shows that a
#: deliberately wrong computation (maps of another step, no injection) misses by >= 10x this.
BATCH_SHAPE_TOL = 1e-4
