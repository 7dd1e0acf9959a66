"""LoRA files fused into the UNet and text encoder weights once, at load.

diffusers' ``load_lora_weights`` reads diffusers/PEFT and kohya key layouts and honours alpha wherever the
file keeps it (kohya ``.alpha`` keys, the ``lora_adapter_metadata`` safetensors metadata; the rank when
absent); ``fuse_lora`` adds ``scale * alpha / r * B @ A`` to each matched weight. The LoRA layers are then
unloaded, so the modules are plain again: an edit costs the same with or without LoRA, CUDA graphs and
``torch.compile`` see fused weights, and ``fpedit export`` bakes them into the ONNX graphs.

Each file is loaded, fused and unloaded before the next one loads: PEFT unmerges every adapter of a layer
that gets a new one ("Adapter cannot be set when the model is merged"), so loading a second file onto
modules the first one had fused would take the first back out of the weights. Unloading keeps the fused
weights and leaves plain modules for the next file to wrap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the scale it is fused with."""

    path: Path
    scale: float = 1.0

    def describe(self) -> dict[str, Any]:
        return {"file": str(self.path), "scale": self.scale}


def parse_lora(value: str | Path | LoraSpec | tuple[str | Path, float]) -> LoraSpec:
    """``FILE`` or ``FILE:SCALE`` (CLI), a path, a (path, scale) pair, or a :class:`LoraSpec`."""
    if isinstance(value, LoraSpec):
        return value
    if isinstance(value, tuple):
        path, scale = value
        return LoraSpec(Path(path).expanduser(), float(scale))
    text = str(value)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return LoraSpec(Path(head).expanduser(), float(tail))
        except ValueError:
            pass  # a colon inside the path, not a scale
    return LoraSpec(Path(text).expanduser())


def check_loras(loras: Sequence[Any]) -> list[LoraSpec]:
    """Parse ``loras`` and refuse a missing or non-safetensors file before any model loads."""
    specs = [parse_lora(item) for item in loras]
    for spec in specs:
        if not spec.path.is_file():
            raise InvalidInputError("loras", f"no such LoRA file: {spec.path}")
        if spec.path.suffix.lower() != ".safetensors":
            raise InvalidInputError("loras", f"{spec.path}: LoRAs load from .safetensors files only")
    return specs


def lora_pipeline(unet: Any, text_encoder: Any, tokenizer: Any) -> Any:
    """A VAE-less diffusers pipeline over the modules: its LoRA loader reads PEFT/diffusers and kohya keys
    alike and puts the layers into the modules themselves, which is all fpedit takes from it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def apply_loras(unet: Any, text_encoder: Any, tokenizer: Any, loras: Sequence[Any]) -> list[LoraSpec]:
    """Fuse ``loras`` into ``unet`` and ``text_encoder`` in place; returns them as parsed. A file whose keys
    match no module is an error naming it."""
    specs = check_loras(loras)
    if not specs:
        return []
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading needs it)
    except ModuleNotFoundError as exc:
        raise ModelLoadError("LoRA loading needs peft: pip install 'fpedit[engine]'") from exc
    pipe = lora_pipeline(unet, text_encoder, tokenizer)
    for index, spec in enumerate(specs):
        name = f"fpedit_lora_{index}"
        try:
            pipe.load_lora_weights(str(spec.path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot load LoRA {spec.path}: {exc}") from exc
        adapters = pipe.get_list_adapters()
        if not any(name in names for names in adapters.values()):
            raise ModelLoadError(f"LoRA {spec.path} matches no UNet or text encoder module of this model")
        components = [c for c, names in adapters.items() if name in names]
        pipe.fuse_lora(components=components, lora_scale=spec.scale, adapter_names=[name])
        # Before the next file loads: its adapters would unmerge this one's on shared modules.
        pipe.unload_lora_weights()
        log.info("fused LoRA %s (scale %s) into %s", spec.path, spec.scale, ", ".join(components))
    return specs
