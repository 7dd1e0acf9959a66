"""Shared fixtures: small SD 1.x-shaped checkpoints written to disk in diffusers layout, and test images."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fpedit import EditEngine
from fpedit.engine.tiny import save_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The tiny SD 1.x topology at small widths, seeded, saved as safetensors in diffusers layout."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "sd1-tiny", seed=7)


@pytest.fixture(scope="session")
def engine(model_dir) -> EditEngine:
    return EditEngine.from_pretrained(model_dir, backend="torch", device="cpu")


@pytest.fixture(scope="session")
def raw_modules(model_dir):
    """The same checkpoint loaded with diffusers/transformers directly, for the reference implementation."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "unet": UNet2DConditionModel.from_pretrained(model_dir / "unet").eval(),
        "vae": AutoencoderKL.from_pretrained(model_dir / "vae").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
    }


@pytest.fixture(scope="session")
def reference(raw_modules):
    from reference import ReferenceFPE

    mods = {k: copy.deepcopy(v) for k, v in raw_modules.items()}
    return ReferenceFPE(mods["unet"], mods["vae"], mods["text_encoder"], mods["tokenizer"])


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


@pytest.fixture
def image() -> Image.Image:
    return make_image()
