"""Single-file checkpoints (the original Stable Diffusion key layout), loaded and written fully offline.

diffusers' ``from_single_file`` reads a checkpoint's weights but, unless given a local ``config``, fetches the
component configs and tokenizer from a hub. fpedit ships the SD 1.x ones (``configs/sd1``: the configs as
JSON, CLIP's tokenizer derived from its BPE file, see ``configs/derive_tokenizer.py``) and passes them with
``local_files_only=True``, so nothing is fetched. A checkpoint whose shapes are not standard SD 1.x takes
``model_config``: a diffusers folder whose configs, tokenizer and scheduler describe it.

The variant is read from the keys; SDXL, SD 3, inpainting UNets (9 input channels) and SD 2.x single files
without ``model_config`` are refused with one line. ε or v is not in the keys: ``prediction_type`` (CLI
``--prediction-type``) or a sidecar next to the file (``NAME.yaml`` with the original ``parameterization: "v"``,
or ``NAME.json`` with ``{"prediction_type": "v_prediction"}``) says v.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

SD1_CONFIG_DIR = Path(__file__).parent / "configs" / "sd1"
SAFE_SUFFIXES = (".safetensors",)
PICKLE_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = SAFE_SUFFIXES + PICKLE_FILE_SUFFIXES

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."


def is_single_file(model: str | Path) -> bool:
    path = Path(model).expanduser()
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and not path.is_dir()


# --- reading ------------------------------------------------------------------------------------------------


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def stored_dtype(path: Path, allow_pickle: bool) -> torch.dtype:
    """The precision the UNet's weights are stored in (converted weights keep it: no silent fp16 or fp32)."""
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype(), torch.float32)
    return _read_pickle(path, allow_pickle)[key].dtype


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} is a pickled checkpoint, which can run code when loaded; convert it to safetensors, or "
            "pass allow_pickle=True (CLI: --allow-pickle) if you trust the file"
        )
    log.warning("loading pickled checkpoint %s (allow_pickle=True)", path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds no state dict")
    return {k: v for k, v in data.items() if torch.is_tensor(v)}


def checkpoint_keys(path: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes, without loading safetensors weights (a pickled file only
    with ``allow_pickle``)."""
    if not path.is_file():
        raise ModelLoadError(f"no such checkpoint file: {path}")
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        except Exception as exc:
            raise ModelLoadError(f"cannot read {path} as safetensors: {exc}") from exc
    return {k: tuple(v.shape) for k, v in _read_pickle(path, allow_pickle).items()}


def detect_variant(shapes: dict[str, tuple[int, ...]]) -> str:
    """``"sd1"`` or ``"sd2"`` from a checkpoint's keys; anything else is refused with one line."""
    keys = set(shapes)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise UnsupportedModelError(
            "this checkpoint is SDXL (conditioner.embedders.* keys); fpedit edits SD 1.x/2.x"
        )
    if any(".joint_blocks." in k for k in keys):
        raise UnsupportedModelError("this checkpoint is SD 3 (joint_blocks keys); fpedit edits SD 1.x/2.x")
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in not in keys:
        raise UnsupportedModelError(
            f"not a Stable Diffusion checkpoint in the original key layout (no {conv_in}); a diffusers folder "
            "loads as a folder"
        )
    if shapes[conv_in][1] != 4:
        raise UnsupportedModelError(
            f"the UNet takes {shapes[conv_in][1]} input channels (an inpainting or other conditioned "
            "model); fpedit edits with 4-channel SD 1.x/2.x UNets"
        )
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith(TEXT_PREFIX) for k in keys):
        return "sd1"
    raise UnsupportedModelError("no CLIP text encoder in the checkpoint (cond_stage_model.transformer.*)")


def sidecar_prediction_type(path: Path) -> str | None:
    """The prediction type a sidecar next to ``path`` declares: ``NAME.yaml``/``.yml`` (original config,
    ``parameterization: "v"``) or ``NAME.json`` (``prediction_type``); None when there is none."""
    for suffix in (".yaml", ".yml"):
        side = path.with_suffix(suffix)
        if side.is_file():
            import yaml

            try:
                data = yaml.safe_load(side.read_text())
            except (OSError, yaml.YAMLError) as exc:
                raise ModelLoadError(f"malformed {side}: {exc}") from exc
            params = ((data or {}).get("model") or {}).get("params") or {}
            return "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            data = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"malformed {side}: {exc}") from exc
        return data.get("prediction_type") if isinstance(data, dict) else None
    return None


# diffusers' words for a weight whose shape is not the config's: "NAME expected shape torch.Size([...]), but got
# torch.Size([...])"; its advice (ignore_mismatched_sizes) would load random weights, so it is not passed on.
_SHAPE_MISMATCH = re.compile(
    r"(\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\((\[[^\]]*\])\)"
)


def load_single_file(
    path: str | Path,
    *,
    model_config: str | Path | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
) -> Any:
    """Load a single-file checkpoint offline; returns :class:`~fpedit.engine.loading.Components`."""
    from diffusers import StableDiffusionPipeline

    from .components import Components
    from .components import read_json as _read_json
    from .contract import ModelSpec

    path = Path(path).expanduser()
    variant = detect_variant(checkpoint_keys(path, allow_pickle))
    if model_config is None:
        if variant != "sd1":
            raise UnsupportedModelError(
                f"{path.name} is an SD 2.x checkpoint: pass model_config (CLI: --model-config DIR), a diffusers "
                "SD 2.x folder whose configs describe it, or load the diffusers folder itself"
            )
        config_dir = SD1_CONFIG_DIR
    else:
        config_dir = Path(model_config).expanduser()
        if not (config_dir / "unet" / "config.json").is_file():
            raise ModelLoadError(f"model config {config_dir} is not a diffusers folder (no unet/config.json)")
    scheduler = _read_json(config_dir / "scheduler" / "scheduler_config.json")
    declared = prediction_type or sidecar_prediction_type(path)
    if declared is not None:
        scheduler["prediction_type"] = declared
    from .components import load_tokenizer

    tokenizer = load_tokenizer(config_dir / "tokenizer")
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_dir),
            local_files_only=True,
            torch_dtype=stored_dtype(path, allow_pickle),
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (UnsupportedModelError, ModelLoadError):
        raise
    except Exception as exc:
        mismatch = _SHAPE_MISMATCH.search(str(exc))
        if model_config is None and mismatch is not None:
            name, standard, stored = mismatch.groups()
            raise UnsupportedModelError(
                f"{path.name} is not a standard-size SD 1.x checkpoint ({name} is {stored}, SD 1.x has "
                f"{standard}): pass model_config (CLI: --model-config DIR), a diffusers folder whose configs "
                "describe it"
            ) from None
        raise ModelLoadError(f"cannot load {path} with the configs of {config_dir}: {exc}") from exc
    spec = ModelSpec.from_configs(
        dict(pipe.unet.config), dict(pipe.vae.config), pipe.text_encoder.config.to_dict(), scheduler
    )
    return Components(
        unet=pipe.unet.eval(),
        vae=pipe.vae.eval(),
        text_encoder=pipe.text_encoder.eval(),
        tokenizer=tokenizer,
        spec=spec,
        source=str(path.resolve()),
    )


# --- writing: diffusers module names -> the original layout ----------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1"}
_RESNET |= {"norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_key(name: str) -> str:
    """A diffusers UNet2DConditionModel key in the LDM ``model.diffusion_model`` layout (SD 1.x/2.x)."""
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    module, _, leaf = name.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    parts = name.split(".")
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.B.downsamplers.0.conv.X
            return f"input_blocks.{3 * block + 3}.0.op.{parts[-1]}"
        index = int(parts[3])
        where = f"input_blocks.{3 * block + index + 1}.{0 if kind == 'resnets' else 1}"
        rest = parts[4:]
    elif parts[0] == "mid_block":
        kind, index = parts[1], int(parts[2])
        where = f"middle_block.{1 if kind == 'attentions' else 2 * index}"
        rest = parts[3:]
    elif parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # up_blocks.B.upsamplers.0.conv.X; after the resnet (and attention)
            slot = 1 if block == 0 else 2
            return f"output_blocks.{3 * block + 2}.{slot}.conv.{parts[-1]}"
        index = int(parts[3])
        where = f"output_blocks.{3 * block + index}.{0 if kind == 'resnets' else 1}"
        rest = parts[4:]
    else:
        raise ValueError(f"unexpected UNet key {name}")
    if kind == "resnets":
        rest = [_RESNET.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([where, *rest])


def _vae_key(name: str) -> str:
    """A diffusers AutoencoderKL key in the LDM ``first_stage_model`` layout."""
    for old, new in (
        ("conv_norm_out", "norm_out"),
        ("mid_block.resnets.0", "mid.block_1"),
        ("mid_block.resnets.1", "mid.block_2"),
        ("mid_block.attentions.0", "mid.attn_1"),
        ("conv_shortcut", "nin_shortcut"),
    ):
        name = name.replace(old, new)
    name = re.sub(r"attn_1\.group_norm", "attn_1.norm", name)
    name = re.sub(r"attn_1\.to_(q|k|v)", r"attn_1.\1", name)
    name = name.replace("attn_1.to_out.0", "attn_1.proj_out")
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)

    def up(match: re.Match[str], kind: str) -> str:
        return f"decoder.up.{3 - int(match.group(1))}.{kind}."

    name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m, "block"), name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m, "upsample"), name)
    return name


def original_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict:
    """The three modules' weights in the original SD 1.x single-file layout, in their stored dtypes."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in unet.state_dict().items():
        out[UNET_PREFIX + _unet_key(name)] = tensor
    for name, tensor in vae.state_dict().items():
        key = _vae_key(name)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + key] = tensor
    for name, tensor in text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel; checkpoints keep the ``text_model.`` level.
        out[TEXT_PREFIX + (name if name.startswith("text_model.") else "text_model." + name)] = tensor
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}
