"""Algorithm 1 (generated-image edit) against the independent reference and diffusers' pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SD_DDIM, check_generated_edit
from reference import rel_l2

from fpedit import EditOptions

SRC, TGT = "a photo of a cat", "a photo of a dog"
TOL = 1e-4  # relative L2 against the reference: float32 reassociation only


def z_T(seed: int = 3, size: int = 128) -> torch.Tensor:
    return torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("layers", "window", "map_format"),
    [
        (tuple(range(4, 15)), (0.0, 0.8), "qk"),
        (tuple(range(4, 15)), (0.0, 0.8), "probs"),
        ((1, 2, 9, 16), (0.2, 0.7), "qk"),
        ((3, 5, 7, 13), (0.25, 1.0), "probs"),  # a late window still moves the edit >= 10x TOL
    ],
)
def test_generated_matches_reference(engine, reference, layers, window, map_format):
    steps, g = 8, 7.5
    z = z_T()
    opts = EditOptions(
        steps=steps, guidance_scale=g, replace_window=window, layers=layers, map_format=map_format
    )
    # The comparison can fail: the same run without injection misses the reference by >= 10x the tolerance.
    result = check_generated_edit(engine, reference, SRC, TGT, z, opts, TOL)
    assert result.edited_latents.shape == (1, 4, 16, 16)
    assert result.edited_latents.dtype == np.float32


def test_replacement_changes_the_edit(engine):
    """The comparison above would be vacuous if injecting maps changed nothing."""
    z = z_T()
    with_maps = engine.edit_generated(SRC, TGT, latents=z, options=EditOptions(steps=6))
    without = engine.edit_generated(SRC, TGT, latents=z, options=EditOptions(steps=6, replace_window=(0, 0)))
    assert rel_l2(with_maps.edited_latents, without.edited_latents) > 1e-2
    assert rel_l2(with_maps.source_latents, without.source_latents) < 1e-5


def test_empty_window_equals_stable_diffusion_pipeline(engine, raw_modules):
    """With no replacement the target is plain SD sampling with DDIM (docs/design.md settings)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    def ddim() -> DDIMScheduler:
        return DDIMScheduler(**SD_DDIM)

    pipe = StableDiffusionPipeline(
        vae=raw_modules["vae"],
        text_encoder=raw_modules["text_encoder"],
        tokenizer=raw_modules["tokenizer"],
        unet=raw_modules["unet"],
        scheduler=ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # The pipeline rewrites its scheduler's steps_offset to 1 on construction; docs/design.md wants 0.
    pipe.scheduler = ddim()
    assert pipe.scheduler.config.steps_offset == 0
    pipe.set_progress_bar_config(disable=True)
    z = z_T(5)
    expected = pipe(
        TGT,
        latents=z.clone(),
        num_inference_steps=7,
        guidance_scale=7.5,
        eta=0.0,
        output_type="latent",
        height=128,
        width=128,
    ).images
    result = engine.edit_generated(
        SRC, TGT, latents=z, options=EditOptions(steps=7, replace_window=(0.0, 0.0))
    )
    assert rel_l2(result.edited_latents, expected) < 1e-4


def test_same_prompt_all_layers_full_window_reproduces_source(engine):
    opts = EditOptions(steps=6, replace_window=(0.0, 1.0), layers=tuple(range(1, 17)))
    result = engine.edit_generated(SRC, SRC, latents=z_T(), options=opts)
    assert rel_l2(result.edited_latents, result.source_latents) < 1e-5


def test_qk_equals_probs(engine):
    z = z_T(11)
    a = engine.edit_generated(SRC, TGT, latents=z, options=EditOptions(steps=6, map_format="qk"))
    b = engine.edit_generated(SRC, TGT, latents=z, options=EditOptions(steps=6, map_format="probs"))
    assert rel_l2(a.edited_latents, b.edited_latents) < 1e-5


def test_seed_draws_on_cpu_generator(engine):
    a = engine.edit_generated(SRC, TGT, seed=42, height=64, width=64, options=EditOptions(steps=3))
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(42))
    b = engine.edit_generated(SRC, TGT, latents=z, options=EditOptions(steps=3))
    np.testing.assert_array_equal(a.edited_latents, b.edited_latents)
    assert a.stats["seed"] == 42
    assert a.edited_image.size == (64, 64) and a.source_image.size == (64, 64)


def test_generated_rows_per_step(engine):
    steps = 5
    r = engine.edit_generated(SRC, TGT, latents=z_T(), options=EditOptions(steps=steps))
    assert r.stats["unet_rows"] == 4 * steps
    # The empty source prompt needs one source row (a shortcut of docs/design.md), and it is exact.
    r0 = engine.edit_generated("", TGT, latents=z_T(), options=EditOptions(steps=steps))
    assert r0.stats["unet_rows"] == 3 * steps
