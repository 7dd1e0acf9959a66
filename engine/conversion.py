"""``fpedit convert``: a single-file checkpoint into a diffusers folder and back (:mod:`.single_file` reads
and writes the original key layout; :mod:`.loading` loads either form). Apart from both so that neither of
them imports the other back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, UnsupportedModelError
from .loading import load_components
from .single_file import SD1_CONFIG_DIR, is_single_file, original_state_dict


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    model_config: str | Path | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
    loras: Any = (),
) -> Path:
    """``fpedit convert``: a single file into a diffusers folder, or a diffusers folder into a single file
    (``.safetensors``, original SD 1.x key layout). Weights keep their stored precision; ``loras`` are fused
    into what is written."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise ModelLoadError(f"{dst} exists; choose a new path")
    if is_single_file(src):
        parts = load_components(
            src,
            allow_pickle=allow_pickle,
            model_config=model_config,
            prediction_type=prediction_type,
            loras=loras,
        )
        _save_folder(parts, dst)
        return dst
    if src.is_dir():
        if dst.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"write a single file as .safetensors, got {dst}")
        from safetensors.torch import save_file

        parts = load_components(src, allow_pickle=allow_pickle, prediction_type=prediction_type, loras=loras)
        if parts.text_encoder.config.hidden_act != "quick_gelu" or parts.unet.config.use_linear_projection:
            raise UnsupportedModelError(
                "only SD 1.x-layout folders convert to a single file (SD 2.x is refused)"
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file(original_state_dict(parts.unet, parts.vae, parts.text_encoder), str(dst))
        if parts.spec.prediction_type != "epsilon":
            dst.with_suffix(".json").write_text(json.dumps({"prediction_type": parts.spec.prediction_type}))
        return dst
    raise ModelLoadError(f"{src} is neither a single-file checkpoint nor a diffusers folder")


def _save_folder(parts: Any, dst: Path) -> None:
    parts.unet.save_pretrained(dst / "unet", safe_serialization=True)
    parts.vae.save_pretrained(dst / "vae", safe_serialization=True)
    parts.text_encoder.save_pretrained(dst / "text_encoder", safe_serialization=True)
    parts.tokenizer.save_pretrained(str(dst / "tokenizer"))
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = {"_class_name": "DDIMScheduler", **parts.spec.scheduler}
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = json.loads((SD1_CONFIG_DIR / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
