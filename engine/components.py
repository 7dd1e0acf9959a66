"""What loading a checkpoint produces (:class:`Components`) and the small readers every loader shares, kept
below both :mod:`.loading` and :mod:`.single_file` so that neither imports the other back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .contract import ModelSpec
from .errors import ModelLoadError


@dataclass
class Components:
    """The torch modules, tokenizer and spec of one checkpoint."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    spec: ModelSpec
    source: str
    #: LoRAs fused into the weights at load (:mod:`.lora`), as ``{"file", "scale"}``.
    loras: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for module in (self.unet, self.vae, self.text_encoder):
            own_memory(module)


#: The CPU allocator's alignment (c10's ``gAlignment``): memory torch allocates starts on a 64-byte boundary.
CPU_ALIGNMENT = 64


def own_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Copy ``module``'s CPU weights that live in a memory-mapped checkpoint into memory torch allocates.

    diffusers and transformers load safetensors without copying: each weight points into the mapped file at
    its byte offset, so its alignment depends on the file's header length and tensor order. CPU matmul kernels
    choose their code path (and so their summation order) by alignment: a folder and a single file holding
    bitwise equal weights gave edits differing in the last bits (``time_embedding.linear_1`` first). Copies
    start on :data:`CPU_ALIGNMENT`, so equal weights compute equally whatever file they came from.
    """
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
                tensor.data = tensor.data.clone()
    return module


def load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        raise ModelLoadError(f"missing tokenizer folder: {folder}")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise ModelLoadError(f"cannot load the CLIP tokenizer from {folder}: {exc}") from exc


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"missing {path}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"malformed {path}: {exc}") from exc
