"""The embedded ``tiny`` model: SD 1.x topology (16 self-attention layers, same blocks) at toy widths.

Weights are seeded random numbers and the tokenizer's vocabulary is the 256 byte symbols, so nothing is
downloaded. It exists for smoke runs, tests and CPU benchmarks; its images are noise-like by design.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SEED = 1234
TINY_IMAGE_SIZE = 64


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (the GPT-2 / CLIP convention)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt) with a byte-level vocabulary and no merges."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_configs(width: int = 32, text_width: int = 32) -> dict[str, dict]:
    """diffusers/transformers configs of the tiny model (SD 1.x block topology, small widths)."""
    return {
        "unet": {
            "sample_size": TINY_IMAGE_SIZE // 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [width, 2 * width, 2 * width, 2 * width],
            "layers_per_block": 2,
            "cross_attention_dim": text_width,
            "attention_head_dim": 4,
            "norm_num_groups": 16,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [16, 16, 32, 32],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": TINY_IMAGE_SIZE,
            "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "vocab_size": 514,
            "hidden_size": text_width,
            "intermediate_size": 2 * text_width,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 512,
            "eos_token_id": 513,
            "pad_token_id": 513,
        },
        "scheduler": {
            "_class_name": "PNDMScheduler",
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
        },
    }


def build_tiny_modules(seed: int = TINY_SEED, **widths: int) -> dict[str, object]:
    """Instantiate the tiny UNet, VAE and text encoder with seeded random weights (float32, CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = tiny_configs(**widths)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "configs": configs}


def save_tiny_model(folder: str | Path, seed: int = TINY_SEED, **widths: int) -> Path:
    """Write the tiny model as a diffusers-layout folder (safetensors), loadable like real SD 1.5 weights."""
    folder = Path(folder)
    modules = build_tiny_modules(seed, **widths)
    modules["unet"].save_pretrained(folder / "unet", safe_serialization=True)
    modules["vae"].save_pretrained(folder / "vae", safe_serialization=True)
    modules["text_encoder"].save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_tiny_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(modules["configs"]["scheduler"]))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
