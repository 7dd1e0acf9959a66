"""Loading SD 1.x/2.x checkpoints from a local diffusers-layout folder, a single file (:mod:`.single_file`)
or the embedded ``tiny`` model.

Only safetensors weights load by default: pickled checkpoints (``.bin``, ``.ckpt``, ``.pt``) can run code when
unpickled, so they are refused unless the caller explicitly allows them. Nothing is fetched from a hub.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .components import Components, load_tokenizer
from .components import read_json as _read_json
from .contract import ModelSpec
from .errors import ModelLoadError, UnsupportedModelError
from .schedule import SD1_BETAS

log = logging.getLogger(__name__)

WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def _check_weights(folder: Path, allow_pickle: bool) -> bool:
    """Return whether safetensors weights are present; refuse pickles unless allowed."""
    if not folder.is_dir():
        raise ModelLoadError(f"missing model folder: {folder}")
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if "config.json" not in files:
        raise ModelLoadError(f"missing {folder / 'config.json'}")
    if any(name.endswith(".safetensors") for name in files):
        return True
    if any(name.endswith(PICKLE_SUFFIXES) for name in files):
        if allow_pickle:
            log.warning("loading pickled weights from %s (allow_pickle=True)", folder)
            return False
        raise ModelLoadError(
            f"{folder} holds only pickled weights, which can run code when loaded; convert them to "
            "safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust the files"
        )
    raise ModelLoadError(f"no weights (*.safetensors) in {folder}")


def read_spec(folder: Path, prediction_type: str | None = None) -> ModelSpec:
    """Build the :class:`ModelSpec` from a diffusers folder's configs, without loading weights."""
    scheduler_cfg_path = folder / "scheduler" / "scheduler_config.json"
    if scheduler_cfg_path.exists():
        scheduler = _read_json(scheduler_cfg_path)
    else:
        log.warning("%s has no scheduler/scheduler_config.json; using SD 1.x betas", folder)
        scheduler = dict(SD1_BETAS)
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type
    return ModelSpec.from_configs(
        _read_json(folder / "unet" / "config.json"),
        _read_json(folder / "vae" / "config.json"),
        _read_json(folder / "text_encoder" / "config.json"),
        scheduler,
    )


def load_components(
    model: str | Path,
    *,
    allow_pickle: bool = False,
    model_config: str | Path | None = None,
    prediction_type: str | None = None,
    loras: Sequence[Any] = (),
) -> Components:
    """Load ``model`` and fuse ``loras`` (``FILE[:SCALE]`` strings, paths or (path, scale) pairs) into it."""
    if loras:
        from .lora import check_loras

        check_loras(loras)  # a typo in a LoRA path fails before the model loads
    parts = _load_components(
        model, allow_pickle=allow_pickle, model_config=model_config, prediction_type=prediction_type
    )
    if loras:
        from .lora import apply_loras

        fused = apply_loras(parts.unet, parts.text_encoder, parts.tokenizer, loras)
        parts.loras = tuple(spec.describe() for spec in fused)
    return parts


def _load_components(
    model: str | Path,
    *,
    allow_pickle: bool = False,
    model_config: str | Path | None = None,
    prediction_type: str | None = None,
) -> Components:
    """Load ``model`` (a diffusers SD 1.x/2.x folder, a single-file checkpoint, or ``"tiny"``) as CPU modules.

    ``model_config`` (single files only) is a diffusers folder describing a non-standard checkpoint;
    ``prediction_type`` overrides the scheduler config's (``epsilon`` or ``v_prediction``)."""
    if str(model) == "tiny":
        return tiny_components()
    from . import single_file

    if single_file.is_single_file(model):
        return single_file.load_single_file(
            model, model_config=model_config, prediction_type=prediction_type, allow_pickle=allow_pickle
        )
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"model {str(model)!r} is neither 'tiny' nor a folder nor a .safetensors file; point it at a local "
            "diffusers-layout folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or an SD 1.x checkpoint"
        )
    if model_config is not None:
        raise ModelLoadError(
            "model_config (--model-config) describes single-file checkpoints; a folder has its own"
        )
    spec = read_spec(folder, prediction_type)
    safetensors = {name: _check_weights(folder / name, allow_pickle) for name in WEIGHT_FOLDERS}
    tokenizer = load_tokenizer(folder / "tokenizer")

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    modules = {}
    for name, cls in loaders.items():
        try:
            modules[name] = cls.from_pretrained(
                str(folder / name), use_safetensors=safetensors[name], local_files_only=True
            )
        except (UnsupportedModelError, ModelLoadError):
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load {folder / name}: {exc}") from exc
    return Components(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=tokenizer,
        spec=spec,
        source=str(folder.resolve()),
    )


def tiny_components() -> Components:
    from . import tiny

    modules = tiny.build_tiny_modules()
    configs = modules["configs"]
    spec = ModelSpec.from_configs(
        dict(modules["unet"].config),
        dict(modules["vae"].config),
        configs["text_encoder"],
        configs["scheduler"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(tiny.write_tiny_tokenizer(Path(tmp) / "tokenizer"))
    return Components(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=tokenizer,
        spec=spec,
        source="tiny",
    )
