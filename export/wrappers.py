"""torch modules whose inputs and outputs are exactly the contract's graphs, for export and verification.

The UNet variants reuse the torch backend's attention processors: the map math that ONNX Runtime and
TensorRT run is traced from the very code the reference backend executes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fpedit.engine.backends.attention import CallState, install_processors, unet_forward
from fpedit.engine.contract import ModelSpec


class UNetVariant(torch.nn.Module):
    """``plain``: noise only; ``capture``: noise and the maps of ``layers``; ``inject``: takes a map per
    layer and a (batch, layers) gate, > 0.5 meaning "use the given map in this row and layer"."""

    def __init__(
        self, unet: torch.nn.Module, spec: ModelSpec, variant: str, layers: Sequence[int], map_format: str
    ) -> None:
        super().__init__()
        install_processors(unet, spec)
        self.unet = unet
        self.variant = variant
        self.layers = tuple(layers)
        self.map_format = map_format

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *maps_and_gate,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        state = CallState(map_format=self.map_format)
        if self.variant == "capture":
            state.capture = frozenset(self.layers)
        elif self.variant == "inject":
            *maps, gate = maps_and_gate
            on = gate > 0.5
            for column, (layer, layer_map) in enumerate(zip(self.layers, maps, strict=True)):
                state.inject_maps[layer] = layer_map
                state.inject_rows[layer] = on[:, column]
        noise = unet_forward(self.unet, sample, timestep, encoder_hidden_states, state)
        if self.variant != "capture":
            return noise
        return (noise, *(state.captured[layer] for layer in self.layers))


class TextEncoder(torch.nn.Module):
    """Token ids → last hidden state, traced with CLIP's eager attention.

    The SDPA path exports its causal mask as float32 constants, which in an fp16 graph makes the residual
    stream float32 and the next LayerNormalization fail the ONNX checker (float16 scale, float32 input).
    Eager attention computes the same function with the mask in the activations' dtype.
    """

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        if hasattr(text_encoder, "set_attn_implementation"):
            text_encoder.set_attn_implementation("eager")
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


class VAEEncoder(torch.nn.Module):
    """Image in [-1, 1] → posterior mean (before the scaling factor)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean


class VAEDecoder(torch.nn.Module):
    """Latents already divided by the scaling factor → image in about [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample
