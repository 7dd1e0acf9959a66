"""LoRA fused at load: PEFT and kohya files with seeded random weights against weights this test merges by hand
(W + scale * alpha / r * B @ A), through the torch backend and an ONNX export."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from lora_files import (
    RANK,
    file_deltas,
    folder_with_deltas,
    merged_folder,
    random_factors,
    text_targets,
    unet_targets,
    write_kohya_lora,
    write_peft_lora,
)
from reference import rel_l2
from safetensors.torch import save_file

from fpedit import EditEngine, EditOptions
from fpedit.cli import main
from fpedit.engine.errors import ModelLoadError

pytest.importorskip("peft")

SRC, TGT = "a photo of a cat", "a photo of a dog"


@pytest.fixture(scope="module")
def factors(raw_modules):
    return random_factors(unet_targets(raw_modules["unet"]), 1), random_factors(
        text_targets(raw_modules["text_encoder"]), 2
    )


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


def test_two_loras_on_the_same_modules_both_fuse(model_dir, engine, raw_modules, factors, tmp_path, capsys):
    """A PEFT file and a kohya file on the same UNet and text encoder modules, with their own alpha and scale:
    the engine's weights are W + sum of scale * alpha / r * B @ A over both files, merged here from the
    files' tensors, and its edits equal those of a folder holding those weights. (Loading the second file
    while the first was fused used to unmerge the first: the weights held the kohya file alone.)"""
    unet, text = raw_modules["unet"], raw_modules["text_encoder"]
    unet_a, text_a = factors
    unet_b, text_b = random_factors(unet_targets(unet), 3), random_factors(text_targets(text), 4)
    peft = write_peft_lora(tmp_path / "peft.safetensors", unet_a, 2.0, text_a)  # alpha 2, r 4
    kohya = write_kohya_lora(tmp_path / "kohya.safetensors", unet_b, text_b, 1.0)  # alpha 1, r 4
    loras = [(peft, 0.7), (kohya, 1.5)]
    modules = {"unet": sorted(unet_targets(unet)), "text_encoder": sorted(text_targets(text))}
    per_file = [file_deltas(path, scale, modules) for path, scale in loras]
    for deltas in per_file:
        assert {c: sorted(d) for c, d in deltas.items()} == modules  # both files touch every target
    deltas = {c: {n: per_file[0][c][n] + per_file[1][c][n] for n in modules[c]} for c in modules}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_loras = EditEngine.from_pretrained(model_dir, loras=[f"{path}:{scale}" for path, scale in loras])
    assert not [w for w in caught if "merged" in str(w.message)], [str(w.message) for w in caught]
    assert with_loras.info()["loras"] == [{"file": str(path), "scale": scale} for path, scale in loras]

    backend = with_loras.backend
    for component, raw, got in (("unet", unet, backend._unet), ("text_encoder", text, backend._text)):
        want = {k: v.double() for k, v in raw.state_dict().items()}
        for name, delta in deltas[component].items():
            weight = want[f"{name}.weight"]
            # Each file alone moves the weight far beyond the tolerance: keeping one file cannot pass.
            assert min(d[component][name].abs().max() for d in per_file) > 1e-3 * weight.abs().max()
            want[f"{name}.weight"] = weight + delta.reshape(weight.shape)
        state = got.state_dict()
        assert sorted(state) == sorted(want)
        for key, value in want.items():
            off = float((state[key].double() - value).abs().max())
            assert off <= 1e-6 * float(value.abs().max()), (component, key, off)

    expected = EditEngine.from_pretrained(folder_with_deltas(model_dir, tmp_path / "merged", deltas))
    got, want, plain = edit(with_loras), edit(expected), edit(engine)
    assert rel_l2(got, want) < 1e-5
    assert rel_l2(got, plain) > 100 * 1e-5

    capsys.readouterr()
    args = ["info", "--model", str(model_dir)] + [f"--lora={path}:{scale}" for path, scale in loras]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no library chatter without -v
    assert json.loads(out)["loras"] == [{"file": str(path), "scale": scale} for path, scale in loras]


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


def test_getinfo_lists_the_loras_in_effect(model_dir, factors, tmp_path, capsys):
    """GetInfo (and so `fpedit client info`) names every fused LoRA with its scale, like `fpedit info`."""
    from fpedit.server.app import build_server
    from fpedit.server.client import EditClient
    from fpedit.server.config import ServerConfig

    lora = write_peft_lora(tmp_path / "peft.safetensors", factors[0], 4.0)
    engine = EditEngine.from_pretrained(model_dir, loras=[f"{lora}:0.25"])
    server = build_server(engine, ServerConfig(port=0))
    try:
        with EditClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            info = client.info()
        assert [(item.file, item.scale) for item in info.loras] == [(str(lora), 0.25)]
        assert info.prediction_type == "epsilon"
        assert main(["client", "info", "--target", f"127.0.0.1:{server.port}"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["loras"] == [{"file": str(lora), "scale": 0.25}]
    finally:
        server.drain(1)
