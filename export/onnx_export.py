"""Export an SD 1.x checkpoint to ONNX per the engine contract: UNet variants with map I/O, text encoder, VAE.

The directory it writes is what ``EditEngine.from_pretrained(DIR, backend="onnxruntime")`` loads and what
``fpedit build-engines`` turns into TensorRT engines:

    manifest.json        contract, layers, map format, precision, opset, shape ranges, source model hash
    unet_plain.onnx      sample, timestep, encoder_hidden_states -> noise_pred
    unet_capture.onnx    ... -> noise_pred, map_out_LL for every exported layer
    unet_inject.onnx     ..., map_in_LL for every exported layer, map_gate -> noise_pred
    text_encoder.onnx    input_ids -> text_embeddings
    vae_encoder.onnx     images -> latent_mean            (float32 always)
    vae_decoder.onnx     latents -> decoded               (float32 always)
    unet.weights         the UNet variants' weights, each tensor once (all three graphs point into it)
    tokenizer/           the CLIP tokenizer (the betas travel in the manifest's model spec)

The three UNet graphs hold the same weights, so they keep them in one shared external-data file instead of a
copy each (``--external-data never`` embeds a copy in each graph instead). Other graphs over 2 GB keep theirs
in a ``<graph>.onnx.data`` file beside them. Every file follows the umask, like any file the user writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fpedit.engine.backends.graph_backend import TORCH_DTYPES
from fpedit.engine.contract import (
    EXPORT_FORMAT,
    GRAPHS,
    MANIFEST_FILE,
    PAPER_LAYERS,
    TOKENIZER_DIR,
    UNET_GRAPHS,
    UNET_WEIGHTS_FILE,
    WEIGHTS_ALIGNMENT,
    ExportManifest,
    ModelSpec,
    ShapeRange,
    TensorSpec,
    concrete_shape,
    graph_io,
    graphs_in_export,
    resolve_layers,
)
from fpedit.engine.errors import InvalidInputError
from fpedit.engine.loading import Components, load_components

from .wrappers import TextEncoder, UNetVariant, VAEDecoder, VAEEncoder

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3 - 1024**2  # stay clear of protobuf's 2 GiB hard limit
SPATIAL_AXES = ("latent_height", "latent_width", "height", "width")


def model_hash(parts: Components) -> str:
    """sha256 over the modules' configs and weights: identifies the source independently of file layout."""
    digest = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(parts, name)
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def example_inputs(
    inputs: Sequence[TensorSpec], spec: ModelSpec, batch: int, latent_hw: tuple[int, int], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random tensors shaped per the contract (token ids within the vocabulary, gates 0/1)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for tensor in inputs:
        shape = concrete_shape(tensor, batch, latent_hw, spec)
        if tensor.dtype == "int64":
            tensors.append(torch.randint(0, 256, shape, generator=generator))
        elif tensor.name == "map_gate":
            tensors.append(torch.randint(0, 2, shape, generator=generator).float())
        else:
            tensors.append(torch.randn(shape, generator=generator).to(TORCH_DTYPES[tensor.dtype]))
    return tuple(tensors)


def dynamic_axes(tensors: Sequence[TensorSpec], static_size: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for tensor in tensors:
        named = {
            i: dim
            for i, dim in enumerate(tensor.shape)
            if isinstance(dim, str)
            and not (static_size and (dim in SPATIAL_AXES or dim.startswith("tokens_")))
        }
        if named:
            axes[tensor.name] = named
    return axes


def graph_module(graph: str, parts: Components, layers: Sequence[int], map_format: str) -> torch.nn.Module:
    """The torch module graph ``graph`` of the contract is traced from (``verify-export`` runs it too)."""
    if graph == "text_encoder":
        return TextEncoder(parts.text_encoder)
    if graph == "vae_encoder":
        return VAEEncoder(parts.vae)
    if graph == "vae_decoder":
        return VAEDecoder(parts.vae)
    variant = {v: k for k, v in UNET_GRAPHS.items()}[graph]
    return UNetVariant(parts.unet, parts.spec, variant, layers, map_format)


def trace_graph(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    workdir: Path,
    *,
    opset: int,
    static_size: bool,
) -> onnx.ModelProto:
    """Trace ``module`` at ``args``'s shapes into an ONNX model held in memory (weights included)."""
    import onnx

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        traced = Path(tmp) / "graph.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(traced),
                input_names=[t.name for t in inputs],
                output_names=[t.name for t in outputs],
                dynamic_axes=dynamic_axes([*inputs, *outputs], static_size),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        return onnx.load(str(traced), load_external_data=True)


class SharedWeights:
    """One external-data file that several graphs point into, each distinct tensor stored once.

    The UNet variants are traced from one module, so their weights are the same tensors; which ones is found
    by content (the tracer names folded constants per graph), and each is written at an aligned offset so
    that a runtime can memory-map it (docs/design.md, "One copy of the UNet's weights").
    """

    def __init__(self, path: Path, *, min_bytes: int = 1024):
        self.path = path
        self.min_bytes = min_bytes  # smaller tensors (shape constants, scalars) stay inside each graph
        self._stored: dict[bytes, tuple[int, int]] = {}
        self._end = 0

    def externalize(self, proto: onnx.ModelProto) -> None:
        """Move ``proto``'s large initializers into the shared file (or point at their stored copy)."""
        import onnx
        from onnx import numpy_helper

        with self.path.open("ab") as file:
            for tensor in proto.graph.initializer:
                data = tensor.raw_data if tensor.HasField("raw_data") else None
                if data is None:
                    data = numpy_helper.to_array(tensor).tobytes()
                if len(data) < self.min_bytes:
                    continue
                key = hashlib.sha256(data).digest()
                if key not in self._stored:
                    offset = -(-self._end // WEIGHTS_ALIGNMENT) * WEIGHTS_ALIGNMENT
                    file.write(b"\0" * (offset - self._end))
                    file.write(data)
                    self._end = offset + len(data)
                    self._stored[key] = (offset, len(data))
                offset, length = self._stored[key]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                    tensor.ClearField(field)
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key_name, value in (("location", self.path.name), ("offset", offset), ("length", length)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key_name, str(value)

    @property
    def size(self) -> int:
        return self._end


def save_graph(
    proto: onnx.ModelProto, path: Path, *, external_data: str, shared: SharedWeights | None = None
) -> None:
    """Write ``proto`` to ``path`` (weights in ``shared``, beside it past 2 GB, or inline) and check it."""
    import onnx

    if shared is not None:
        shared.externalize(proto)
        onnx.save_model(proto, str(path))
    else:
        size = sum(init.ByteSize() for init in proto.graph.initializer)
        use_external = external_data == "always" or (external_data == "auto" and size > PROTOBUF_LIMIT)
        if use_external:
            onnx.save_model(
                proto,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def export_onnx(
    model: str | Path,
    out_dir: str | Path,
    *,
    layers: str | Sequence[int] = PAPER_LAYERS,
    map_format: str = "qk",
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    batch: ShapeRange | None = None,
    image_size: ShapeRange | None = None,
    external_data: str = "auto",
    graphs: Sequence[str] = GRAPHS,
    allow_pickle: bool = False,
    model_config: str | Path | None = None,
    prediction_type: str | None = None,
    loras: Sequence[object] = (),
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> ExportManifest:
    """Export ``model`` (a diffusers SD 1.x folder or ``"tiny"``) into ``out_dir``; returns the manifest.

    The tracer runs each graph once on ``device`` at the smallest image the export allows (8x8 latents when
    the spatial axes are dynamic): the graphs do not depend on the traced size, and at the opt size a float16
    trace on a CPU took most of an hour for SD 1.5. The UNet variants share one weights file
    (``UNET_WEIGHTS_FILE``) unless ``external_data="never"``.
    """
    from fpedit import __version__
    from fpedit.engine.backends import resolve_device

    if map_format not in ("qk", "probs"):
        raise InvalidInputError("map_format", f"must be 'qk' or 'probs', got {map_format!r}")
    if external_data not in ("auto", "always", "never"):
        raise InvalidInputError("external_data", "must be auto, always or never")
    unknown = sorted(set(graphs) - set(GRAPHS))
    if unknown:
        raise InvalidInputError("graphs", f"unknown graphs {unknown}; known: {list(GRAPHS)}")
    torch_device = resolve_device(device)
    out_dir = Path(out_dir).expanduser()
    check_output_dir(out_dir)
    check_no_graphs_dropped(out_dir, graphs)
    parts = load_components(
        model,
        allow_pickle=allow_pickle,
        model_config=model_config,
        prediction_type=prediction_type,
        loras=loras,
    )
    spec = parts.spec
    layer_numbers = resolve_layers(layers, spec, _latent_hw(spec, (image_size or _default_sizes(spec)).opt))
    if not layer_numbers:
        raise InvalidInputError("layers", "an export needs at least one layer")
    batch = batch or ShapeRange(1, 2, 8)
    image_size = image_size or _default_sizes(spec)
    multiple = 8 * spec.vae_scale_factor
    for value in (image_size.min, image_size.opt, image_size.max):
        if value % multiple:
            raise InvalidInputError("image_size", f"sides must be multiples of {multiple}, got {value}")
    precision = "float16" if fp16 else "float32"
    source_hash = model_hash(parts)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(torch_device)
    if fp16:
        parts.unet.half()
        parts.text_encoder.half()
    static_size = image_size.min == image_size.max
    # Trace at batch >= 2 so that no batch-1 shortcut is baked into the graphs.
    example_batch = max(2, min(batch.opt, batch.max))
    latent_hw = _latent_hw(spec, image_size.min if static_size else multiple)
    files = {}
    with staging_dir(out_dir) as stage:
        unet_graphs = [g for g in graphs if g in UNET_GRAPHS.values()]
        shared = (
            SharedWeights(stage / UNET_WEIGHTS_FILE) if unet_graphs and external_data != "never" else None
        )
        for graph in graphs:
            if progress:
                progress(graph)
            inputs, outputs = graph_io(graph, spec, layer_numbers, map_format, precision)
            module = graph_module(graph, parts, layer_numbers, map_format).eval()
            args = tuple(t.to(torch_device) for t in example_inputs(inputs, spec, example_batch, latent_hw))
            files[graph] = f"{graph}.onnx"
            proto = trace_graph(module, args, inputs, outputs, stage, opset=opset, static_size=static_size)
            save_graph(
                proto,
                stage / files[graph],
                external_data=external_data,
                shared=shared if graph in unet_graphs else None,
            )
            del proto
        parts.tokenizer.save_pretrained(str(stage / TOKENIZER_DIR))
        manifest = ExportManifest(
            spec=spec,
            layers=layer_numbers,
            map_format=map_format,
            precision=precision,
            opset=opset,
            batch=batch,
            image_size=image_size,
            fpedit_version=__version__,
            source_model=parts.source,
            source_hash=source_hash,
            files=files,
            format=EXPORT_FORMAT,
        )
        write_manifest(stage, manifest)
    return manifest


def check_no_graphs_dropped(out_dir: Path, graphs: Sequence[str]) -> None:
    """Refuse, before any work, a partial export (``--graphs``) that would replace an export holding other
    graphs: the folder is replaced whole, so those graphs would be lost."""
    held = graphs_in_export(out_dir) or []  # no readable manifest: check_output_dir has judged the folder
    dropped = [name for name in held if name not in graphs]
    if dropped:
        raise InvalidInputError(
            "graphs",
            f"{out_dir} holds an export with {', '.join(dropped)} too, which this export of "
            f"{', '.join(graphs)} would replace and lose; choose a new --out, or export those graphs as well",
        )


def check_output_dir(out_dir: Path) -> None:
    """Refuse, before any work, a destination that exists and is not a previous export (or empty)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError("out", f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise InvalidInputError(
            "out", f"{out_dir} is a non-empty directory without an fpedit manifest; choose a new folder"
        )


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A sibling temporary folder that replaces ``out_dir`` only once everything in it is written.

    A failed or interrupted export leaves ``out_dir`` as it was (absent, or the previous complete export),
    so no half-written folder ever looks like a model.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 would become the export's permissions; mkdir honours the umask.
    stage = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(6)}"
    stage.mkdir()
    try:
        yield stage
        follow_umask(stage)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.replace(old / out_dir.name)
        stage.replace(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def follow_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode the umask gives a new file: some writers (onnx's external
    data among them) create theirs 0600, which another account serving the export could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_manifest(folder: Path, manifest: ExportManifest) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")


def _default_sizes(spec: ModelSpec) -> ShapeRange:
    size = spec.default_image_size
    return ShapeRange(max(64, size // 2 // 64 * 64), size, 2 * size)


def _latent_hw(spec: ModelSpec, side: int) -> tuple[int, int]:
    return side // spec.vae_scale_factor, side // spec.vae_scale_factor
