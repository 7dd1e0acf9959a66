"""Figure 3 as files: ``cross_attention.png`` (a heatmap per prompt token over the image, the token under it)
and ``self_attention.png`` (the top SVD components of each layer's self-attention map)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fpedit.engine.errors import FpeditError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise FpeditError("pictures need matplotlib: pip install 'fpedit[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit(x: np.ndarray) -> np.ndarray:
    span = float(x.max() - x.min())
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def save_cross_attention(result: Any, path: Path) -> Path:
    """The image, then one panel per token: its map (normalised, bilinear-upsampled) over the image."""
    plt = _pyplot()
    image = np.asarray(result.image.convert("RGB"))
    n = len(result.tokens)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.6 * (n + 1), 2.0), squeeze=False)
    axes[0][0].imshow(image)
    axes[0][0].set_xlabel("image", fontsize=9)
    for i, token in enumerate(result.tokens):
        heat = Image.fromarray((_unit(result.cross_attention[i]) * 255).astype(np.uint8))
        heat = np.asarray(heat.resize(result.image.size, Image.BILINEAR)) / 255.0
        ax = axes[0][i + 1]
        ax.imshow(image, alpha=0.45)
        ax.imshow(heat, cmap="jet", alpha=0.55, vmin=0, vmax=1)
        ax.set_xlabel(token, fontsize=10)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_self_attention(result: Any, path: Path) -> Path:
    """A row per self-attention layer, a column per component (each normalised to its own range)."""
    plt = _pyplot()
    maps = result.self_attention_components
    layers, k = maps.shape[:2]
    fig, axes = plt.subplots(layers, k, figsize=(1.4 * k, 1.5 * layers), squeeze=False)
    for r in range(layers):
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(_unit(maps[r, c]), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"component {c + 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {result.layers[r]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
