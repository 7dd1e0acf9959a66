"""LoRA files the tests write (PEFT/diffusers and kohya keys) and the weights they merge by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

RANK = 4


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
    deltas = {
        "unet": {name: factor * (b @ a) for name, (a, b) in unet_factors.items()},
        "text_encoder": {name: factor * (b @ a) for name, (a, b) in text_factors.items()},
    }
    return folder_with_deltas(model_dir, out, deltas)


def folder_with_deltas(model_dir: Path, out: Path, deltas: dict[str, dict[str, torch.Tensor]]) -> Path:
    """A copy of the folder with ``deltas[component][module]`` added to each named module's weight."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    shutil.copytree(model_dir, out)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    text = CLIPTextModel.from_pretrained(out / "text_encoder")
    with torch.no_grad():
        for model, component in ((unet, "unet"), (text, "text_encoder")):
            modules = dict(model.named_modules())
            for name, delta in deltas[component].items():
                weight = modules[name].weight
                weight.copy_((weight.double() + delta.reshape(weight.shape)).to(weight.dtype))
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text.save_pretrained(out / "text_encoder", safe_serialization=True)
    return out


def file_deltas(
    path: Path, scale: float, modules: dict[str, list[str]]
) -> dict[str, dict[str, torch.Tensor]]:
    """``scale * alpha / r * up @ down`` (float64) per module of ``modules[component]`` that the file touches,
    read back from the file with plain torch: PEFT keys ``<component>.<module>.lora_A/B.weight`` with alpha
    and r from ``lora_adapter_metadata``, or kohya keys ``lora_unet_`` / ``lora_te_text_model_`` +
    ``<module with underscores>.lora_down/lora_up.weight`` with ``.alpha`` and r = lora_down's rows."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
    deltas: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for component, names in modules.items():
        for name in names:
            peft, kohya = f"{component}.{name}", kohya_prefix[component] + name.replace(".", "_")
            if f"{peft}.lora_A.weight" in tensors:
                down, up = tensors[f"{peft}.lora_A.weight"], tensors[f"{peft}.lora_B.weight"]
                alpha, rank = float(metadata[f"{component}.lora_alpha"]), int(metadata[f"{component}.r"])
            elif f"{kohya}.lora_down.weight" in tensors:
                down, up = tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"]
                alpha, rank = float(tensors[f"{kohya}.alpha"]), down.shape[0]
            else:
                continue
            product = up.double().flatten(1) @ down.double().flatten(1)
            deltas[component][name] = scale * alpha / rank * product
    return deltas


def write_peft_lora(path: Path, unet_factors, alpha: float, text_factors=None) -> Path:
    """diffusers/PEFT layout: ``unet.<module>.lora_A/B.weight`` (and ``text_encoder.<module>...``); alpha
    in ``lora_adapter_metadata``."""
    tensors, metadata = {}, {}
    for component, factors in (("unet", unet_factors), ("text_encoder", text_factors or {})):
        if not factors:
            continue
        for name, (a, b) in factors.items():
            tensors[f"{component}.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{component}.{name}.lora_B.weight"] = b.contiguous()
        metadata[f"{component}.r"] = RANK
        metadata[f"{component}.lora_alpha"] = alpha
        metadata[f"{component}.target_modules"] = sorted(factors)
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


def write_peft_and_kohya(folder: Path, raw_modules, names: tuple[str, str], seed: int) -> Path:
    """An adapter folder of two files on the same UNet modules: ``names[0]`` in the PEFT layout (UNet only,
    alpha 2), ``names[1]`` in kohya's (UNet and text encoder, alpha 1); factors drawn from ``seed`` on."""
    unet, text = raw_modules["unet"], raw_modules["text_encoder"]
    write_peft_lora(folder / f"{names[0]}.safetensors", random_factors(unet_targets(unet), seed), 2.0)
    write_kohya_lora(
        folder / f"{names[1]}.safetensors",
        random_factors(unet_targets(unet), seed + 1),
        random_factors(text_targets(text), seed + 2),
        1.0,
    )
    return folder
