"""``EditEngine.attention_maps`` and ``fpedit maps``: shapes, per-token maps that differ, the generated image
equal to the engine's own generation, the serving processors untouched, readable pictures."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from fpedit.cli import main
from fpedit.engine import EditOptions


def test_generated_maps_shapes_tokens_and_image(engine):
    before = dict(engine.backend._unet.attn_processors)
    result = engine.attention_maps("a red cat", seed=3, steps=2, resolution=4, components=3)
    ids = engine.tokenizer("a red cat").input_ids
    assert result.tokens == [t.replace("</w>", "") for t in engine.tokenizer.convert_ids_to_tokens(ids[1:-1])]
    n = len(ids) - 2
    layers = [layer.index for layer in engine.spec.layers if layer.downsample == 2]  # 8x8 latent -> 4x4
    assert result.layers == layers
    assert result.cross_attention.shape == (n, 4, 4)
    assert result.self_attention_components.shape == (len(layers), 3, 4, 4)
    # Probabilities over the 77 context tokens: the prompt's share is positive and below 1 everywhere.
    total = result.cross_attention.sum(axis=0)
    assert np.all(total > 0) and np.all(total < 1)
    # Maps of different tokens differ (beyond rounding), relative to their size.
    a, b = result.cross_attention[0], result.cross_attention[2]
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
    # SVD components are unit vectors, mutually orthogonal.
    flat = result.self_attention_components[0].reshape(3, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(3), atol=1e-5)
    # The image is the engine's own generation of the prompt with that seed (a plain source branch).
    reference = engine.edit_generated("a red cat", "a red cat", options=EditOptions(steps=2), seed=3)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(reference.source_image))
    assert dict(engine.backend._unet.attn_processors) == before


def test_real_image_maps_and_bad_resolution(engine):
    result = engine.attention_maps("a disc", image=make_image(64, 64), steps=2, resolution=4, components=2)
    assert result.cross_attention.shape == (len(result.tokens), 4, 4)
    assert result.self_attention_components.shape[1:] == (2, 4, 4)
    from fpedit.engine.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="resolution"):
        engine.attention_maps("a disc", steps=2, resolution=5)


def test_maps_cli_writes_npz_and_readable_pictures(model_dir, tmp_path):
    out = tmp_path / "maps"
    argv = [
        "maps",
        "-p",
        "a white horse",
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--resolution",
        "4",
        "--components",
        "4",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    data = np.load(out / "maps.npz")
    tokens = list(data["tokens"])
    assert data["cross_attention"].shape == (len(tokens), 4, 4)
    assert data["self_attention_components"].shape == (len(data["layers"]), 4, 4, 4)
    for name in ("cross_attention.png", "self_attention.png"):
        with Image.open(out / name) as picture:
            assert picture.width > 100 and picture.height > 100
            assert np.asarray(picture.convert("L")).std() > 10  # not blank
