"""Tiny seeded CLIP and ViT folders for the evaluation tests, written like the tiny SD model: real
transformers classes at toy widths, saved in the layout a downloaded model has, so the real loading runs."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from fpedit.engine.tiny import tiny_configs, write_tiny_tokenizer


def save_tiny_clip(folder: Path, seed: int = 11) -> Path:
    """CLIPModel (32-px vision tower, byte-level tokenizer) and its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    config = CLIPConfig(
        text_config=tiny_configs()["text_encoder"],  # the tiny SD model's text tower and tokenizer
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(folder / "_tokenizer"))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


def save_tiny_vit(folder: Path, seed: int = 12) -> Path:
    """ViTModel with DINO's layout at toy widths (224-px input, 16-px patches)."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=224,
        patch_size=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def block_network(monkeypatch) -> None:
    """Any connection attempt fails: the tests prove the models load from the folders alone."""

    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
