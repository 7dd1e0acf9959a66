"""Each exact shortcut of docs/design.md against the unshortened path; the full reference comparison lives in
test_generated.py and test_real.py (ReferenceFPE runs 6 rows per step with none of them)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import BATCH_SHAPE_TOL, model_input
from reference import rel_l2

from fpedit import EditEngine, EditOptions
from fpedit.engine.calls import UNetCall


def test_single_row_for_empty_source_prompt_is_exact(engine, reference):
    steps, z = 6, torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    opts = EditOptions(steps=steps)
    result = engine.edit_generated("", "a dog", latents=z, options=opts)
    ref_src, ref_tgt = reference.edit_generated("", "a dog", z, steps, 7.5, (0.0, 0.8), opts.layers)
    assert result.stats["unet_rows"] == 3 * steps  # not 4
    assert rel_l2(result.source_latents, ref_src) < 1e-4
    assert rel_l2(result.edited_latents, ref_tgt) < 1e-4


def test_skipped_identity_inversion_step_is_exact(engine, reference, image):
    steps = 6
    inv = engine.invert(image, options=EditOptions(steps=steps))
    traj = reference.invert(reference.encode(model_input(image)), steps, 7.5)  # runs the t = 0 step
    assert rel_l2(traj[1], traj[0]) < 1e-6  # the t = 0 step is the identity map...
    assert inv.stats["unet_rows"] == steps - 1  # ...so the engine skips it
    assert rel_l2(inv.latent(steps), traj[steps]) < 1e-4


def test_capture_only_calls_stop_early_with_identical_maps(engine):
    """Source rows of a real edit need maps, not noise: stopping after the last layer changes nothing."""
    sample, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    t = torch.tensor([100.0, 700.0])
    for layers in ((4, 5, 6), (3, 13), tuple(range(1, 17))):
        full = engine.backend.unet(UNetCall(sample, t, ctx, capture=layers))
        early = engine.backend.unet(UNetCall(sample, t, ctx, capture=layers, need_noise_pred=False))
        assert early.noise is None and full.noise is not None
        for i in layers:
            torch.testing.assert_close(early.maps.tensors[i], full.maps.tensors[i], rtol=0, atol=0)


def test_batched_source_capture_equals_one_row_per_step(model_dir, engine, image):
    """Once the trajectory is known the source rows are independent: batching them changes float rounding
    only (kernels block by batch shape), while giving each step another step's row would not."""
    opts = EditOptions(steps=8)
    one = EditEngine.from_pretrained(model_dir, capture_batch=1)
    many = engine
    assert many.capture_batch == 8
    a = one.edit_real(image, "a red car", options=opts)
    b = many.edit_real(image, "a red car", options=opts)
    assert rel_l2(a.edited_latents, b.edited_latents) < BATCH_SHAPE_TOL
    maps = b.inversion.cached_maps(opts.map_format, frozenset(opts.layers))
    b.inversion.drop_maps()
    b.inversion.store_maps(opts.map_format, frozenset(opts.layers), {i: maps[max(i - 1, 0)] for i in maps})
    misplaced = many.edit_real(b.inversion, "a red car", options=opts)
    assert rel_l2(misplaced.edited_latents, b.edited_latents) >= 10 * BATCH_SHAPE_TOL
    assert a.stats["unet_calls"] > b.stats["unet_calls"]
    assert a.stats["unet_rows"] == b.stats["unet_rows"]


def test_no_source_rows_after_the_window(engine, image):
    steps = 10
    for window, replaced in (((0.0, 0.5), 5), ((0.2, 0.6), 4), ((0.0, 0.0), 0)):
        r = engine.edit_real(image, "a red car", options=EditOptions(steps=steps, replace_window=window))
        assert r.stats["unet_rows"] == (steps - 1) + replaced + 2 * steps
        # The reconstruction is traj[0] decoded: the pinned source branch ends there.
        np.testing.assert_array_equal(r.source_latents, r.inversion.latent(0).numpy())


def test_fused_generated_step_equals_capture_then_inject(model_dir, engine):
    """In-call donors (one 4-row call per replaced step) compute exactly what capture + inject compute."""
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    fused = engine
    piped = EditEngine.from_pretrained(model_dir)
    piped.backend.supports_donors = False
    for fmt in ("qk", "probs"):
        opts = EditOptions(steps=6, map_format=fmt, layers=(2, 7, 12, 16))
        a = fused.edit_generated("a cat", "a dog", latents=z, options=opts)
        b = piped.edit_generated("a cat", "a dog", latents=z, options=opts)
        assert rel_l2(a.edited_latents, b.edited_latents) < BATCH_SHAPE_TOL  # 4-row calls vs 2-row calls
        assert a.stats["unet_rows"] == b.stats["unet_rows"] == 4 * 6
        assert a.stats["unet_calls"] == 6 < b.stats["unet_calls"]
