"""Compare an exported model with the torch backend on random inputs: max abs/rel error per output.

Every graph of the export is run through ONNX Runtime (the same :class:`OnnxRuntimeBackend` the engine uses)
and through the torch modules it was traced from, in float32, on identical random inputs — maps and gates
included — so a drift in any variant shows up by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fpedit.engine.backends.onnx_backend import OnnxRuntimeBackend
from fpedit.engine.loading import load_components

from .onnx_export import example_inputs, graph_module

#: Default pass bound on the max relative error, by the export's precision: float32 graphs differ from the
#: torch modules by reassociation only; float16 graphs (unit roundoff 4.9e-4) by a few roundings per layer.
DEFAULT_TOLERANCE = {"float32": 1e-3, "float16": 1e-2}


def default_tolerance(export_dir: str | Path) -> float:
    """The pass bound that fits the precision recorded in the export's manifest."""
    from fpedit.engine.backends.graph_backend import read_manifest
    from fpedit.engine.contract import EXPORT_FORMAT

    return DEFAULT_TOLERANCE[read_manifest(export_dir, EXPORT_FORMAT).precision]


@dataclass
class OutputError:
    graph: str
    output: str
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    rel_l2: float

    def to_dict(self) -> dict:
        return asdict(self)


def verify_export(
    export_dir: str | Path,
    model: str | Path | None = None,
    *,
    batch: int = 2,
    image_side: int | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
) -> list[OutputError]:
    """Errors of every output of every graph in ``export_dir`` against ``model`` (default: the source)."""
    backend = OnnxRuntimeBackend(Path(export_dir))
    manifest = backend.manifest
    parts = load_components(model or manifest.source_model, allow_pickle=allow_pickle)
    side = image_side or manifest.image_size.opt
    latent_hw = (side // manifest.spec.vae_scale_factor,) * 2
    results = []
    for index, graph in enumerate(sorted(manifest.files)):
        inputs, outputs = manifest.io(graph)
        args = example_inputs(inputs, manifest.spec, batch, latent_hw, seed=seed + index)
        module = graph_module(graph, parts, manifest.layers, manifest.map_format).eval()
        with torch.no_grad():
            expected = module(*(a.float() if a.is_floating_point() else a for a in args))
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = backend.run_graph(
            graph, {t.name: a for t, a in zip(inputs, args, strict=True)}, batch, latent_hw
        )
        for tensor, want in zip(outputs, expected, strict=True):
            have = got[tensor.name].float().cpu()
            diff = (have - want).abs()
            scale = want.abs().max().clamp_min(1e-12)
            results.append(
                OutputError(
                    graph=graph,
                    output=tensor.name,
                    max_abs=float(diff.max()),
                    max_rel=float(diff.max() / scale),
                    rel_l2=float(
                        torch.linalg.vector_norm(have - want)
                        / torch.linalg.vector_norm(want).clamp_min(1e-12)
                    ),
                )
            )
    return results


def format_table(errors: list[OutputError]) -> str:
    lines = [f"{'graph':<14} {'output':<16} {'max_abs':>10} {'max_rel':>10} {'rel_l2':>10}"]
    lines += [
        f"{e.graph:<14} {e.output:<16} {e.max_abs:10.3e} {e.max_rel:10.3e} {e.rel_l2:10.3e}" for e in errors
    ]
    return "\n".join(lines)
