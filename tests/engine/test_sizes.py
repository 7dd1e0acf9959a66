"""Edits at the input's size: an aspect-keeping working size, results resized back (API, CLI, gRPC)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from fpedit import EditOptions, InvalidInputError
from fpedit.cli import main, parse_output_size
from fpedit.engine.images import working_size

STEPS = 2


def aspect_error(size: tuple[int, int], original: tuple[int, int]) -> float:
    """How far a size's aspect ratio is from the original's, as a fraction (0.05 = 5 %)."""
    return math.exp(abs(math.log((size[0] / size[1]) / (original[0] / original[1])))) - 1


def expected_working_size(width: int, height: int, max_side: int = 1024) -> tuple[int, int]:
    """The policy written out by brute force: among all sizes with sides multiples of 64 within max_side, the
    one with the smallest longer side (at least the input's, scaled to fit and rounded) whose aspect ratio
    is within 5 % of the input's; if none is, the closest ratio."""
    long_in = max(width, height)
    fitted = max(64, round(long_in * min(1.0, max_side / long_in) / 64) * 64)
    sides = range(64, max_side // 64 * 64 + 1, 64)
    same_orientation = [
        (w, h) for w in sides for h in sides if (w >= h) == (width >= height) and max(w, h) >= fitted
    ]
    within = [s for s in same_orientation if aspect_error(s, (width, height)) <= 0.05 + 1e-9]
    if within:
        smallest = min(max(s) for s in within)
        return min((s for s in within if max(s) == smallest), key=lambda s: aspect_error(s, (width, height)))
    return min(same_orientation, key=lambda s: (aspect_error(s, (width, height)), max(s)))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((128, 96), (256, 192)),  # was 128x128: stretched by a third
        ((96, 128), (192, 256)),
        ((100, 70), (192, 128)),  # was 128x64
        ((500, 375), (512, 384)),
        ((4000, 3000), (1024, 768)),
        ((1920, 1080), (1024, 576)),
        ((128, 64), (128, 64)),  # multiples of 64 within max_side: as they are
        ((512, 512), (512, 512)),
    ],
)
def test_working_size_keeps_the_aspect_ratio(size, expected):
    got = working_size(*size)
    assert got == expected
    assert got[0] % 64 == 0 and got[1] % 64 == 0 and max(got) <= 1024
    assert aspect_error(got, size) <= 0.05 + 1e-9


@pytest.mark.parametrize(
    "size",
    [(300, 200), (640, 360), (3000, 2000), (1080, 1350), (70, 100), (1000, 999), (333, 65), (2000, 100)],
)
def test_working_size_is_the_smallest_that_keeps_the_ratio(size):
    assert working_size(*size) == expected_working_size(*size)


def test_api_returns_the_input_size_by_default(engine):
    image = make_image(128, 96, seed=3)
    options = EditOptions(steps=STEPS)
    inversion = engine.invert(image, options=options)
    assert inversion.size == (256, 192) and inversion.input_size == (128, 96)
    assert inversion.latent_hw == (24, 32)  # 4:3 kept in latent space

    working = engine.edit_real(inversion, "a red car", options=options, output_size="working")
    assert working.edited_image.size == (256, 192) and working.reconstruction_image.size == (256, 192)
    assert working.edited_latents.shape == (1, 4, 24, 32)

    default = engine.edit_real(inversion, "a red car", options=options)
    assert default.edited_image.size == (128, 96) and default.reconstruction_image.size == (128, 96)
    assert default.stats["size"] == [256, 192] and default.stats["output_size"] == [128, 96]
    # The returned image is the working-size edit resampled to the input's size, nothing else.
    resized = working.edited_image.resize((128, 96), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(default.edited_image, np.int16) - np.asarray(resized, np.int16)).max() <= 1

    explicit = engine.edit_real(inversion, "a red car", options=options, output_size=(64, 40))
    assert explicit.edited_image.size == (64, 40)


def test_api_portrait_image_in_one_call(engine):
    result = engine.edit_real(make_image(70, 100), "a red car", options=EditOptions(steps=STEPS))
    assert result.edited_image.size == (70, 100) and result.reconstruction_image.size == (70, 100)
    assert result.edited_latents.shape == (1, 4, 24, 16)  # edited at 128x192


@pytest.mark.parametrize("bad", ["big", "", (0, 5), (10, -1), (1.5, 2), (10**5, 10**5), "640x480", (1, 2, 3)])
def test_bad_output_size_is_refused_before_any_work(engine, bad):
    before = engine.counters()["unet_calls"]
    with pytest.raises(InvalidInputError, match=r"^output_size"):
        engine.edit_real(make_image(64, 64), "a red car", options=EditOptions(steps=STEPS), output_size=bad)
    assert engine.counters()["unet_calls"] == before


def test_parse_size_flag():
    assert parse_output_size("input") == "input"
    assert parse_output_size("Working") == "working"
    assert parse_output_size("640x480") == (640, 480)
    for bad in ("0x4", "64", "axb", "64x", "-1x5"):
        with pytest.raises(Exception, match="WIDTHxHEIGHT"):
            parse_output_size(bad)


def test_cli_writes_the_input_size_unless_told(tmp_path, model_dir, capsys):
    src = tmp_path / "in.png"
    make_image(130, 66).save(src)  # edited at 128x64
    common = ["--model", str(model_dir), "--steps", str(STEPS), "--no-progress"]
    assert main(["edit", str(src), "-p", "a red car", "-o", str(tmp_path / "a.png"), *common]) == 0
    assert Image.open(tmp_path / "a.png").size == (130, 66)
    out, rec = tmp_path / "w.png", tmp_path / "r.png"
    argv = ["edit", str(src), "-p", "a red car", "-o", str(out), "--reconstruction", str(rec)]
    assert main([*argv, "--size", "working", *common]) == 0
    assert Image.open(out).size == (128, 64) and Image.open(rec).size == (128, 64)
    capsys.readouterr()


def test_service_returns_the_input_size(model_dir):
    from fpedit import EditEngine
    from fpedit.server.app import build_server
    from fpedit.server.client import EditClient, edit_options
    from fpedit.server.service import ServerConfig

    buf = io.BytesIO()
    make_image(100, 70).save(buf, format="PNG")
    server = build_server(EditEngine.from_pretrained(model_dir), ServerConfig(port=0, workers=1, max_queue=4))
    try:
        with EditClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            first = client.edit("a red car", image=buf.getvalue(), options=edit_options(steps=STEPS))
            again = client.edit(
                "a blue car", inversion_id=first.inversion_id, options=edit_options(steps=STEPS)
            )
            inverted = client.invert(buf.getvalue(), options=edit_options(steps=STEPS))
    finally:
        server.drain(5)
    for response in (first, again):
        assert (response.width, response.height) == (100, 70)
        assert Image.open(io.BytesIO(response.edited_image)).size == (100, 70)
        assert Image.open(io.BytesIO(response.reconstruction_image)).size == (100, 70)
    assert (inverted.width, inverted.height) == (192, 128)  # Invert reports the working size


def test_ray_store_records_keep_the_input_size(engine):
    """A replica that restores an inversion from the shared store still returns the input's size."""
    from fpedit.server.ray.store import inversion_from_record, record_from_inversion

    inversion = engine.invert(make_image(130, 66), options=EditOptions(steps=STEPS))
    restored = inversion_from_record(engine, record_from_inversion(inversion, "fingerprint"))
    assert restored.size == (128, 64) and restored.input_size == (130, 66)
    result = engine.edit_real(restored, "a red car", options=EditOptions(steps=STEPS))
    assert result.edited_image.size == (130, 66)
