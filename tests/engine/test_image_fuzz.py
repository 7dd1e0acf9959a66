"""The image decoder under damaged input: every file either decodes or raises InvalidInputError."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from fpedit.engine.errors import InvalidInputError
from fpedit.engine.images import load_image

FORMATS = ("PNG", "JPEG", "WEBP")
MUTANTS_PER_FORMAT = 120


def _exif(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    exif[0x010F] = "fpedit-test"  # Make
    return exif


def _encode(fmt: str, exif: bytes | Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    make_image(64, 48, seed=4).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: flip bytes, overwrite a run, truncate, duplicate a slice, insert random bytes."""
    buf = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        start = rng.randrange(len(buf))
        for i in range(start, min(len(buf), start + rng.randint(1, 32))):
            buf[i] = rng.randrange(256)
    elif kind == 2:
        del buf[rng.randrange(1, len(buf)) :]
    elif kind == 3:
        start = rng.randrange(len(buf))
        piece = buf[start : start + rng.randint(1, 64)]
        at = rng.randrange(len(buf))
        buf[at:at] = piece
    else:
        at = rng.randrange(len(buf))
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(buf)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_files_decode_or_raise_invalid_input(fmt):
    rng = random.Random(f"fpedit-fuzz-{fmt}")
    seeds = [_encode(fmt), _encode(fmt, exif=_exif())]
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(MUTANTS_PER_FORMAT):
        data = _mutate(seeds[i % 2], rng)
        try:
            image = load_image(data, max_input_pixels=1 << 20, formats=FORMATS)
        except InvalidInputError as exc:
            assert exc.field == "image"
            assert " at 0x" not in str(exc), str(exc)  # no heap addresses in what a client reads
            outcomes["refused"] += 1
        else:
            assert image.mode == "RGB" and min(image.size) >= 8
            outcomes["decoded"] += 1
    # Both outcomes happen: the mutations are neither all harmless nor all fatal.
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0, outcomes


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_garbage_exif_block_is_ignored(fmt):
    """An EXIF block that is not EXIF at all: the pixels are used as stored."""
    data = _encode(fmt, exif=b"garbage!")
    image = load_image(data)
    assert image.size == (64, 48)


def test_readable_exif_orientation_still_rotates():
    """Ignoring unreadable EXIF must not lose the orientation of readable EXIF (6 = rotate 90 clockwise)."""
    data = _encode("JPEG", exif=_exif(6))
    image = load_image(data)
    assert image.size == (48, 64)


def test_decode_errors_name_no_addresses_and_bombs_name_our_limit():
    with pytest.raises(InvalidInputError) as info:
        load_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert " at 0x" not in str(info.value) and "image" in str(info.value)
    big = io.BytesIO()
    Image.new("L", (4000, 4000)).save(big, format="PNG")
    with pytest.raises(InvalidInputError, match="limit of 1000000 pixels"):
        load_image(big.getvalue(), max_input_pixels=1_000_000)
    # Pillow's own guards (a warning above Image.MAX_IMAGE_PIXELS, an error above twice that) must not
    # replace our message and limit.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000
    try:
        warned = io.BytesIO()
        Image.new("L", (1100, 1100)).save(warned, format="PNG")
        for data in (warned.getvalue(), big.getvalue()):  # 1.21 MP (warning), 16 MP (error)
            with pytest.raises(InvalidInputError) as info:
                load_image(data, max_input_pixels=1_200_000)
            message = str(info.value)
            assert "limit of 1200000 pixels" in message and "DOS" not in message, message
        assert load_image(warned.getvalue(), max_input_pixels=2_000_000).size == (1100, 1100)
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_truncated_image_is_refused_not_half_decoded():
    data = _encode("PNG")
    with pytest.raises(InvalidInputError, match="image"):
        load_image(data[: len(data) // 2])
    assert np.asarray(load_image(data)).shape == (48, 64, 3)
