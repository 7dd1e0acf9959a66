"""Local blending (issue 27) against the reference's independent implementation (tests/reference.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from reference import reference_blend_edit, reference_user_mask, reference_word_tokens, rel_l2

from fpedit import EditEngine, EditOptions
from fpedit.engine.blend import Blend
from fpedit.engine.errors import InvalidInputError
from fpedit.engine.local_blend import word_positions

STEPS, G, WINDOW, LAYERS = 8, 7.5, (0.0, 0.5), tuple(range(4, 15))
TOL_REAL, TOL_GEN = 3e-3, 1e-4  # as tests/engine/test_real.py and tests/engine/test_generated.py
TARGET = "a red car"


def rect_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """A black image with a white rectangle (left, top, right, bottom)."""
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[box[1] : box[3], box[0] : box[2]] = 255
    return Image.fromarray(arr)


def options(blend: Blend | None) -> EditOptions:
    return EditOptions(steps=STEPS, guidance_scale=G, replace_window=WINDOW, layers=LAYERS, blend=blend)


@pytest.fixture(scope="module")
def inversion(engine, image):
    return engine.invert(image, options=EditOptions(steps=STEPS, guidance_scale=G))


@pytest.fixture(scope="module")
def image():
    from helpers import make_image

    return make_image()


def check_variants_miss(engine, inversion, prompt, blend, reference_latent, tol):
    """The comparison can fail: the same edit without the blend, and with the blend one step late, miss the
    reference by >= 10x the tolerance."""
    off = engine.edit_real(inversion, prompt, options=options(None))
    assert rel_l2(off.edited_latents, reference_latent) >= 10 * tol
    late = Blend(
        blend.mask, blend.mask_grow, blend.words, (blend.start_step(STEPS) + 1) / STEPS, blend.threshold
    )
    assert late.start_step(STEPS) == blend.start_step(STEPS) + 1
    late_result = engine.edit_real(inversion, prompt, options=options(late))
    assert rel_l2(late_result.edited_latents, reference_latent) >= 10 * tol


def check_real_blend(engine, inversion, prompt, blend, result, reference_latent) -> None:
    """A real edit with ``blend`` against the reference: within the tolerance of its latent, the inversion's
    z_0 bit for bit outside the mask (the guarantee), and the variants without it miss."""
    assert rel_l2(result.edited_latents, reference_latent) < TOL_REAL
    outside = ~result.blend_mask
    z0 = inversion.latent(0).cpu().numpy()
    np.testing.assert_array_equal(result.edited_latents[..., outside], z0[..., outside])
    check_variants_miss(engine, inversion, prompt, blend, reference_latent, TOL_REAL)


def test_user_mask_real_ddim_matches_reference(engine, reference, inversion, image):
    # Another size than the image's 128x128 (resized like the image), grown by one cell.
    mask = rect_mask((96, 80), (20, 10, 60, 50))
    blend = Blend(mask=mask, mask_grow=1, start=0.25)
    result = engine.edit_real(inversion, TARGET, options=options(blend))
    expected_mask = reference_user_mask(mask, (128, 128), grow=1)
    assert 0 < expected_mask.sum() < expected_mask.size
    np.testing.assert_array_equal(result.blend_mask, expected_mask)
    traj = list(inversion.trajectory[:, None].cpu())  # the inversion is the input here (tested in test_real)
    ref_tgt, ref_mask = reference_blend_edit(
        reference, z_T=traj[STEPS], source_prompt="", target_prompt=TARGET, steps=STEPS, guidance=G,
        window=WINDOW, layers=LAYERS, start=2, user=expected_mask, traj=traj,
    )  # fmt: skip
    np.testing.assert_array_equal(ref_mask, expected_mask)
    check_real_blend(engine, inversion, TARGET, blend, result, ref_tgt)
    inside = result.blend_mask
    z0 = inversion.latent(0).cpu().numpy()
    assert not np.array_equal(result.edited_latents[..., inside], z0[..., inside])


# The tiny test model's cross-attention is nearly flat (its weights are seeded noise): a word's normalised
# map spans about 0.9..1, so the word tests threshold close to 1 and check that the mask is neither empty
# nor everything, or they would test nothing.
WORD_THRESHOLD = 0.97


def test_word_mask_real_ddim_matches_reference(engine, reference, inversion):
    blend = Blend(words=("car",), start=0.25, threshold=WORD_THRESHOLD)
    result = engine.edit_real(inversion, TARGET, options=options(blend))
    traj = list(inversion.trajectory[:, None].cpu())
    ref_tgt, ref_mask = reference_blend_edit(
        reference, z_T=traj[STEPS], source_prompt="", target_prompt=TARGET, steps=STEPS, guidance=G,
        window=WINDOW, layers=LAYERS, start=2, words=("car",), threshold=WORD_THRESHOLD, traj=traj,
    )  # fmt: skip
    assert 0 < ref_mask.sum() < ref_mask.size
    np.testing.assert_array_equal(result.blend_mask, ref_mask)
    check_real_blend(engine, inversion, TARGET, blend, result, ref_tgt)


SOURCE, NULL_TARGET = "a photo of a disc", "a photo of a car"


def test_null_text_user_and_word_masks_match_reference(engine, reference, image):
    inv = engine.invert(
        image, options=EditOptions(steps=STEPS, guidance_scale=G), method="null-text", source_prompt=SOURCE,
        null_text_steps=2,
    )  # fmt: skip
    mask = rect_mask((128, 128), (0, 0, 32, 32))
    blend = Blend(mask=mask, words=("disc", "car"), start=0.25, threshold=0.99)
    result = engine.edit_real(inv, NULL_TARGET, options=options(blend))
    traj = list(inv.trajectory[:, None].cpu())
    user = reference_user_mask(mask, (128, 128))
    ref_tgt, ref_mask = reference_blend_edit(
        reference, z_T=traj[STEPS], source_prompt=SOURCE, target_prompt=NULL_TARGET, steps=STEPS,
        guidance=G, window=WINDOW, layers=LAYERS, start=2, user=user, words=("disc", "car"),
        threshold=0.99, traj=traj, nulls=inv.null_embeddings.cpu(),
    )  # fmt: skip
    assert 0 < ref_mask.sum() < ref_mask.size and (ref_mask & ~user).any()  # the words added cells
    np.testing.assert_array_equal(result.blend_mask, ref_mask)
    check_real_blend(engine, inv, NULL_TARGET, blend, result, ref_tgt)
    # A re-edit with other words reuses the source's cross-attention kept on the inversion.
    again = engine.edit_real(inv, NULL_TARGET, options=options(Blend(words=("disc",), threshold=0.99)))
    assert again.stats["unet_rows"] == 2 * STEPS
    assert not np.array_equal(again.blend_mask, result.blend_mask)


@pytest.fixture(scope="module")
def engines(model_dir):
    """Batching on, and a max batch of 3 rows: a replaced step then runs as capture and inject calls."""
    batching = EditEngine.from_pretrained(model_dir, batching=True)
    piped = EditEngine.from_pretrained(model_dir, backend_options={"max_batch": 3})
    yield {"batching": batching, "piped": piped}
    batching.close()


GEN_TARGET = "a green car in snow"


@pytest.mark.parametrize("which", ["plain", "batching", "piped"])
def test_generated_word_and_user_mask_match_reference(engine, engines, reference, which):
    chosen = engine if which == "plain" else engines[which]
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    mask = rect_mask((128, 128), (0, 0, 40, 128))
    blend = Blend(mask=mask, words=("car", "disc"), start=0.25, threshold=0.99)
    result = chosen.edit_generated(SOURCE, GEN_TARGET, latents=z, options=options(blend))
    ref_tgt, ref_mask = reference_blend_edit(
        reference, z_T=z, source_prompt=SOURCE, target_prompt=GEN_TARGET, steps=STEPS, guidance=G,
        window=WINDOW, layers=LAYERS, start=2, user=reference_user_mask(mask, (128, 128)),
        words=("car", "disc"), threshold=0.99,
    )  # fmt: skip
    assert 0 < ref_mask.sum() < ref_mask.size
    np.testing.assert_array_equal(result.blend_mask, ref_mask)
    assert rel_l2(result.edited_latents, ref_tgt) < TOL_GEN
    outside = ~result.blend_mask
    np.testing.assert_array_equal(result.edited_latents[..., outside], result.source_latents[..., outside])
    if which == "plain":  # the comparison can fail: no blend, or one step late, misses by >= 10x
        off = engine.edit_generated(SOURCE, GEN_TARGET, latents=z, options=options(None))
        assert rel_l2(off.edited_latents, ref_tgt) >= 10 * TOL_GEN
        late = engine.edit_generated(
            SOURCE, GEN_TARGET, latents=z, options=options(Blend(mask, 0, blend.words, 3 / STEPS, 0.99))
        )
        assert rel_l2(late.edited_latents, ref_tgt) >= 10 * TOL_GEN


def test_word_tokens_agree_with_the_reference_and_skip_inner_matches(engine):
    tok = engine.tokenizer
    for prompt, word in [
        (TARGET, "car"),
        (SOURCE, "disc"),
        ("a cat at a mat", "at"),
        ("a cat at a mat", "a"),
    ]:
        assert word_positions(tok, prompt, word, 77) == reference_word_tokens(tok, prompt, word), (
            prompt,
            word,
        )
    assert word_positions(tok, "a cat", "at", 77) == []


def test_no_blend_is_bit_for_bit_todays_edit(engine, inversion):
    """A Blend that never starts (start 1.0) leaves the edit as without one: the cross-attention outputs
    and the blend bookkeeping change nothing else."""
    plain = engine.edit_real(inversion, TARGET, options=options(None))
    never = engine.edit_real(inversion, TARGET, options=options(Blend(words=("car",), start=1.0)))
    np.testing.assert_array_equal(plain.edited_latents, never.edited_latents)
    assert plain.blend_mask is None and not never.blend_mask.any()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "mask"),
        ({"mask": 3}, "mask"),
        ({"mask": b""}, "mask"),
        ({"words": ("car",), "mask_grow": 1}, "mask_grow"),
        ({"mask": b"x", "mask_grow": -1}, "mask_grow"),
        ({"mask": b"x", "mask_grow": 1.5}, "mask_grow"),
        ({"words": "car"}, "blend_words"),
        ({"words": ("",)}, "blend_words"),
        ({"words": ("car",), "start": 1.5}, "blend_start"),
        ({"words": ("car",), "start": True}, "blend_start"),
        ({"words": ("car",), "threshold": -0.1}, "blend_threshold"),
        ({"words": ("car",), "threshold": "0.3"}, "blend_threshold"),
    ],
)
def test_bad_blend_options_name_the_field(kwargs, field):
    with pytest.raises(InvalidInputError) as err:
        Blend(**kwargs)
    assert err.value.field == field


def test_bad_inputs_at_edit_time_name_the_field(engine, inversion, image):
    with pytest.raises(InvalidInputError, match="'boat' is not a word of the target prompt") as err:
        engine.edit_real(inversion, TARGET, options=options(Blend(words=("boat",))))
    assert err.value.field == "blend_words"
    with pytest.raises(InvalidInputError) as err:  # refused before inverting: the source prompt is known
        engine.edit_real(image, TARGET, options=options(Blend(words=("boat",))), method="negative-prompt",
                         source_prompt=SOURCE)  # fmt: skip
    assert err.value.field == "blend_words" and "target or the source prompt" in str(err.value)
    with pytest.raises(InvalidInputError) as err:
        engine.edit_real(inversion, TARGET, options=options(Blend(mask=b"not an image")))
    assert err.value.field == "mask"
    with pytest.raises(InvalidInputError):
        EditOptions(blend="car")


def test_mask_bytes_array_and_path_agree(engine, inversion, tmp_path):
    mask = rect_mask((128, 128), (0, 0, 64, 64))
    path = tmp_path / "m.png"
    mask.save(path)
    masks = [
        engine.edit_real(inversion, TARGET, options=options(Blend(mask=m, start=0.9))).blend_mask
        for m in (png(mask), np.asarray(mask.convert("RGB")), str(path))
    ]
    for m in masks[1:]:
        np.testing.assert_array_equal(m, masks[0])
    assert masks[0].sum() == 64


# --- the command line -------------------------------------------------------------------------------------


def test_cli_edit_and_generate_write_the_mask(tmp_path, model_dir, capsys):
    from helpers import make_image, run_cli

    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    make_image(100, 70).save(src)
    rect_mask((50, 35), (0, 0, 25, 35)).save(mask)  # the left half, at another size than the image
    common = ["--model", str(model_dir), "--steps", "2", "--no-progress"]
    code, err = run_cli(
        ["edit", str(src), "-p", TARGET, "-o", str(tmp_path / "out.png"), "--mask", str(mask),
         "--blend", "car", "--blend-threshold", "1", "--save-mask", str(tmp_path / "m.png"), *common],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    saved = np.asarray(Image.open(tmp_path / "m.png"))
    assert saved.shape == (70, 100) and set(np.unique(saved)) == {0, 255}
    assert saved[:, :45].all() and not saved[:, 55:].any()  # the left half (a threshold of 1 adds no word)
    code, err = run_cli(
        ["generate", "-s", SOURCE, "-t", GEN_TARGET, "-o", str(tmp_path / "g.png"), "--height", "64",
         "--width", "64", "--blend", "car", "--blend-start", "0", "--save-mask", str(tmp_path / "gm.png"), *common],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "gm.png").size == (64, 64)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--mask", "missing.png"], ("--mask", "no such file")),
        (["--mask-grow", "2"], ("--mask-grow", "give --mask")),
        (["--mask", "IMG", "--mask-grow", "-1"], ("--mask-grow", "0..64")),
        (["--blend", "car", "--blend-start", "2"], ("--blend-start", "0..1")),
        (["--blend", "car", "--blend-threshold", "-1"], ("--blend-threshold", "0..1")),
        (["--blend", " "], ("--blend", "non-empty")),
        (["--save-mask", "m.png"], ("--save-mask", "--blend WORD")),
        (["--blend", "car", "--save-mask", "m.jpg"], ("--save-mask", ".png")),
        (["--blend-start", "x"], ("--blend-start", "invalid float")),
    ],
)
def test_cli_blend_mistakes_are_one_line_before_any_work(tmp_path, capsys, no_engine, args, fragments):
    from helpers import assert_one_line, make_image, run_cli

    src = tmp_path / "in.png"
    make_image(64, 64).save(src)
    args = [
        str(src) if a == "IMG" else str(tmp_path / a) if a.endswith((".png", ".jpg")) else a for a in args
    ]
    for command in (["edit", str(src), "-p", "x"], ["generate", "-s", "a", "-t", "b"]):
        code, err = run_cli([*command, "-o", str(tmp_path / "o.png"), *args], capsys)
        assert code == 2
        assert_one_line(err, *fragments)


def test_cli_word_in_neither_prompt_is_one_line(tmp_path, model_dir, capsys):
    from helpers import assert_one_line, make_image, run_cli

    src = tmp_path / "in.png"
    make_image(64, 64).save(src)
    code, err = run_cli(
        ["edit", str(src), "-p", "a cat", "-o", str(tmp_path / "o.png"), "--blend", "dog", "--model",
         str(model_dir), "--steps", "2", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert_one_line(err, "--blend (blend_words)", "'dog'")
