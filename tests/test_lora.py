"""LoRA fused at load: PEFT and kohya files with seeded random weights against weights this test merges by hand
(W + scale * alpha / r * B @ A), through the torch backend and an ONNX export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import rel_l2
from safetensors.torch import save_file

from fpedit import EditEngine, EditOptions
from fpedit.cli import main
from fpedit.engine.errors import ModelLoadError

pytest.importorskip("peft")

RANK = 4
SRC, TGT = "a photo of a cat", "a photo of a dog"


def unet_targets(unet) -> dict[str, torch.nn.Linear]:
    """The attention projections LoRAs for SD usually train (to_q/k/v/out.0 of attn1 and attn2)."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (".attn1." in name or ".attn2." in name)
        and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
    }


def text_targets(text_encoder) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in text_encoder.named_modules()
        # All four attention projections, as kohya's trainer targets them (diffusers reads a kohya text
        # encoder LoRA without out_proj as an unknown format).
        if isinstance(module, torch.nn.Linear)
        and name.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"))
    }


def random_factors(
    targets: dict[str, torch.nn.Linear], seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per module: A (r, in), B (out, r), large enough to move an edit visibly."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(RANK, m.in_features, generator=g) * 0.2,
            torch.randn(m.out_features, RANK, generator=g) * 0.2,
        )
        for name, m in sorted(targets.items())
    }


def merged_folder(model_dir: Path, out: Path, unet_factors, text_factors, factor: float) -> Path:
    """A copy of the folder with W + factor * B @ A written into each targeted weight (the expectation)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    shutil.copytree(model_dir, out)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    text = CLIPTextModel.from_pretrained(out / "text_encoder")
    with torch.no_grad():
        for module_map, factors in ((unet_targets(unet), unet_factors), (text_targets(text), text_factors)):
            for name, (a, b) in factors.items():
                module_map[name].weight += factor * (b @ a)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text.save_pretrained(out / "text_encoder", safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def factors(raw_modules):
    return random_factors(unet_targets(raw_modules["unet"]), 1), random_factors(
        text_targets(raw_modules["text_encoder"]), 2
    )


def write_peft_lora(path: Path, unet_factors, alpha: float) -> Path:
    """diffusers/PEFT layout: ``unet.<module>.lora_A/B.weight``; alpha in ``lora_adapter_metadata``."""
    tensors = {}
    for name, (a, b) in unet_factors.items():
        tensors[f"unet.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = b.contiguous()
    metadata = {
        "unet.r": RANK,
        "unet.lora_alpha": alpha,
        "unet.target_modules": sorted(unet_factors),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    return path


def write_kohya_lora(path: Path, unet_factors, text_factors, alpha: float) -> Path:
    """kohya layout: ``lora_unet_<module_with_underscores>.lora_down/lora_up.weight`` and ``.alpha``;
    the text encoder under ``lora_te_text_model_...``."""
    tensors = {}
    for prefix, factors in (("lora_unet_", unet_factors), ("lora_te_text_model_", text_factors)):
        for name, (a, b) in factors.items():
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = a.contiguous()
            tensors[f"{key}.lora_up.weight"] = b.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def z_T() -> torch.Tensor:
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(9))


def edit(engine: EditEngine):
    return engine.edit_generated(SRC, TGT, latents=z_T(), options=EditOptions(steps=3)).edited_latents


def test_peft_lora_equals_hand_merged_weights(model_dir, engine, factors, tmp_path):
    unet_factors, _ = factors
    alpha, scale = 2.0, 0.7
    lora = write_peft_lora(tmp_path / "peft.safetensors", unet_factors, alpha)
    with_lora = EditEngine.from_pretrained(model_dir, loras=[f"{lora}:{scale}"])
    expected = EditEngine.from_pretrained(
        merged_folder(model_dir, tmp_path / "merged", unet_factors, {}, scale * alpha / RANK)
    )
    got, want, plain = edit(with_lora), edit(expected), edit(engine)
    assert rel_l2(got, want) < 1e-5
    assert rel_l2(got, plain) > 100 * 1e-5  # the LoRA moved the edit: the comparison can fail
    assert with_lora.info()["loras"] == [{"file": str(lora), "scale": scale}]


def test_kohya_lora_with_text_encoder_equals_hand_merged(model_dir, engine, factors, tmp_path):
    unet_factors, text_factors = factors
    alpha = 1.0  # alpha != rank: ignoring it would be 4x off
    lora = write_kohya_lora(tmp_path / "kohya.safetensors", unet_factors, text_factors, alpha)
    with_lora = EditEngine.from_pretrained(model_dir, loras=[lora])
    expected = EditEngine.from_pretrained(
        merged_folder(model_dir, tmp_path / "merged", unet_factors, text_factors, alpha / RANK)
    )
    assert rel_l2(edit(with_lora), edit(expected)) < 1e-5
    assert rel_l2(edit(with_lora), edit(engine)) > 1e-3


def test_lora_matching_nothing_is_an_error_naming_the_file(model_dir, tmp_path, capsys):
    lora = tmp_path / "other-model.safetensors"
    save_file(
        {
            "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(RANK, 8),
            "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(8, RANK),
        },
        str(lora),
    )
    with pytest.raises(ModelLoadError, match=re.escape("other-model.safetensors")):
        EditEngine.from_pretrained(model_dir, loras=[lora])
    capsys.readouterr()
    assert main(["info", "--model", str(model_dir), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fpedit: error: --lora") and "missing.safetensors" in err


def test_onnx_export_with_lora_matches_torch_with_it(model_dir, factors, tmp_path):
    """The LoRA is baked into the exported UNet: ONNX Runtime's noise prediction equals the torch UNet's with
    the LoRA, and not the plain one's."""
    ort = pytest.importorskip("onnxruntime")
    from fpedit.engine.contract import CONTEXT, SAMPLE, TIMESTEP, ShapeRange
    from fpedit.engine.loading import load_components
    from fpedit.export.onnx_export import export_onnx

    unet_factors, _ = factors
    lora = write_peft_lora(tmp_path / "peft.safetensors", unet_factors, 4.0)
    export_onnx(
        model_dir, tmp_path / "onnx", loras=[lora], image_size=ShapeRange(64, 64, 64), graphs=["unet_plain"]
    )
    g = torch.Generator().manual_seed(4)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    timestep = torch.tensor([500.0, 500.0])
    session = ort.InferenceSession(
        str(tmp_path / "onnx" / "unet_plain.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {SAMPLE: sample.numpy(), TIMESTEP: timestep.numpy(), CONTEXT: context.numpy()}
    names = {i.name for i in session.get_inputs()}
    got = torch.from_numpy(session.run(None, {k: v for k, v in feeds.items() if k in names})[0])
    with torch.no_grad():
        with_lora = load_components(model_dir, loras=[lora]).unet
        plain = load_components(model_dir).unet
        want = with_lora(sample, timestep, encoder_hidden_states=context).sample
        off = plain(sample, timestep, encoder_hidden_states=context).sample
    assert rel_l2(got, want) < 1e-4
    assert rel_l2(got, off) > 1e-2
    np.testing.assert_equal(tuple(got.shape), tuple(want.shape))


def test_bench_and_cli_take_lora(model_dir, factors, tmp_path, capsys):
    """``fpedit bench --lora`` reaches the engine it times; ``fpedit info --lora`` reports it."""
    from fpedit.benchmarks.bench import BenchConfig, load_engine

    lora = write_peft_lora(tmp_path / "peft.safetensors", factors[0], 4.0)
    engine = load_engine("torch", BenchConfig(model=str(model_dir), loras=(f"{lora}:0.5",)), tmp_path)
    assert engine.info()["loras"] == [{"file": str(lora), "scale": 0.5}]
    assert main(["info", "--model", str(model_dir), "--lora", str(lora)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loras"] == [{"file": str(lora), "scale": 1.0}] and info["prediction_type"] == "epsilon"
