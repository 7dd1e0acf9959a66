"""The engine I/O contract: one definition read by the torch backend, the ONNX exporter, ONNX Runtime and TensorRT.

It fixes

* how SD 1.x's 16 self-attention layers are numbered (execution order: down 1-6, mid 7, up 8-16) and where
  each one lives in a diffusers ``UNet2DConditionModel``;
* the two map formats (``qk``: projected queries and keys, ``probs``: softmax probabilities) and their shapes;
* the UNet variants (``plain``, ``capture``, ``inject``) with their tensor names, shapes, dtypes and dynamic axes;
* the text encoder and VAE graphs' tensor names;
* :class:`ModelSpec`, everything the pure-Python engine needs to know about a checkpoint besides its weights.

Nothing here imports torch, diffusers or onnx: every runtime can read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, UnsupportedModelError

NUM_SELF_ATTENTION_LAYERS = 16
#: What the UNet predicts (the scheduler config's ``prediction_type``); engine.schedule converts v to eps.
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
#: The paper's choice (section 3.5): layers 4-14.
PAPER_LAYERS: tuple[int, ...] = tuple(range(4, 15))
#: The authors' code picked layers whose self-attention spans at most this many tokens (32x32).
RESOLUTION_MAX_TOKENS = 32 * 32
LAYER_PRESETS = ("paper", "resolution")

MAP_FORMATS: tuple[str, ...] = ("qk", "probs")

VARIANTS: tuple[str, ...] = ("plain", "capture", "inject")

# --- tensor names -------------------------------------------------------------------------------------------
SAMPLE = "sample"
TIMESTEP = "timestep"
CONTEXT = "encoder_hidden_states"
NOISE_PRED = "noise_pred"
MAP_GATE = "map_gate"

INPUT_IDS = "input_ids"
TEXT_EMBEDDINGS = "text_embeddings"
IMAGES = "images"
LATENT_MEAN = "latent_mean"
LATENTS = "latents"
DECODED = "decoded"

SD1_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD1_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def map_input_name(layer: int) -> str:
    return f"map_in_{layer:02d}"


def map_output_name(layer: int) -> str:
    return f"map_out_{layer:02d}"


@dataclass(frozen=True)
class SelfAttentionLayer:
    """One self-attention layer of the UNet, numbered 1..16 in execution order."""

    index: int
    module_path: str  # dotted path of the diffusers ``Attention`` module (``...transformer_blocks.0.attn1``)
    downsample: int  # latent side / token-grid side: 1, 2, 4 or 8
    channels: int
    heads: int

    def tokens(self, latent_height: int, latent_width: int) -> int:
        return (latent_height // self.downsample) * (latent_width // self.downsample)

    def map_shape(
        self, map_format: str, batch: int, latent_height: int, latent_width: int
    ) -> tuple[int, ...]:
        """Shape of this layer's map for ``batch`` samples: qk (B, 2, N, C) or probs (B, heads, N, N)."""
        n = self.tokens(latent_height, latent_width)
        if map_format == "qk":
            return (batch, 2, n, self.channels)
        if map_format == "probs":
            return (batch, self.heads, n, n)
        raise InvalidInputError("map_format", f"must be one of {MAP_FORMATS}, got {map_format!r}")


@dataclass(frozen=True)
class ModelSpec:
    """What the engine must know about an SD 1.x checkpoint, independent of the runtime that executes it."""

    layers: tuple[SelfAttentionLayer, ...]
    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    text_max_length: int
    text_hidden_size: int
    default_image_size: int
    #: betas and prediction type only: see engine.schedule
    scheduler: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.get("prediction_type", "epsilon"))

    def layer(self, index: int) -> SelfAttentionLayer:
        return self.layers[index - 1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        d = dict(data)
        d["layers"] = tuple(SelfAttentionLayer(**layer) for layer in d["layers"])
        return cls(**d)

    @classmethod
    def from_configs(
        cls,
        unet: Mapping[str, Any],
        vae: Mapping[str, Any],
        text_encoder: Mapping[str, Any],
        scheduler: Mapping[str, Any],
    ) -> ModelSpec:
        """Derive the spec from the diffusers/transformers config dicts; refuse anything not SD 1.x-shaped."""
        layers = self_attention_layers(unet)
        vae_blocks = len(vae.get("block_out_channels", (0, 0, 0, 0)))
        scale_factor = 2 ** (vae_blocks - 1)
        if unet.get("in_channels", 4) != vae.get("latent_channels", 4):
            raise UnsupportedModelError("the UNet's in_channels differ from the VAE's latent_channels")
        prediction = scheduler.get("prediction_type") or "epsilon"
        if prediction not in PREDICTION_TYPES:
            raise UnsupportedModelError(
                f"prediction_type {prediction!r}: fpedit runs UNets that predict {' or '.join(PREDICTION_TYPES)}"
            )
        betas = {
            k: scheduler[k]
            for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
            if k in scheduler and scheduler[k] is not None
        }
        betas["prediction_type"] = prediction
        sample_size = unet.get("sample_size", 64)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        return cls(
            layers=layers,
            latent_channels=int(vae.get("latent_channels", 4)),
            vae_scale_factor=scale_factor,
            vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            text_max_length=int(text_encoder.get("max_position_embeddings", 77)),
            text_hidden_size=int(text_encoder.get("hidden_size", 768)),
            default_image_size=int(sample_size) * scale_factor,
            scheduler=betas,
        )


def self_attention_layers(unet: Mapping[str, Any]) -> tuple[SelfAttentionLayer, ...]:
    """Number the self-attention layers of an SD 1.x UNet config in execution order.

    ``UNet2DConditionModel.named_modules()`` lists the up blocks before the mid block, so the order is built
    from the block topology instead: down blocks, then the mid block, then the up blocks.
    """
    down = tuple(unet.get("down_block_types", ()))
    up = tuple(unet.get("up_block_types", ()))
    per_block = unet.get("layers_per_block", 2)
    depth = unet.get("transformer_layers_per_block", 1)
    mid = unet.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if down != SD1_DOWN_BLOCKS or up != SD1_UP_BLOCKS or mid not in (None, "UNetMidBlock2DCrossAttn"):
        raise UnsupportedModelError(f"not an SD 1.x UNet: down blocks {down}, up blocks {up}, mid {mid}")
    if per_block != 2 or depth not in (1, [1, 1, 1, 1], (1, 1, 1, 1)):
        raise UnsupportedModelError(
            f"not an SD 1.x UNet: layers_per_block={per_block}, transformer_layers_per_block={depth}"
        )
    channels = list(unet["block_out_channels"])
    heads_cfg = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)
    heads = list(heads_cfg) if isinstance(heads_cfg, (list, tuple)) else [heads_cfg] * len(channels)
    layers: list[tuple[str, int, int, int]] = []
    for b in range(3):
        for a in range(2):
            layers.append((f"down_blocks.{b}.attentions.{a}", 2**b, channels[b], heads[b]))
    layers.append(("mid_block.attentions.0", 8, channels[-1], heads[-1]))
    rev_channels, rev_heads = channels[::-1], heads[::-1]
    for b in range(1, 4):
        for a in range(3):
            layers.append((f"up_blocks.{b}.attentions.{a}", 2 ** (3 - b), rev_channels[b], rev_heads[b]))
    return tuple(
        SelfAttentionLayer(
            index=i + 1,
            module_path=f"{path}.transformer_blocks.0.attn1",
            downsample=down_factor,
            channels=int(ch),
            heads=int(h),
        )
        for i, (path, down_factor, ch, h) in enumerate(layers)
    )


def resolve_layers(
    layers: str | Sequence[int], spec: ModelSpec | None = None, latent_hw: tuple[int, int] | None = None
) -> tuple[int, ...]:
    """Turn a preset name or layer numbers into sorted, validated 1-based layer numbers."""
    if isinstance(layers, str):
        if layers == "paper":
            return PAPER_LAYERS
        if layers == "resolution":
            if spec is None or latent_hw is None:
                raise InvalidInputError("layers", "the 'resolution' preset needs the model and image size")
            return tuple(
                layer.index for layer in spec.layers if layer.tokens(*latent_hw) <= RESOLUTION_MAX_TOKENS
            )
        raise InvalidInputError("layers", f"unknown preset {layers!r}; use {LAYER_PRESETS} or numbers 1..16")
    items = list(layers)
    numbers = [int(x) for x in items if isinstance(x, Integral) and not isinstance(x, bool)]
    if len(numbers) != len(items):
        raise InvalidInputError("layers", f"must be integers 1..16, got {items!r}")
    bad = [x for x in numbers if not 1 <= x <= NUM_SELF_ATTENTION_LAYERS]
    if bad:
        raise InvalidInputError("layers", f"self-attention layers are numbered 1..16; got {bad}")
    return tuple(sorted(set(numbers)))


# --- graph I/O ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output. ``shape`` entries are ints or names of dynamic axes."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # "float32", "float16", "int64"


def unet_io(
    variant: str, spec: ModelSpec, layers: Sequence[int], map_format: str, precision: str = "float32"
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a UNet variant. Map tensors carry one row per sample, like ``sample``."""
    if variant not in VARIANTS:
        raise InvalidInputError("variant", f"must be one of {VARIANTS}, got {variant!r}")
    if map_format not in MAP_FORMATS:
        raise InvalidInputError("map_format", f"must be one of {MAP_FORMATS}, got {map_format!r}")
    c = spec.latent_channels
    inputs = [
        TensorSpec(SAMPLE, ("batch", c, "latent_height", "latent_width"), precision),
        TensorSpec(TIMESTEP, ("batch",), "float32"),
        TensorSpec(CONTEXT, ("batch", spec.text_max_length, spec.text_hidden_size), precision),
    ]
    outputs = [TensorSpec(NOISE_PRED, ("batch", c, "latent_height", "latent_width"), precision)]
    maps = [_map_tensor(spec.layer(i), map_format, precision) for i in layers]
    if variant == "capture":
        outputs += [
            TensorSpec(map_output_name(i), m.shape, m.dtype) for i, m in zip(layers, maps, strict=True)
        ]
    elif variant == "inject":
        inputs += [TensorSpec(map_input_name(i), m.shape, m.dtype) for i, m in zip(layers, maps, strict=True)]
        inputs.append(TensorSpec(MAP_GATE, ("batch", len(layers)), "float32"))
    return inputs, outputs


def _map_tensor(layer: SelfAttentionLayer, map_format: str, precision: str) -> TensorSpec:
    tokens = f"tokens_{layer.index:02d}"
    if map_format == "qk":
        shape: tuple[int | str, ...] = ("batch", 2, tokens, layer.channels)
    else:
        shape = ("batch", layer.heads, tokens, tokens)
    return TensorSpec("", shape, precision)


def text_encoder_io(spec: ModelSpec, precision: str = "float32") -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (
        [TensorSpec(INPUT_IDS, ("batch", spec.text_max_length), "int64")],
        [TensorSpec(TEXT_EMBEDDINGS, ("batch", spec.text_max_length, spec.text_hidden_size), precision)],
    )


def vae_encoder_io(spec: ModelSpec, precision: str = "float32") -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (
        [TensorSpec(IMAGES, ("batch", 3, "height", "width"), precision)],
        [
            TensorSpec(
                LATENT_MEAN, ("batch", spec.latent_channels, "latent_height", "latent_width"), precision
            )
        ],
    )


def vae_decoder_io(spec: ModelSpec, precision: str = "float32") -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (
        [TensorSpec(LATENTS, ("batch", spec.latent_channels, "latent_height", "latent_width"), precision)],
        [TensorSpec(DECODED, ("batch", 3, "height", "width"), precision)],
    )


def concrete_shape(
    tensor: TensorSpec, batch: int, latent_hw: tuple[int, int], spec: ModelSpec
) -> tuple[int, ...]:
    """Resolve a tensor's dynamic axes for a batch size and latent size (profiles, buffer allocation)."""
    lh, lw = latent_hw
    f = spec.vae_scale_factor
    named = {"batch": batch, "latent_height": lh, "latent_width": lw, "height": lh * f, "width": lw * f}
    out = []
    for dim in tensor.shape:
        if isinstance(dim, int):
            out.append(dim)
        elif dim.startswith("tokens_"):
            out.append(spec.layer(int(dim.split("_")[1])).tokens(lh, lw))
        else:
            out.append(named[dim])
    return tuple(out)


# --- exported model directories -----------------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
EXPORT_FORMAT = "fpedit-onnx"
ENGINE_FORMAT = "fpedit-tensorrt"
FORMAT_VERSION = 1
UNET_GRAPHS = {"plain": "unet_plain", "capture": "unet_capture", "inject": "unet_inject"}
#: The one external-data file the UNet graphs of an export share: the three variants hold the same weights,
#: so each tensor is stored once and every graph points at it (ONNX external data: location, offset, length).
UNET_WEIGHTS_FILE = "unet.weights"
#: Offsets of tensors in a shared weights file are multiples of this (a page), so a runtime can map each
#: tensor straight from the file and every tensor starts on a cache line.
WEIGHTS_ALIGNMENT = 4096
GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder", *UNET_GRAPHS.values())


@dataclass(frozen=True)
class ShapeRange:
    """A min/opt/max range (batch rows, or image side in pixels); opt is what TensorRT tunes for."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise InvalidInputError("shape range", f"needs 1 <= min <= opt <= max, got {self}")

    @classmethod
    def parse(cls, text: str, field: str) -> ShapeRange:
        """``"8"`` (static) or ``"MIN:OPT:MAX"``."""
        try:
            parts = [int(x) for x in text.split(":")]
        except ValueError as exc:
            raise InvalidInputError(field, f"expected N or MIN:OPT:MAX, got {text!r}") from exc
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3:
            raise InvalidInputError(field, f"expected N or MIN:OPT:MAX, got {text!r}")
        try:
            return cls(*parts)
        except InvalidInputError as exc:
            raise InvalidInputError(field, exc.reason) from exc


def graph_io(
    graph: str, spec: ModelSpec, layers: Sequence[int], map_format: str, precision: str
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of one exported graph, by its name in :data:`GRAPHS`."""
    if graph == "text_encoder":
        return text_encoder_io(spec, precision)
    if graph == "vae_encoder":
        return vae_encoder_io(spec, "float32")
    if graph == "vae_decoder":
        return vae_decoder_io(spec, "float32")
    variant = {v: k for k, v in UNET_GRAPHS.items()}[graph]
    return unet_io(variant, spec, layers, map_format, precision)


@dataclass(frozen=True)
class ExportManifest:
    """``manifest.json`` of an export (or engine) directory: everything a runtime needs besides weights."""

    spec: ModelSpec
    layers: tuple[int, ...]
    map_format: str
    precision: str  # UNet and text encoder; the VAE graphs stay float32 (fp16 VAEs overflow)
    opset: int
    batch: ShapeRange
    image_size: ShapeRange
    fpedit_version: str
    source_model: str
    source_hash: str
    files: dict[str, str]  # graph name -> file name
    format: str = EXPORT_FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def io(self, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return graph_io(graph, self.spec, self.layers, self.map_format, self.precision)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["graphs"] = {
            g: {"inputs": [asdict(t) for t in self.io(g)[0]], "outputs": [asdict(t) for t in self.io(g)[1]]}
            for g in self.files
            if g in GRAPHS
        }
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportManifest:
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in data.items() if k in known}
        d["spec"] = ModelSpec.from_dict(d["spec"])
        d["layers"] = tuple(d["layers"])
        d["batch"] = ShapeRange(**d["batch"])
        d["image_size"] = ShapeRange(**d["image_size"])
        return cls(**d)


def graphs_in_export(folder: str | Path) -> list[str] | None:
    """The graphs an export folder's manifest lists (``fpedit export --graphs`` writes some alone); None when
    the folder has no readable manifest. Cheap: export and serve judge it before any model loads."""
    path = Path(folder).expanduser() / MANIFEST_FILE
    try:
        return list(json.loads(path.read_text()).get("graphs") or {})
    except (OSError, ValueError, AttributeError):
        return None


def graphs_missing_from(folder: str | Path) -> list[str]:
    """The contract's graphs an export folder lacks (serving needs every one); empty when the folder has no
    readable manifest, whose loading then says what is wrong."""
    held = graphs_in_export(folder)
    return [] if held is None else [graph for graph in GRAPHS if graph not in held]
