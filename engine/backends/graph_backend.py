"""Backends that run exported graphs (ONNX Runtime, TensorRT): the contract logic, shared.

Everything here is about the contract — which UNet variant a call needs, how maps and the gate are fed, how
outputs are allocated and turned back into :class:`AttentionMaps` — so that a runtime adapter only has to
implement :meth:`GraphBackend._run`: execute one graph on given input tensors into given output tensors.
ONNX Runtime exercises all of it on the CPU; TensorRT reuses it unchanged.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch

from ..calls import UNetCall, UNetResult
from ..contract import (
    CONTEXT,
    DECODED,
    IMAGES,
    INPUT_IDS,
    LATENT_MEAN,
    LATENTS,
    MANIFEST_FILE,
    MAP_GATE,
    NOISE_PRED,
    SAMPLE,
    TEXT_EMBEDDINGS,
    TIMESTEP,
    TOKENIZER_DIR,
    UNET_GRAPHS,
    ExportManifest,
    concrete_shape,
    map_input_name,
    map_output_name,
)
from ..errors import InvalidInputError, ModelLoadError
from ..maps import AttentionMaps, Injection
from .base import Backend

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def read_manifest(folder: str | Path, expected_format: str) -> ExportManifest:
    folder = Path(folder).expanduser()
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{folder} has no {MANIFEST_FILE}: not a complete fpedit export (run `fpedit export` or "
            "`fpedit build-engines` to make one)"
        )
    try:
        data = json.loads(path.read_text())
        manifest = ExportManifest.from_json(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"malformed {path}: {exc}") from exc
    if manifest.format != expected_format:
        raise ModelLoadError(f"{folder} holds a {manifest.format!r} model, not {expected_format!r}")
    return manifest


def load_export_tokenizer(folder: str | Path) -> Any:
    from ..loading import load_tokenizer

    return load_tokenizer(Path(folder).expanduser() / TOKENIZER_DIR)


class GraphBackend(Backend):
    """A backend over the contract's six graphs; subclasses run one graph at a time."""

    def __init__(self, manifest: ExportManifest, device: torch.device) -> None:
        self.manifest = manifest
        self.spec = manifest.spec
        self.device = device
        self.dtype = TORCH_DTYPES[manifest.precision]
        self.map_layers = manifest.layers
        self.map_formats = (manifest.map_format,)
        self.max_batch = manifest.batch.max
        self._io = {graph: manifest.io(graph) for graph in manifest.files}

    @abstractmethod
    def _run(self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Execute ``graph`` reading ``inputs`` and writing into the preallocated ``outputs``."""

    # --- shared contract logic ----------------------------------------------------------------------------

    #: Whether the manifest's size range binds (TensorRT profiles do); ONNX graphs with dynamic spatial
    #: axes take any size, so there only a static-size export restricts it.
    size_range_binds: bool = True

    def _check_shape(self, batch: int, latent_hw: tuple[int, int] | None) -> None:
        if not 1 <= batch <= self.manifest.batch.max:
            raise InvalidInputError("batch", f"{batch} rows; this export takes 1..{self.manifest.batch.max}")
        sizes = self.manifest.image_size
        if latent_hw is None or not (self.size_range_binds or sizes.min == sizes.max):
            return
        f = self.spec.vae_scale_factor
        h, w = latent_hw[0] * f, latent_hw[1] * f
        if not (sizes.min <= h <= sizes.max and sizes.min <= w <= sizes.max):
            allowed = f"{sizes.min}x{sizes.min}" if sizes.min == sizes.max else f"{sizes.min}..{sizes.max} px"
            raise InvalidInputError(
                "image",
                f"{w}x{h} is outside this export's image sizes ({allowed}); re-export with --image-size",
            )

    def run_graph(
        self, graph: str, feeds: dict[str, torch.Tensor], batch: int, latent_hw: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """Run one graph of the export on ``feeds`` (by input name; cast to the graph's dtypes) for ``batch``
        rows at ``latent_hw``; returns its outputs by name. The entry points below use it, and so does
        ``fpedit verify-export``, which compares every graph with the torch module it was traced from."""
        if graph not in self._io:
            raise ModelLoadError(f"this export has no {graph} graph")
        inputs, outputs = self._io[graph]
        prepared = {}
        for tensor in inputs:
            value = feeds[tensor.name].to(self.device, TORCH_DTYPES[tensor.dtype]).contiguous()
            prepared[tensor.name] = value
        results = {
            tensor.name: torch.empty(
                concrete_shape(tensor, batch, latent_hw, self.spec),
                dtype=TORCH_DTYPES[tensor.dtype],
                device=self.device,
            )
            for tensor in outputs
        }
        self._run(graph, prepared, results)
        return results

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_shape(input_ids.shape[0], None)
        out = self.run_graph("text_encoder", {INPUT_IDS: input_ids}, input_ids.shape[0], (1, 1))
        return out[TEXT_EMBEDDINGS]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        f = self.spec.vae_scale_factor
        latent_hw = (images.shape[-2] // f, images.shape[-1] // f)
        self._check_shape(images.shape[0], latent_hw)
        return self.run_graph("vae_encoder", {IMAGES: images}, images.shape[0], latent_hw)[LATENT_MEAN]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latent_hw = (latents.shape[-2], latents.shape[-1])
        self._check_shape(latents.shape[0], latent_hw)
        return self.run_graph("vae_decoder", {LATENTS: latents}, latents.shape[0], latent_hw)[DECODED]

    def unet(self, call: UNetCall) -> UNetResult:
        if call.donors is not None:
            raise NotImplementedError("exported graphs pipe maps between calls (capture, then inject)")
        if call.capture and call.inject is not None:
            raise NotImplementedError(
                "a call either captures or injects maps (no exported variant does both)"
            )
        batch = call.rows
        latent_hw = (call.sample.shape[-2], call.sample.shape[-1])
        self._check_shape(batch, latent_hw)
        if call.capture or call.inject is not None:
            self.check_map_request(call.capture, call.map_format)
        feeds = {SAMPLE: call.sample, TIMESTEP: call.timesteps, CONTEXT: call.context}
        if call.inject is not None:
            graph = UNET_GRAPHS["inject"]
            feeds.update(self._inject_feeds(call.inject, batch, latent_hw))
        elif call.capture:
            graph = UNET_GRAPHS["capture"]
        else:
            graph = UNET_GRAPHS["plain"]
        out = self.run_graph(graph, feeds, batch, latent_hw)
        maps = None
        if call.capture:
            maps = AttentionMaps(
                call.map_format, {i: out[map_output_name(i)] for i in sorted(set(call.capture))}
            )
        return UNetResult(out[NOISE_PRED].float() if call.need_noise_pred else None, maps)

    def can_share_call(self, a: UNetCall, b: UNetCall, mix_adapters: bool = False) -> bool:
        """The exported variants are plain, capture and inject: a plain row joins either, but capture and
        inject rows cannot share a call."""
        mixed = (a.capture or b.capture) and (a.inject is not None or b.inject is not None)
        return super().can_share_call(a, b, mix_adapters) and not mixed

    def _inject_feeds(
        self, inject: Injection, batch: int, latent_hw: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """Every exported layer gets a map input; layers the injection lacks are gated off (zeros)."""
        extra = sorted(set(inject.maps.layers) - set(self.map_layers))
        gate_in = inject.gate.to("cpu", torch.bool)
        if extra and bool(gate_in[:, [inject.maps.layers.index(i) for i in extra]].any()):
            self.check_map_request(extra, inject.maps.format)
        feeds: dict[str, torch.Tensor] = {}
        gate = torch.zeros((batch, len(self.map_layers)), dtype=torch.float32)
        for column, layer in enumerate(self.map_layers):
            if layer in inject.maps.tensors:
                feeds[map_input_name(layer)] = inject.maps.tensors[layer]
                gate[:, column] = gate_in[:, inject.maps.layers.index(layer)].float()
            else:
                shape = self.spec.layer(layer).map_shape(self.manifest.map_format, batch, *latent_hw)
                feeds[map_input_name(layer)] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        feeds[MAP_GATE] = gate
        return feeds

    def weights_digest(self) -> str:
        """The exported model's source hash (sha256 over the source checkpoint's configs and weights)."""
        return self.manifest.source_hash

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            precision=self.manifest.precision,
            opset=self.manifest.opset,
            image_sizes=[self.manifest.image_size.min, self.manifest.image_size.max],
            source_hash=self.manifest.source_hash,
        )
        return info
