"""Single-file checkpoints: the tiny model written by this file in the original SD key layout, loaded offline.

The key mapping below is this test's own (a table built from the SD 1.x block layout), not fpedit's; diffusers'
own ``from_single_file`` loading the file proves it is what real checkpoints look like.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fpedit import EditEngine, EditOptions
from fpedit.cli import main
from fpedit.engine.conversion import convert
from fpedit.engine.errors import ModelLoadError, UnsupportedModelError
from fpedit.engine.single_file import SD1_CONFIG_DIR

RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_prefixes() -> dict[str, str]:
    """diffusers module prefix -> LDM prefix, walking the SD 1.x UNet the way the original code builds it."""
    table = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    slot = 1
    for b in range(4):
        for j in range(2):
            table[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{slot}.0"
            if b < 3:
                table[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{slot}.1"
            slot += 1
        if b < 3:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{slot}.0.op"
            slot += 1
    slot = 0
    for b in range(4):
        for j in range(3):
            table[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{slot}.0"
            if b > 0:
                table[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{slot}.1"
            slot += 1
        if b < 3:
            table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{slot - 1}.{1 if b == 0 else 2}.conv"
    return table


def vae_prefixes() -> dict[str, str]:
    table = {
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        table[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        table[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for b in range(4):
        for j in range(3):
            table[f"encoder.down_blocks.{b}.resnets.{j}"] = f"encoder.down.{b}.block.{j}"
            table[f"decoder.up_blocks.{b}.resnets.{j}"] = f"decoder.up.{3 - b}.block.{j}"
        table[f"encoder.down_blocks.{b}.downsamplers.0"] = f"encoder.down.{b}.downsample"
        table[f"decoder.up_blocks.{b}.upsamplers.0"] = f"decoder.up.{3 - b}.upsample"
    return table


def _split(name: str, table: dict[str, str]) -> tuple[str, str, str]:
    """(diffusers prefix, its LDM name, the rest) for the longest table prefix of ``name``."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return prefix, table[prefix], ".".join(parts[cut:])
    return "", "", name


def write_original_checkpoint(folder: Path, path: Path) -> Path:
    """The diffusers folder's weights as one safetensors file in the original SD 1.x key layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out: dict[str, torch.Tensor] = {}
    unet_table = unet_prefixes()
    for name, tensor in UNet2DConditionModel.from_pretrained(folder / "unet").state_dict().items():
        prefix, ldm, rest = _split(name, unet_table)
        if ".resnets." in prefix:
            first, _, tail = rest.partition(".")
            rest = f"{RESNET_LEAVES[first]}.{tail}"
        out[f"model.diffusion_model.{ldm}.{rest}" if ldm else f"model.diffusion_model.{rest}"] = tensor
    vae_table = vae_prefixes()
    attention_leaves = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for name, tensor in AutoencoderKL.from_pretrained(folder / "vae").state_dict().items():
        prefix, ldm, rest = _split(name, vae_table)
        if prefix.endswith("attentions.0"):
            leaf, _, kind = rest.rpartition(".")
            rest = f"{attention_leaves[leaf]}.{kind}"
            if kind == "weight" and leaf != "group_norm":
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        elif ".resnets." in prefix:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        out[f"first_stage_model.{ldm}.{rest}" if ldm else f"first_stage_model.{rest}"] = tensor
    for name, tensor in CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict().items():
        out[f"cond_stage_model.transformer.text_model.{name.removeprefix('text_model.')}"] = tensor
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(model_dir, tmp_path_factory) -> Path:
    return write_original_checkpoint(model_dir, tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: the loader must not reach for a hub."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_written_file_is_what_real_checkpoints_look_like(checkpoint, model_dir, raw_modules, no_network):
    """diffusers' own single-file loader reads the file into the folder's exact weights."""
    from diffusers import StableDiffusionPipeline

    keys = set(load_file(str(checkpoint)))
    for real_key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert real_key in keys, real_key
    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint), config=str(model_dir), local_files_only=True, safety_checker=None
    )
    for name in ("unet", "vae", "text_encoder"):
        loaded, expected = getattr(pipe, name).state_dict(), raw_modules[name].state_dict()
        assert loaded.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(loaded[key], tensor), (name, key)


def test_single_file_edit_equals_folder_edit(checkpoint, model_dir, engine, no_network):
    single = EditEngine.from_pretrained(checkpoint, model_config=model_dir)
    assert single.source == str(checkpoint.resolve())
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    opts = EditOptions(steps=3)
    a = single.edit_generated("a cat", "a dog", latents=z, options=opts)
    b = engine.edit_generated("a cat", "a dog", latents=z, options=opts)
    np.testing.assert_array_equal(a.edited_latents, b.edited_latents)


def test_loaded_weights_start_where_torch_would_allocate_them(checkpoint, model_dir, no_network):
    """Weights left in the mapped safetensors file sit at the file's byte offsets; CPU kernels take another
    path (other last bits) for another alignment, which made the two loads above differ."""
    from fpedit.engine.components import CPU_ALIGNMENT
    from fpedit.engine.loading import load_components

    for parts in (load_components(model_dir), load_components(checkpoint, model_config=model_dir)):
        for name in ("unet", "vae", "text_encoder"):
            module = getattr(parts, name)
            odd = [
                n
                for n, t in (*module.named_parameters(), *module.named_buffers())
                if t.data_ptr() % CPU_ALIGNMENT
            ]
            assert not odd, (parts.source, name, odd[:3])


def test_convert_both_ways(checkpoint, model_dir, tmp_path, no_network):
    """folder -> file gives this test's own key layout, tensor for tensor; file -> folder gives the weights."""
    out = convert(model_dir, tmp_path / "converted.safetensors")
    ours, theirs = load_file(str(checkpoint)), load_file(str(out))
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key
    folder = convert(checkpoint, tmp_path / "folder", model_config=model_dir)
    from diffusers import UNet2DConditionModel

    expected = UNet2DConditionModel.from_pretrained(model_dir / "unet").state_dict()
    got = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert EditEngine.from_pretrained(folder).spec == EditEngine.from_pretrained(model_dir).spec
    with pytest.raises(ModelLoadError, match="exists"):
        convert(model_dir, out)


def test_half_precision_stays_half(checkpoint, model_dir, tmp_path, no_network):
    half = {k: v.half() for k, v in load_file(str(checkpoint)).items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    folder = convert(tmp_path / "half.safetensors", tmp_path / "half", model_config=model_dir)
    weights = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}


def _fake(path: Path, **shapes: tuple[int, ...]) -> Path:
    save_file({k.replace("__", "."): torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


CONV_IN = "model__diffusion_model__input_blocks__0__0__weight"
CLIP_POS = "cond_stage_model__transformer__text_model__embeddings__position_embedding__weight"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({CONV_IN: (8, 4, 3, 3), "conditioner__embedders__0__x": (1,)}, "SDXL"),
        ({"model__diffusion_model__joint_blocks__0__x": (1,)}, "SD 3"),
        ({CONV_IN: (8, 9, 3, 3), CLIP_POS: (77, 8)}, "9 input channels"),
        ({CONV_IN: (8, 4, 3, 3), "cond_stage_model__model__positional_embedding": (77, 8)}, "SD 2.x"),
        ({"something__else": (1,)}, "original key layout"),
    ],
)
def test_unknown_layouts_are_refused_in_one_line(tmp_path, keys, message, no_network):
    path = _fake(tmp_path / "model.safetensors", **keys)
    with pytest.raises(UnsupportedModelError, match=message) as info:
        EditEngine.from_pretrained(path)
    assert "\n" not in str(info.value)


def test_non_standard_shapes_without_model_config_ask_for_it(checkpoint, tmp_path, capsys, no_network):
    """The tiny checkpoint has SD 1.x's keys at toy widths: the shipped configs cannot describe it."""
    with pytest.raises(UnsupportedModelError, match="model_config") as info:
        EditEngine.from_pretrained(checkpoint)
    assert "[77, 768]" in str(info.value) and "ignore_mismatched_sizes" not in str(info.value)
    assert main(["convert", str(checkpoint), str(tmp_path / "folder")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after diffusers' progress bar, when captured in-process
    assert last.startswith("fpedit: error: ") and "--model-config DIR" in last
    assert not (tmp_path / "folder").exists()


def test_pickles_refused_unless_allowed(checkpoint, model_dir, tmp_path, capsys, no_network):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(checkpoint))}, str(ckpt))
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        EditEngine.from_pretrained(ckpt, model_config=model_dir)
    assert main(["info", "--model", str(ckpt), "--model-config", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fpedit: error: ") and "--allow-pickle" in err and err.count("\n") == 1
    eng = EditEngine.from_pretrained(ckpt, model_config=model_dir, allow_pickle=True)
    assert eng.spec.prediction_type == "epsilon"


def test_v_prediction_from_sidecar_or_flag(checkpoint, model_dir, tmp_path, no_network):
    import shutil

    plain = Path(shutil.copy(checkpoint, tmp_path / "plain.safetensors"))
    assert EditEngine.from_pretrained(plain, model_config=model_dir).spec.prediction_type == "epsilon"
    flagged = EditEngine.from_pretrained(plain, model_config=model_dir, prediction_type="v_prediction")
    assert flagged.spec.prediction_type == "v_prediction"
    with_json = Path(shutil.copy(checkpoint, tmp_path / "j.safetensors"))
    (tmp_path / "j.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert (
        EditEngine.from_pretrained(with_json, model_config=model_dir).spec.prediction_type == "v_prediction"
    )
    with_yaml = Path(shutil.copy(checkpoint, tmp_path / "y.safetensors"))
    (tmp_path / "y.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert (
        EditEngine.from_pretrained(with_yaml, model_config=model_dir).spec.prediction_type == "v_prediction"
    )


def test_cli_generate_and_convert(checkpoint, model_dir, tmp_path, no_network):
    out = tmp_path / "edit.png"
    args = ["--model", str(checkpoint), "--model-config", str(model_dir), "--steps", "2", "--no-progress"]
    assert (
        main(
            [
                "generate",
                "-s",
                "a cat",
                "-t",
                "a dog",
                "-o",
                str(out),
                "--height",
                "64",
                "--width",
                "64",
                *args,
            ]
        )
        == 0
    )
    assert out.is_file()
    assert main(["convert", str(checkpoint), str(tmp_path / "f"), "--model-config", str(model_dir)]) == 0
    assert (tmp_path / "f" / "unet" / "config.json").is_file()


def test_shipped_sd1_configs_describe_sd15(no_network):
    """What ships in the package is SD 1.5: CLIP's token ids and the published parameter counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(SD1_CONFIG_DIR / "tokenizer"), local_files_only=True)
    # OpenAI CLIP's ids for this prompt (its tokenizer: 49406 start, 49407 end/pad).
    assert tokenizer("a photo of an astronaut riding a horse").input_ids == [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407,
    ]  # fmt: skip
    assert len(tokenizer) == 49408
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD1_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD1_CONFIG_DIR / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD1_CONFIG_DIR / "text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)


def test_export_from_single_file(checkpoint, model_dir, tmp_path, no_network):
    """``fpedit export --model FILE --model-config DIR`` exports the folder's model (same weights hash)."""
    pytest.importorskip("onnxruntime")
    from fpedit.engine.contract import ShapeRange
    from fpedit.engine.loading import load_components
    from fpedit.export.onnx_export import export_onnx, model_hash

    manifest = export_onnx(
        checkpoint,
        tmp_path / "onnx",
        model_config=model_dir,
        graphs=["text_encoder"],
        image_size=ShapeRange(64, 64, 64),
    )
    folder = load_components(model_dir)
    assert manifest.source_hash == model_hash(folder)
    assert manifest.spec == folder.spec
