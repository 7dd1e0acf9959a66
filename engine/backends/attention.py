"""Attention processors that capture and inject self-attention maps, and the per-call state they read.

Self-attention layers get :class:`FPESelfAttnProcessor`; every other attention gets a plain SDPA processor
that accepts (and ignores) the per-call state. The state travels through ``cross_attention_kwargs``, so
concurrent calls on one module never share it. The torch backend, its CUDA graphs and the export wrappers
all run these processors, so the map math that ONNX Runtime and TensorRT execute is the reference's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..calls import UNetCall
from ..contract import ModelSpec
from ..errors import InvalidInputError


class StopForward(Exception):
    """Raised after the last captured layer when the caller does not need the noise prediction."""


@dataclass
class CallState:
    """What one UNet forward captures, injects and borrows, per self-attention layer."""

    map_format: str = "qk"
    capture: frozenset[int] = frozenset()
    last_needed_layer: int | None = None  # stop the forward after this layer (capture-only calls)
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    inject_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    # Per injected layer: None when every row takes the maps, else a (B,) bool tensor on the device.
    inject_rows: dict[int, torch.Tensor | None] = field(default_factory=dict)
    # Per donor layer: (B,) long on the device, the row whose map each row attends with in that layer.
    donor_index: dict[int, torch.Tensor] = field(default_factory=dict)
    # Self-attention layer numbers whose block's cross-attention hands out its head-averaged probabilities.
    cross_probs: frozenset[int] = frozenset()
    cross_captured: dict[int, torch.Tensor] = field(default_factory=dict)

    def touches(self, layer: int) -> bool:
        """Whether ``layer`` reads or writes a map in this forward (only those take the ``probs`` path)."""
        return layer in self.capture or layer in self.inject_maps or layer in self.donor_index

    @classmethod
    def for_call(cls, call: UNetCall, device: torch.device) -> CallState:
        """The state of an eager forward: gates decided on the host, so layers no row uses cost nothing."""
        state = cls(
            map_format=call.map_format,
            capture=frozenset(call.capture),
            cross_probs=frozenset(call.cross_probs),
        )
        if not call.need_noise_pred and state.capture:
            state.last_needed_layer = max(state.capture)
        if call.inject is not None:
            if call.inject.maps.format != call.map_format:
                raise InvalidInputError("map_format", "injected maps are in another format than requested")
            gate = call.inject.gate.to("cpu", torch.bool)
            for column, layer in enumerate(call.inject.maps.layers):
                rows = gate[:, column]
                if not bool(rows.any()):
                    continue
                state.inject_maps[layer] = call.inject.maps.tensors[layer]
                state.inject_rows[layer] = None if bool(rows.all()) else rows.to(device, non_blocking=True)
        if call.donors is not None:
            for layer in call.donors.layers:
                index = call.donors.index(layer)
                if index is not None:
                    state.donor_index[layer] = torch.tensor(index, dtype=torch.long).to(
                        device, non_blocking=True
                    )
        return state

    @classmethod
    def dense(cls, call: UNetCall, layers: Sequence[int], spec: ModelSpec, device: torch.device) -> CallState:
        """The state a CUDA graph captures: every layer of ``layers`` that the call's variant touches gets
        a map tensor, a gate or a donor index on the device, whatever the call gates on, so one graph
        serves every layer subset and gate (copy a new call's :meth:`dense` tensors into it per replay)."""
        batch = call.rows
        h, w = call.sample.shape[-2:]
        state = cls(map_format=call.map_format)
        if call.capture:
            state.capture = frozenset(layers)
            if not call.need_noise_pred:
                state.last_needed_layer = max(layers)
        if call.inject is not None:
            gate = call.inject.gate.to("cpu", torch.bool)
            given = call.inject.maps.tensors
            for layer in layers:
                if layer in given:
                    maps = given[layer].to(device, call.sample.dtype).contiguous()
                    rows = gate[:, call.inject.maps.layers.index(layer)]
                else:
                    shape = spec.layer(layer).map_shape(call.map_format, batch, int(h), int(w))
                    maps = torch.zeros(shape, dtype=call.sample.dtype, device=device)
                    rows = torch.zeros(batch, dtype=torch.bool)
                state.inject_maps[layer] = maps
                state.inject_rows[layer] = rows.to(device)
        if call.donors is not None:
            for layer in layers:
                index = call.donors.index(layer) or list(range(batch))
                state.donor_index[layer] = torch.tensor(index, dtype=torch.long, device=device)
        return state

    def owned(self) -> CallState:
        """A copy whose map, gate and donor tensors are clones: a graph's static inputs must belong to the
        graph, since every replay copies the next call's values into them (:meth:`dense` may hand back the
        caller's own tensors, e.g. a contiguous slice of cached source maps, which must not be overwritten)."""
        return CallState(
            map_format=self.map_format,
            capture=self.capture,
            last_needed_layer=self.last_needed_layer,
            inject_maps={layer: t.clone() for layer, t in self.inject_maps.items()},
            inject_rows={layer: None if t is None else t.clone() for layer, t in self.inject_rows.items()},
            donor_index={layer: t.clone() for layer, t in self.donor_index.items()},
        )

    def load(self, other: CallState) -> None:
        """Copy ``other``'s (same-shaped, :meth:`dense`) maps, gates and donor indices into this state's
        tensors in place: what a graph replay reads."""
        for store, source in (
            (self.inject_maps, other.inject_maps),
            (self.inject_rows, other.inject_rows),
            (self.donor_index, other.donor_index),
        ):
            for layer, tensor in store.items():
                tensor.copy_(source[layer])  # type: ignore[union-attr]


class FPESelfAttnProcessor:
    """Self-attention that can hand out its map (capture) or use a given one (inject), per docs/design.md."""

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
        donor = state.donor_index.get(layer)

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, heads, head_dim).transpose(1, 2)

        if state.map_format == "probs" and state.touches(layer):
            scores = torch.matmul(split_heads(q), split_heads(k).transpose(-1, -2)) * attn.scale
            probs = scores.float().softmax(dim=-1).to(q.dtype)
            if layer in state.capture:
                state.captured[layer] = probs
            if donor is not None:
                probs = probs.index_select(0, donor)
            if inject is not None:
                probs = inject if rows is None else torch.where(rows.view(batch, 1, 1, 1), inject, probs)
            out = torch.matmul(probs, split_heads(v))
        else:  # qk maps, or a layer without maps: fused attention
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

        if state.last_needed_layer == layer:
            raise StopForward
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


class CrossAttnProbsProcessor(PlainAttnProcessor):
    """The cross-attention of self-attention layer ``layer``'s transformer block: unchanged output, and, when
    the call asks (``fpe.cross_probs``), its softmax over the text tokens averaged over heads, computed beside
    the fused attention (a blend's word masks read them; the output stays bit for bit a plain call's)."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, fpe=None
    ):
        if fpe is not None and self.layer in fpe.cross_probs and encoder_hidden_states is not None:
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            batch, tokens, _ = hidden_states.shape
            q, k = attn.to_q(hidden_states), attn.to_k(context)
            heads = attn.heads
            q = q.view(batch, tokens, heads, -1).transpose(1, 2).float()
            k = k.view(batch, k.shape[1], heads, -1).transpose(1, 2).float()
            fpe.cross_captured[self.layer] = (
                (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1).mean(dim=1)
            )
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, fpe)


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
    cross_attn = {path.removesuffix("attn1") + "attn2": index for path, index in self_attn.items()}
    processors: dict[str, object] = {}
    for name in unet.attn_processors:  # "<module path>.processor"
        path = name.removesuffix(".processor")
        if path in self_attn:
            processors[name] = FPESelfAttnProcessor(self_attn[path])
        elif path in cross_attn:
            processors[name] = CrossAttnProbsProcessor(cross_attn[path])
        else:
            processors[name] = PlainAttnProcessor()
    found = {p for p in self_attn if f"{p}.processor" in processors}
    if len(found) != len(self_attn):
        raise InvalidInputError("model", f"self-attention modules missing: {sorted(set(self_attn) - found)}")
    unet.set_attn_processor(processors)
