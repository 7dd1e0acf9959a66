"""Every bad input of the engine API raises ValueError (InvalidInputError) naming the field."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from fpedit import EditOptions, InvalidInputError
from fpedit.engine.images import load_image, prepare_image, working_size


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"steps": 100000}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": math.inf}, "guidance_scale"),
        ({"replace_window": (0.8, 0.2)}, "replace_window"),
        ({"replace_window": (-0.1, 0.5)}, "replace_window"),
        ({"replace_window": (0.0, 1.5)}, "replace_window"),
        ({"replace_window": (0.0,)}, "replace_window"),
        ({"replace_window": (0.0, math.nan)}, "replace_window"),
        ({"layers": (0, 4)}, "layers"),
        ({"layers": (17,)}, "layers"),
        ({"layers": (99,)}, "layers"),
        ({"layers": (4.5,)}, "layers"),
        ({"layers": "all"}, "layers"),
        ({"map_format": "keys"}, "map_format"),
    ],
)
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        EditOptions(**kwargs)
    assert isinstance(info.value, InvalidInputError)
    assert info.value.field == field


def test_good_options_normalise():
    opts = EditOptions(steps=10, layers=[14, 4, 4, 5], replace_window=[0, 1])
    assert opts.layers == (4, 5, 14)
    assert opts.replace_window == (0.0, 1.0)
    assert list(opts.replaced_steps()) == list(range(10))
    assert list(EditOptions(steps=50).replaced_steps()) == list(range(40))
    assert list(EditOptions(steps=10, replace_window=(0.4, 0.8)).replaced_steps()) == [4, 5, 6, 7]
    assert EditOptions(layers=(1, 16)).layers == (1, 16)


def test_layer_outside_range_is_refused_by_engine_calls(engine):
    with pytest.raises(ValueError, match="layers"):
        engine.edit_generated("a", "b", seed=0, options=EditOptions(layers=(99,)))


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_empty_target_prompt(engine, image, prompt):
    with pytest.raises(InvalidInputError, match="target_prompt"):
        engine.edit_real(image, prompt, options=EditOptions(steps=2))
    with pytest.raises(InvalidInputError, match="target_prompt"):
        engine.edit_generated("a cat", prompt, seed=0, options=EditOptions(steps=2))


def test_long_prompt_is_truncated_with_a_warning(engine):
    long_prompt = "a very long prompt " * 40
    with pytest.warns(UserWarning, match="truncated"):
        result = engine.edit_generated(
            "a cat", long_prompt, seed=0, height=64, width=64, options=EditOptions(steps=2)
        )
    assert result.edited_latents.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_image_bytes_are_refused(engine, data):
    with pytest.raises(InvalidInputError, match="image"):
        engine.edit_real(data, "a red car", options=EditOptions(steps=2))


def test_truncated_png_is_refused(engine):
    buf = io.BytesIO()
    make_image().save(buf, format="PNG")
    with pytest.raises(InvalidInputError, match="image"):
        engine.invert(buf.getvalue()[: len(buf.getvalue()) // 2], options=EditOptions(steps=2))


def test_missing_file_and_wrong_types(engine, tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        engine.invert(tmp_path / "missing.png", options=EditOptions(steps=2))
    with pytest.raises(InvalidInputError, match="image"):
        engine.invert(12345, options=EditOptions(steps=2))
    with pytest.raises(InvalidInputError, match="image"):
        engine.invert(np.zeros((8, 8, 3), dtype=np.float32), options=EditOptions(steps=2))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK", "I;16", "1"])
def test_other_modes_are_converted(mode):
    img = make_image(64, 64).convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (64, 64)


def test_rgba_transparency_composites_on_white():
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    assert load_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_encoded_formats_decode(tmp_path):
    img = make_image(96, 80)
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        assert load_image(buf.getvalue()).size == (96, 80)
        path = tmp_path / f"x.{fmt.lower()}"
        img.save(path)
        assert load_image(path).size == (96, 80)


def test_pixel_cap_and_tiny_images():
    with pytest.raises(InvalidInputError, match="exceeds"):
        load_image(Image.new("RGB", (2000, 2000)), max_input_pixels=1000 * 1000)
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InvalidInputError, match="exceeds"):
            load_image(buf.getvalue(), max_input_pixels=4096 * 4096)
    with pytest.raises(InvalidInputError, match="too small"):
        load_image(Image.new("RGB", (4, 100)))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((512, 512), (512, 512)),
        ((128, 64), (128, 64)),
        ((500, 375), (512, 384)),
        ((4000, 3000), (1024, 768)),
        ((1088, 1088), (1024, 1024)),
        ((30, 30), (64, 64)),
    ],
)
def test_resize_policy(size, expected):
    assert working_size(*size) == expected
    assert prepare_image(Image.new("RGB", size)).size == expected


def test_odd_sized_image_edits_at_working_size(engine):
    img = make_image(100, 70)
    result = engine.edit_real(img, "a red car", options=EditOptions(steps=2))
    assert result.edited_image.size == (100, 70)  # returned at the input's size
    assert result.edited_latents.shape == (1, 4, 16, 24)  # edited at 192x128: 1.5 against 100/70 = 1.43


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"seed": 0, "height": 100}, "height"),
        ({"seed": 0, "width": 0}, "width"),
        ({"seed": 0, "width": 4096}, "width"),
        ({"latents": np.zeros((1, 3, 8, 8), np.float32)}, "latents"),
        ({"latents": np.full((1, 4, 8, 8), np.nan, np.float32)}, "latents"),
    ],
)
def test_bad_generation_arguments(engine, kwargs, field):
    with pytest.raises(InvalidInputError, match=field):
        engine.edit_generated("a cat", "a dog", options=EditOptions(steps=2), **kwargs)
