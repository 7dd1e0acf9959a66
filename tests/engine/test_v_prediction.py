"""v-prediction and SD 2.x-shaped checkpoints: edits against the reference extended with its own v conversion.

The checkpoints here are SD 2.x-shaped (linear projections in the transformer blocks, per-block head counts,
upcast attention) at toy widths, written as diffusers folders by this file: one predicting epsilon, one v.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, sharpen_attention
from helpers import SD_DDIM, check_generated_edit, diffusers_inversion
from reference import (
    ReferenceFPE,
    reference_conditional_inversion,
    reference_edit_with_nulls,
    reference_null_optimization,
    rel_l2,
)

from fpedit import EditEngine, EditOptions
from fpedit.engine.contract import PAPER_LAYERS
from fpedit.engine.errors import UnsupportedModelError

SRC, TGT = "a photo of a cat", "a photo of a dog"
GEN_TOL, REAL_TOL = 1e-4, 3e-3


def write_sd2_tiny(folder: Path, prediction_type: str, seed: int = 11) -> Path:
    """A tiny SD 2.x-shaped diffusers folder: SD 1.x blocks, linear projections, per-block head counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fpedit.engine.tiny import tiny_configs, write_tiny_tokenizer

    configs = tiny_configs()
    unet_cfg = {
        **configs["unet"],
        "use_linear_projection": True,
        "upcast_attention": True,
        "attention_head_dim": [2, 4, 4, 4],  # SD 2.x's config names head counts so (5, 10, 20, 20)
    }
    text_cfg = {**configs["text_encoder"], "hidden_act": "gelu"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_tiny_tokenizer(folder / "tokenizer")
    scheduler = {**configs["scheduler"], "_class_name": "DDIMScheduler", "prediction_type": prediction_type}
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return sharpen_attention(folder)


def engine_and_reference(folder: Path, prediction_type: str) -> tuple[EditEngine, ReferenceFPE]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    engine = EditEngine.from_pretrained(folder, backend="torch", device="cpu")
    ref = ReferenceFPE(
        UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        AutoencoderKL.from_pretrained(folder / "vae").eval(),
        CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        prediction_type=prediction_type,
    )
    return engine, ref


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """(engine, reference, folder) over an SD 2.x-shaped v-prediction folder."""
    folder = write_sd2_tiny(tmp_path_factory.mktemp("sd2") / "v", "v_prediction")
    return (*engine_and_reference(folder, "v_prediction"), folder)


def pixels(image) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.float64) / 127.5 - 1.0
    return torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1)[None]


def test_sd2_layout_loads_with_16_layers_in_execution_order(sd2):
    engine, _, folder = sd2
    assert (
        engine.spec.prediction_type
        == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    )
    layers = engine.spec.layers
    assert [layer.index for layer in layers] == list(range(1, 17))
    # Execution order: down (1-6), mid (7), up (8-16); heads from the per-block list.
    assert layers[0].module_path.startswith("down_blocks.0") and layers[6].module_path.startswith("mid_block")
    assert layers[15].module_path.startswith("up_blocks.3")
    assert [layer.heads for layer in layers[:2]] == [2, 2] and layers[6].heads == 4
    assert engine.backend._unet.config.use_linear_projection


def test_generated_edit_matches_reference(sd2):
    engine, ref, _ = sd2
    steps, g, window, layers = 8, 7.5, (0.0, 0.8), PAPER_LAYERS
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    opts = EditOptions(steps=steps, guidance_scale=g, replace_window=window, layers=layers)
    check_generated_edit(engine, ref, SRC, TGT, z, opts, GEN_TOL)


def test_real_edit_matches_reference(sd2):
    """Inversion converts v with alpha-bar of the level being left; the edit with the level it is at."""
    engine, ref, _ = sd2
    steps, g, window, layers = 8, 7.5, (0.0, 0.8), PAPER_LAYERS
    image = make_image()
    opts = EditOptions(steps=steps, guidance_scale=g, replace_window=window, layers=layers)
    result = engine.edit_real(image, "a red car", options=opts)
    z0 = ref.encode(pixels(image))
    traj, ref_src, ref_tgt = ref.edit_real(z0, "a red car", steps, g, window, layers)
    for k in range(steps + 1):
        assert rel_l2(result.inversion.latent(k), traj[k]) < REAL_TOL, k
    assert rel_l2(result.source_latents, ref_src) < REAL_TOL
    assert rel_l2(result.edited_latents, ref_tgt) < REAL_TOL
    off = engine.edit_real(result.inversion, "a red car", options=opts.replace(replace_window=(0.0, 0.0)))
    assert rel_l2(off.edited_latents, ref_tgt) >= 10 * REAL_TOL


def test_inversion_matches_diffusers_inverse_scheduler(sd2):
    """An independent second opinion: diffusers' DDIMInverseScheduler with the model's prediction type."""
    engine, ref, _ = sd2
    steps = 6
    inv = engine.invert(make_image(), options=EditOptions(steps=steps))
    with torch.no_grad():
        z0, empty = ref.encode(pixels(make_image())), ref.embed("")
    z = diffusers_inversion(ref.unet, z0, empty, steps, ref.prediction_type)[-1]
    assert rel_l2(inv.latent(steps), z) < 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_one_ddim_formula_is_diffusers_step_bit_for_bit(prediction_type):
    """Sampling and inversion take the engine's one DDIM formula (schedule.ddim_move, which the null-text
    optimisation differentiates through): it must give diffusers' scheduler steps exactly, both ways.

    Bitwise on purpose, though it spans two libraries: a wrong step (the neighbouring level of 50, or ε read as
    v) lands within 2.4e-7 of diffusers' at some steps, so any tolerance that would survive diffusers reordering
    its arithmetic would also pass a wrong formula. If a diffusers release fails this, re-sync ddim_move."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    from fpedit.engine.schedule import DDIMSchedule

    config = {**SD_DDIM, "timestep_spacing": "leading", "prediction_type": prediction_type}
    generator = torch.Generator().manual_seed(3)
    for steps in (1, 3, 50):
        schedule = DDIMSchedule({"prediction_type": prediction_type}, steps)
        sampler, inverter = DDIMScheduler(**config), DDIMInverseScheduler(**config)
        sampler.set_timesteps(steps)
        inverter.set_timesteps(steps)
        for i, (t_down, t_up) in enumerate(zip(sampler.timesteps, inverter.timesteps, strict=True)):
            z, out = torch.randn((2, 2, 4, 8, 8), generator=generator)
            want = sampler.step(out, t_down, z, eta=0.0).prev_sample
            assert torch.equal(schedule.step(out, i, z), want), (steps, i)
            want = inverter.step(out, t_up, z).prev_sample
            assert torch.equal(schedule.invert_step(out, i, z), want), (steps, i)


def test_null_text_edit_matches_reference(sd2):
    """Algorithm 3 with v: the optimisation's differentiable DDIM step converts v too."""
    engine, ref, _ = sd2
    steps, g, window, layers, source = 3, 7.5, (0.0, 0.8), PAPER_LAYERS, "a photo of a disc"
    opts = EditOptions(steps=steps, guidance_scale=g, replace_window=window, layers=layers)
    image = make_image(64, 64)
    inv = engine.invert(image, options=opts, source_prompt=source, method="null-text", null_text_steps=4)
    z0 = ref.encode(pixels(image))
    traj = reference_conditional_inversion(ref, z0, source, steps)
    nulls, iterations = reference_null_optimization(ref, traj, source, steps, g, inner_steps=4)
    for k in range(steps + 1):
        assert rel_l2(inv.latent(k), traj[k]) < 1e-4, k
    assert inv.stats["null_text_iterations"] == sum(iterations)
    for i in range(steps):
        assert rel_l2(inv.null_embeddings[i], nulls[i]) < 5e-3, i
    result = engine.edit_real(inv, TGT, options=opts)
    ref_src, ref_tgt = reference_edit_with_nulls(
        ref, traj[steps], source, TGT, nulls, steps, g, window, layers
    )
    assert rel_l2(result.source_latents, ref_src) < REAL_TOL
    assert rel_l2(result.edited_latents, ref_tgt) < REAL_TOL
    _, ref_off = reference_edit_with_nulls(ref, traj[steps], source, TGT, nulls, steps, g, (0.0, 0.0), layers)
    assert rel_l2(result.edited_latents, ref_off) >= 10 * REAL_TOL


def test_sd2_epsilon_folder_edits_like_reference(tmp_path):
    """SD 2.x base models predict epsilon: same layout, no conversion."""
    folder = write_sd2_tiny(tmp_path / "eps", "epsilon", seed=12)
    engine, ref = engine_and_reference(folder, "epsilon")
    assert engine.spec.prediction_type == "epsilon"
    steps, g, window, layers = 6, 7.5, (0.0, 0.8), PAPER_LAYERS
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    opts = EditOptions(steps=steps, guidance_scale=g, replace_window=window, layers=layers)
    result = check_generated_edit(engine, ref, SRC, TGT, z, opts, GEN_TOL)
    ref.prediction_type = "v_prediction"  # read as v, the same weights give another image
    _, v_tgt = ref.edit_generated(SRC, TGT, z, steps, g, window, layers)
    assert rel_l2(result.edited_latents, v_tgt) > 1e-2


def test_unknown_prediction_type_is_refused(tmp_path, model_dir):
    import shutil

    folder = Path(shutil.copytree(model_dir, tmp_path / "m"))
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "sample"}))
    with pytest.raises(UnsupportedModelError, match="prediction_type 'sample'"):
        EditEngine.from_pretrained(folder)


def test_onnx_export_carries_v_prediction(sd2, tmp_path):
    """The exported graphs' consumer (ONNX Runtime backend) converts v like the torch backend."""
    pytest.importorskip("onnxruntime")
    from fpedit.engine.contract import ShapeRange
    from fpedit.export.onnx_export import export_onnx

    engine, ref, folder = sd2
    export_onnx(folder, tmp_path / "onnx", image_size=ShapeRange(64, 64, 64))
    onnx_engine = EditEngine.from_pretrained(tmp_path / "onnx", backend="onnxruntime")
    assert onnx_engine.spec.prediction_type == "v_prediction"
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    opts = EditOptions(steps=4)
    a = onnx_engine.edit_generated(SRC, TGT, latents=z, options=opts)
    b = engine.edit_generated(SRC, TGT, latents=z, options=opts)
    assert rel_l2(a.edited_latents, b.edited_latents) < 1e-3
    ref_eps = copy.copy(ref)
    ref_eps.prediction_type = "epsilon"
    _, eps_tgt = ref_eps.edit_generated(SRC, TGT, z, 4, 7.5, (0.0, 0.8), PAPER_LAYERS)
    assert rel_l2(a.edited_latents, eps_tgt) > 1e-2  # read as epsilon it would be another image
