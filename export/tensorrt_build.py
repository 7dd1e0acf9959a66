"""Build TensorRT engines from an fpedit ONNX export with polygraphy (TensorRT 10.x and 11.x).

One engine per graph, each with one optimization profile spanning the requested batch and image-size
ranges (min/opt/max, derived from the contract's dynamic axes), and a shared timing cache so rebuilds take
seconds. Networks are built **strongly typed**: every tensor keeps the type the ONNX graph gives it (fp16
UNet and text encoder from ``fpedit export --fp16``, float32 VAE), and no precision flag is ever set.
That is the only mode TensorRT 11 has (it removed ``BuilderFlag.FP16`` and weak typing) and is available
since TensorRT 10.0, so one code path serves both. The output directory mirrors the export:
``manifest.json`` (format ``fpedit-tensorrt``, the engine files, TensorRT version), ``<graph>.plan`` and
``tokenizer/``; it appears only once every engine is built.

Not executed on the machines this project is developed on (no TensorRT there); see the README's "What has run where".
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

from .onnx_export import check_output_dir, staging_dir, write_manifest

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


#: TensorRT majors this builder and the runtime adapter were written against (see pyproject's extra).
SUPPORTED_TENSORRT = (10, 11)


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    *,
    batch: ShapeRange | None = None,
    image_size: ShapeRange | None = None,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
    builder_optimization_level: int | None = None,
    refittable: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportManifest:
    """Build ``<graph>.plan`` for every graph of the export in ``onnx_dir``; returns the engine manifest.

    Precision is the export's (``manifest.precision`` for UNet and text encoder, float32 VAE): re-export
    with or without ``--fp16`` to change it. ``refittable`` builds engines whose weights TensorRT can
    replace in place (a refit), so other LoRA-fused weights of the same model need no rebuild; fpedit
    itself does not refit yet.
    """
    onnx_dir, out_dir = Path(onnx_dir).expanduser(), Path(out_dir).expanduser()
    manifest = read_manifest(onnx_dir, EXPORT_FORMAT)
    batch = batch or manifest.batch
    image_size = image_size or manifest.image_size
    check_ranges(manifest, batch, image_size)
    if workspace_gib is not None and workspace_gib <= 0:
        raise InvalidInputError("workspace_gib", f"must be positive, got {workspace_gib}")
    if builder_optimization_level is not None and not 0 <= builder_optimization_level <= 5:
        raise InvalidInputError("opt_level", f"must be 0..5, got {builder_optimization_level}")
    check_output_dir(out_dir)
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
            "building engines needs TensorRT 10 or 11 and polygraphy (pip install 'fpedit[tensorrt]') "
            "on an NVIDIA GPU"
        ) from exc
    major = int(str(trt.__version__).split(".")[0])
    if major not in SUPPORTED_TENSORRT:
        raise ModelLoadError(f"TensorRT {trt.__version__} is not supported; install TensorRT 10.x or 11.x")

    limits = {trt.MemoryPoolType.WORKSPACE: int(workspace_gib * 1024**3)} if workspace_gib else None
    files = {}
    with staging_dir(out_dir) as stage:
        # The timing cache lives with the engines; a previous build's cache seeds this one.
        cache = Path(timing_cache).expanduser() if timing_cache else stage / "timing.cache"
        if not timing_cache and (out_dir / "timing.cache").is_file():
            shutil.copy2(out_dir / "timing.cache", cache)
        for graph, file in manifest.files.items():
            if progress:
                progress(graph)
            profile = Profile()
            for name, (lo, opt, hi) in profile_shapes(manifest, graph, batch, image_size).items():
                profile.add(name, min=lo, opt=opt, max=hi)
            config = CreateConfig(
                profiles=[profile],
                load_timing_cache=str(cache) if cache.is_file() else None,
                memory_pool_limits=limits,
                builder_optimization_level=builder_optimization_level,
                **({"refittable": True} if refittable else {}),
            )
            network = network_from_onnx_path(str(onnx_dir / file), strongly_typed=True)
            engine = engine_from_network(network, config=config, save_timing_cache=str(cache))
            files[graph] = f"{graph}.plan"
            save_engine(engine, str(stage / files[graph]))
        shutil.copytree(onnx_dir / TOKENIZER_DIR, stage / TOKENIZER_DIR, dirs_exist_ok=True)
        engine_manifest = dataclasses.replace(
            manifest,
            batch=batch,
            image_size=image_size,
            files=files,
            format=ENGINE_FORMAT,
            extra={**manifest.extra, **_build_facts(trt), "refittable": refittable},
        )
        write_manifest(stage, engine_manifest)
    return engine_manifest


def _build_facts(trt: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {"tensorrt_version": str(trt.__version__), "strongly_typed": True}
    try:
        import torch

        if torch.cuda.is_available():
            facts["built_on"] = torch.cuda.get_device_name()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return facts
