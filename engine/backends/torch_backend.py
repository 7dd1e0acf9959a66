"""The reference backend: diffusers modules with attention processors that capture and inject maps.

Self-attention layers get :class:`FPESelfAttnProcessor`; every other attention gets a plain SDPA processor
that accepts (and ignores) the per-call state. The state travels through ``cross_attention_kwargs``, so
concurrent calls on one backend never share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..contract import ModelSpec
from ..errors import InvalidInputError
from ..maps import AttentionMaps, Injection
from .base import Backend


class _StopForward(Exception):
    """Raised after the last captured layer when the caller does not need the noise prediction."""


@dataclass
class CallState:
    """What one UNet call captures and injects."""

    map_format: str = "qk"
    capture: frozenset[int] = frozenset()
    last_needed_layer: int | None = None  # stop the forward after this layer (capture-only calls)
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    inject_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    # Per injected layer: None when every row takes the maps, else a (B,) bool tensor on the device.
    inject_rows: dict[int, torch.Tensor | None] = field(default_factory=dict)
    # In-call donors: in these layers row i attends with row donor_index[i]'s map (same forward).
    donor_layers: frozenset[int] = frozenset()
    donor_index: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        map_format: str,
        capture: Sequence[int] | None,
        inject: Injection | None,
        device: torch.device,
        stop_after_capture: bool,
        donors: Sequence[int] | None = None,
        donor_layers: Sequence[int] = (),
    ) -> CallState:
        state = cls(map_format=map_format, capture=frozenset(capture or ()))
        if stop_after_capture and state.capture:
            state.last_needed_layer = max(state.capture)
        if inject is not None:
            if inject.maps.format != map_format:
                raise InvalidInputError("map_format", "injected maps are in another format than requested")
            gate = inject.gate.to("cpu", torch.bool)  # decided on the host: no device sync per layer
            for column, layer in enumerate(inject.maps.layers):
                rows = gate[:, column]
                if not bool(rows.any()):
                    continue
                state.inject_maps[layer] = inject.maps.tensors[layer]
                state.inject_rows[layer] = None if bool(rows.all()) else rows.to(device, non_blocking=True)
        if donors is not None and donor_layers and list(donors) != list(range(len(donors))):
            state.donor_layers = frozenset(donor_layers)
            state.donor_index = torch.tensor(list(donors), dtype=torch.long).to(device, non_blocking=True)
        return state


class FPESelfAttnProcessor:
    """Self-attention that can hand out its map (capture) or use a given one (inject), per DESIGN §1-2."""

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        fpe: CallState | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or attn.group_norm is not None or attn.spatial_norm is not None:
            raise NotImplementedError("SD 1.x self-attention has no mask, group norm or spatial norm")
        state = fpe or CallState()
        batch, tokens, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        head_dim = q.shape[-1] // heads
        layer = self.layer
        inject = state.inject_maps.get(layer)
        rows = state.inject_rows.get(layer)

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, heads, head_dim).transpose(1, 2)

        donor = state.donor_index if layer in state.donor_layers else None
        if state.map_format == "qk":
            if layer in state.capture:
                state.captured[layer] = torch.stack((q, k), dim=1)
            if donor is not None:
                q, k = q.index_select(0, donor), k.index_select(0, donor)
            if inject is not None:
                if rows is None:
                    q, k = inject[:, 0], inject[:, 1]
                else:
                    pick = rows.view(batch, 1, 1)
                    q, k = torch.where(pick, inject[:, 0], q), torch.where(pick, inject[:, 1], k)
            out = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v))
        else:
            scores = torch.matmul(split_heads(q), split_heads(k).transpose(-1, -2)) * attn.scale
            probs = scores.float().softmax(dim=-1).to(q.dtype)
            if layer in state.capture:
                state.captured[layer] = probs
            if donor is not None:
                probs = probs.index_select(0, donor)
            if inject is not None:
                probs = inject if rows is None else torch.where(rows.view(batch, 1, 1, 1), inject, probs)
            out = torch.matmul(probs, split_heads(v))

        if state.last_needed_layer == layer:
            raise _StopForward
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class PlainAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, accepting the per-call state that every attention receives."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, fpe=None
    ):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def unet_forward(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    state: CallState,
) -> torch.Tensor:
    """A diffusers UNet forward whose attention processors read ``state`` (installed by install_processors)."""
    return unet(
        sample,
        timestep,
        encoder_hidden_states=context,
        cross_attention_kwargs={"fpe": state},
        return_dict=False,
    )[0]


def install_processors(unet: torch.nn.Module, spec: ModelSpec) -> None:
    """Give every attention module of ``unet`` a processor that understands the FPE call state."""
    self_attn = {layer.module_path: layer.index for layer in spec.layers}
    processors = {}
    for name in unet.attn_processors:  # "<module path>.processor"
        path = name.removesuffix(".processor")
        processors[name] = (
            FPESelfAttnProcessor(self_attn[path]) if path in self_attn else PlainAttnProcessor()
        )
    found = {p for p in self_attn if f"{p}.processor" in processors}
    if len(found) != len(self_attn):
        raise InvalidInputError("model", f"self-attention modules missing: {sorted(set(self_attn) - found)}")
    unet.set_attn_processor(processors)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device, cast only when needed (diffusers warns on every ``.to(dtype)``), freeze."""
    current = next(module.parameters())
    if current.dtype != dtype:
        module = module.to(dtype=dtype)
    if current.device != device:
        module = module.to(device)
    return module.eval().requires_grad_(False)


class TorchBackend(Backend):
    """diffusers/transformers modules on a torch device: the reference, and the embedded default.

    On CUDA the UNet runs in fp16 (or bf16) with SDPA (flash) attention for every layer, injected ones
    included, channels-last convolutions, and each distinct call shape captured once as a CUDA graph and
    replayed (see :mod:`.cuda_graphs`); ``compile_unet`` adds ``torch.compile`` (experimental).
    """

    name = "torch"
    supports_donors = True

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        spec: ModelSpec,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
        max_batch: int = 8,
        cuda_graphs: bool | None = None,
        channels_last: bool | None = None,
        compile_unet: bool = False,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.dtype = dtype
        # The VAE *decoder* runs in bf16 on CUDA: fp32's range (SD's VAE overflows fp16) at a quarter of
        # fp32's time on an H200, 45 dB PSNR against fp32 decodes there. The encoder stays float32: the
        # inversion starts from its output and amplifies its rounding (a bf16 encoder cost a real edit of the
        # tiny model 22 dB of PSNR on that machine).
        self.vae_dtype = vae_dtype or (torch.bfloat16 if on_cuda else torch.float32)
        self.max_batch = max_batch
        self._unet = _place(unet, self.device, dtype)
        self._text = _place(text_encoder, self.device, dtype)
        self._vae = _place(vae, self.device, torch.float32)
        if self.vae_dtype != torch.float32:
            self._vae.decoder.to(self.vae_dtype)
            self._vae.post_quant_conv.to(self.vae_dtype)
        install_processors(self._unet, spec)
        self.channels_last = on_cuda if channels_last is None else channels_last
        if self.channels_last:
            self._unet.to(memory_format=torch.channels_last)
        self._forward_module: torch.nn.Module = self._unet
        if compile_unet:
            self._forward_module = torch.compile(self._unet, mode="max-autotune-no-cudagraphs", dynamic=False)
        self.graphs = None
        if on_cuda if cuda_graphs is None else cuda_graphs:
            from .cuda_graphs import UNetGraphs

            self.graphs = UNetGraphs(self)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._text(input_ids.to(self.device))[0]

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self._vae.encode(images.to(self.device, torch.float32)).latent_dist
        return posterior.mean.float()

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae.decode(latents.to(self.device, self.vae_dtype)).sample.float()

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, state: CallState
    ) -> torch.Tensor | None:
        """One UNet forward under ``state``; ``None`` when it stopped after the last captured layer."""
        try:
            return unet_forward(self._forward_module, sample, timestep, context, state)
        except _StopForward:
            return None

    @torch.inference_mode()
    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        capture: Sequence[int] | None = None,
        map_format: str = "qk",
        inject: Injection | None = None,
        need_noise_pred: bool = True,
        donors: Sequence[int] | None = None,
        donor_layers: Sequence[int] = (),
    ) -> tuple[torch.Tensor | None, AttentionMaps | None]:
        sample = sample.to(self.device, self.dtype)
        timestep = timestep.to(self.device, torch.float32)
        context = context.to(self.device, self.dtype)
        if self.graphs is not None:
            return self.graphs.run(
                sample,
                timestep,
                context,
                capture=capture,
                map_format=map_format,
                inject=inject,
                need_noise_pred=need_noise_pred,
                donors=donors,
                donor_layers=donor_layers,
            )
        state = CallState.build(
            map_format, capture, inject, self.device, not need_noise_pred, donors, donor_layers
        )
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        noise = self.forward(sample, timestep, context, state)
        maps = AttentionMaps(map_format, dict(state.captured)) if capture else None
        return noise, maps

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info.update(
            vae_dtype=str(self.vae_dtype).replace("torch.", ""),
            cuda_graphs=self.graphs is not None,
            channels_last=self.channels_last,
        )
        return info
