"""Loading diffusers folders written by the tests, refusing bad ones, and the layer numbering contract."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fpedit import EditEngine, EditOptions, ModelLoadError
from fpedit.engine.calls import UNetCall
from fpedit.engine.contract import PAPER_LAYERS, ModelSpec, unet_io
from fpedit.engine.errors import UnsupportedModelError
from fpedit.engine.tiny import save_tiny_model


def test_saved_folder_loads_and_matches_raw_modules(engine, raw_modules):
    ids = engine.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = raw_modules["text_encoder"](ids)[0]
    assert torch.allclose(engine.backend.encode_text(ids), expected, atol=1e-6)
    assert engine.spec.default_image_size == 64
    assert len(engine.spec.layers) == 16


def test_other_widths_and_per_block_heads_load(tmp_path):
    """A differently sized SD 1.x-shaped checkpoint (per-block head counts, wider text) works too."""
    folder = save_tiny_model(tmp_path / "m", seed=3, width=16, text_width=48)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["attention_head_dim"] = [2, 4, 4, 4]
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    eng = EditEngine.from_pretrained(folder)
    assert [layer.heads for layer in eng.spec.layers] == [2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2, 2, 2]
    r = eng.edit_generated("a cat", "a dog", seed=1, height=64, width=64, options=EditOptions(steps=2))
    assert r.edited_latents.shape == (1, 4, 8, 8)


def test_execution_order_numbering(engine):
    """Layers 1..16 follow the order self-attention modules actually run (not named_modules order)."""
    unet = engine.backend.unet_module
    order: list[str] = []
    names = {module: name for name, module in unet.named_modules()}
    hooks = [
        module.register_forward_pre_hook(lambda m, *_: order.append(names[m]))
        for name, module in unet.named_modules()
        if name.endswith("attn1")
    ]
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), encoder_hidden_states=torch.zeros(1, 77, 32))
    finally:
        for h in hooks:
            h.remove()
    assert order == [layer.module_path for layer in engine.spec.layers]
    named = [n for n, _ in unet.named_modules() if n.endswith("attn1")]
    assert named != order  # named_modules lists the up blocks before the mid block


def test_contract_shapes(engine):
    spec = engine.spec
    inputs, outputs = unet_io("capture", spec, PAPER_LAYERS, "qk")
    assert [t.name for t in outputs] == ["noise_pred"] + [f"map_out_{i:02d}" for i in PAPER_LAYERS]
    inputs, _ = unet_io("inject", spec, PAPER_LAYERS, "probs")
    assert [t.name for t in inputs][:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert inputs[-1].name == "map_gate" and inputs[-1].shape == ("batch", len(PAPER_LAYERS))
    layer14 = spec.layer(14)
    assert layer14.map_shape("qk", 2, 64, 64) == (2, 2, 4096, layer14.channels)
    assert layer14.map_shape("probs", 1, 64, 64) == (1, layer14.heads, 4096, 4096)
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_captured_maps_have_contract_shapes(engine):
    spec = engine.spec
    sample = torch.randn(3, 4, 16, 8)
    ctx = torch.randn(3, 77, 32)
    for fmt in ("qk", "probs"):
        call = UNetCall(sample, torch.tensor([1.0, 5.0, 9.0]), ctx, map_format=fmt, capture=PAPER_LAYERS)
        maps = engine.backend.unet(call).maps
        assert maps.layers == PAPER_LAYERS
        for i in PAPER_LAYERS:
            assert tuple(maps.tensors[i].shape) == spec.layer(i).map_shape(fmt, 3, 16, 8)


def test_missing_and_malformed_folders(tmp_path, model_dir):
    with pytest.raises(ModelLoadError, match="neither 'tiny' nor a folder"):
        EditEngine.from_pretrained(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        EditEngine.from_pretrained(broken)
    bad_json = tmp_path / "bad_json"
    shutil.copytree(model_dir, bad_json)
    (bad_json / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="malformed"):
        EditEngine.from_pretrained(bad_json)


def test_pickled_weights_refused_unless_allowed(tmp_path, model_dir):
    from diffusers import AutoencoderKL

    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    shutil.rmtree(pickled / "vae")
    vae.save_pretrained(pickled / "vae", safe_serialization=False)
    assert not list((pickled / "vae").glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match="pickled"):
        EditEngine.from_pretrained(pickled)
    eng = EditEngine.from_pretrained(pickled, allow_pickle=True)
    assert eng.spec.vae_scaling_factor == pytest.approx(0.18215)


def test_not_sd1_is_refused(tmp_path, model_dir):
    other = tmp_path / "sd2like"
    shutil.copytree(model_dir, other)
    cfg = json.loads((other / "scheduler" / "scheduler_config.json").read_text())
    cfg["prediction_type"] = "sample"  # v_prediction is supported (tests/engine/test_v_prediction.py)
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="epsilon or v_prediction"):
        EditEngine.from_pretrained(other)
    cfg["prediction_type"] = "epsilon"
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    cfg_path = other / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layers_per_block"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="layers_per_block"):
        EditEngine.from_pretrained(other)


def test_unknown_backend_and_dtype():
    with pytest.raises(ValueError, match="backend"):
        EditEngine.from_pretrained("tiny", backend="jax")
    with pytest.raises(ValueError, match="dtype"):
        EditEngine.from_pretrained("tiny", dtype="int8")
