"""Build TensorRT engines from an fpedit ONNX export, with polygraphy (TensorRT 10).

One engine per graph, each with one optimization profile spanning the requested batch and image-size
ranges (min/opt/max, derived from the contract's dynamic axes), FP16 optional, and a shared timing cache
so rebuilds take seconds. The output directory mirrors the export: ``manifest.json`` (format
``fpedit-tensorrt``, the engine files, TensorRT version), ``<graph>.plan`` and ``tokenizer/``.

Not executed on the machines this project is developed on (no TensorRT there); see the README.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fpedit.engine.backends.graph_backend import read_manifest
from fpedit.engine.contract import (
    ENGINE_FORMAT,
    EXPORT_FORMAT,
    TOKENIZER_DIR,
    ExportManifest,
    ShapeRange,
    concrete_shape,
)
from fpedit.engine.errors import InvalidInputError, ModelLoadError

from .onnx_export import write_manifest

log = logging.getLogger(__name__)


def profile_shapes(
    manifest: ExportManifest, graph: str, batch: ShapeRange, image_size: ShapeRange
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input of ``graph`` — pure contract arithmetic, tested on the CPU."""
    f = manifest.spec.vae_scale_factor
    inputs, _ = manifest.io(graph)
    shapes = {}
    for tensor in inputs:
        triple = tuple(
            concrete_shape(tensor, b, (side // f, side // f), manifest.spec)
            for b, side in (
                (batch.min, image_size.min),
                (batch.opt, image_size.opt),
                (batch.max, image_size.max),
            )
        )
        shapes[tensor.name] = triple
    return shapes


def check_ranges(manifest: ExportManifest, batch: ShapeRange, image_size: ShapeRange) -> None:
    exported_b, exported_s = manifest.batch, manifest.image_size
    if batch.min < exported_b.min or batch.max > exported_b.max:
        raise InvalidInputError("batch", f"{batch} lies outside the export's batch range {exported_b}")
    if image_size.min < exported_s.min or image_size.max > exported_s.max:
        raise InvalidInputError("image_size", f"{image_size} lies outside the export's sizes {exported_s}")
    multiple = 8 * manifest.spec.vae_scale_factor
    if any(v % multiple for v in (image_size.min, image_size.opt, image_size.max)):
        raise InvalidInputError("image_size", f"sides must be multiples of {multiple}")


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    *,
    fp16: bool = True,
    batch: ShapeRange | None = None,
    image_size: ShapeRange | None = None,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
    builder_optimization_level: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportManifest:
    """Build ``<graph>.plan`` for every graph of the export in ``onnx_dir``; returns the engine manifest."""
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    manifest = read_manifest(onnx_dir, EXPORT_FORMAT)
    batch = batch or manifest.batch
    image_size = image_size or manifest.image_size
    check_ranges(manifest, batch, image_size)
    try:
        import tensorrt as trt
        from polygraphy.backend.trt import (
            CreateConfig,
            Profile,
            engine_from_network,
            network_from_onnx_path,
            save_engine,
        )
    except ImportError as exc:
        raise ModelLoadError(
            "building engines needs TensorRT 10 and polygraphy (pip install 'fpedit[tensorrt]') on an NVIDIA GPU"
        ) from exc

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    cache = str(timing_cache) if timing_cache else str(out_dir / "timing.cache")
    files = {}
    for graph, file in manifest.files.items():
        if progress:
            progress(graph)
        profile = Profile()
        for name, (lo, opt, hi) in profile_shapes(manifest, graph, batch, image_size).items():
            profile.add(name, min=lo, opt=opt, max=hi)
        limits = {trt.MemoryPoolType.WORKSPACE: int(workspace_gib * 1024**3)} if workspace_gib else None
        # The VAE graphs stay float32 end to end: SD's VAE overflows in fp16.
        use_fp16 = fp16 and not graph.startswith("vae_")
        config = CreateConfig(
            fp16=use_fp16,
            profiles=[profile],
            load_timing_cache=cache if Path(cache).exists() else None,
            memory_pool_limits=limits,
            builder_optimization_level=builder_optimization_level,
        )
        network = network_from_onnx_path(str(onnx_dir / file))
        engine = engine_from_network(network, config=config, save_timing_cache=cache)
        files[graph] = f"{graph}.plan"
        save_engine(engine, str(out_dir / files[graph]))
    shutil.copytree(onnx_dir / TOKENIZER_DIR, out_dir / TOKENIZER_DIR, dirs_exist_ok=True)
    engine_manifest = dataclasses.replace(
        manifest,
        batch=batch,
        image_size=image_size,
        files=files,
        format=ENGINE_FORMAT,
        extra={**manifest.extra, **_build_facts(trt, fp16)},
    )
    write_manifest(out_dir, engine_manifest)
    return engine_manifest


def _build_facts(trt: Any, fp16: bool) -> dict[str, Any]:
    facts: dict[str, Any] = {"tensorrt_version": trt.__version__, "fp16": fp16}
    try:
        import torch

        if torch.cuda.is_available():
            facts["built_on"] = torch.cuda.get_device_name()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return facts
