"""Per-step UNet time of the plain, capture and inject variants: ONNX Runtime vs the torch backend.

Both backends are timed through the same ``Backend.unet`` call the engine makes, on the same inputs (two
rows, one branch's unconditional + conditional), for each map format. Ratios are measured side by side in
one run; absolute CPU times are only indicative.

    python -m fpedit.benchmarks.unet_variants --size 256 --json unet_variants.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fpedit.engine.calls import UNetCall
from fpedit.engine.contract import PAPER_LAYERS, ShapeRange
from fpedit.engine.maps import Injection

from .machine import machine_facts


def time_calls(calls: dict[str, Callable[[], Any]], warmup: int, repeat: int) -> dict[str, dict[str, float]]:
    """Median and min wall time of each call, interleaved round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(s), "min_ms": min(s)} for name, s in samples.items()}


def bench_backend(backend: Any, size: int, map_format: str, warmup: int, repeat: int) -> dict[str, Any]:
    spec = backend.spec
    g = torch.Generator().manual_seed(0)
    lh = size // spec.vae_scale_factor
    sample = torch.randn((2, spec.latent_channels, lh, lh), generator=g)
    t = torch.tensor([501.0, 501.0])
    context = torch.randn((2, spec.text_max_length, spec.text_hidden_size), generator=g)
    layers = backend.capture_layers(PAPER_LAYERS)
    capture = UNetCall(sample, t, context, map_format, capture=layers)
    maps = backend.unet(capture).maps
    inject = Injection.for_rows(maps.rows([1, 1]), [False, True], PAPER_LAYERS)
    calls = {
        "plain": UNetCall(sample, t, context),
        "capture": capture,
        "inject": UNetCall(sample, t, context, map_format, inject=inject),
    }
    results: dict[str, Any] = time_calls(
        {name: lambda c=call: backend.unet(c) for name, call in calls.items()}, warmup, repeat
    )
    plain = results["plain"]["median_ms"]
    results["capture_over_plain"] = results["capture"]["median_ms"] / plain
    results["inject_over_plain"] = results["inject"]["median_ms"] / plain
    # A replaced step runs capture (source) + inject (target) where an unreplaced one runs plain twice.
    results["replaced_step_over_plain_step"] = (
        results["capture"]["median_ms"] + results["inject"]["median_ms"]
    ) / (2 * plain)
    results["map_bytes_per_row"] = maps.nbytes // maps.batch
    return results


def run(model: str, size: int, warmup: int, repeat: int, threads: int | None) -> dict[str, Any]:
    from fpedit.engine.backends import create_backend
    from fpedit.export.onnx_export import export_onnx

    if threads:
        torch.set_num_threads(threads)
    torch_backend, _, _ = create_backend(model, "torch")
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "model": model,
        "size": size,
        "rows": 2,
        "formats": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for map_format in ("qk", "probs"):
            out = Path(tmp) / map_format
            export_onnx(model, out, map_format=map_format, image_size=ShapeRange(size, size, size))
            ort_backend, _, _ = create_backend(out, "onnxruntime")
            entry = {
                "torch": bench_backend(torch_backend, size, map_format, warmup, repeat),
                "onnxruntime": bench_backend(ort_backend, size, map_format, warmup, repeat),
            }
            entry["ort_over_torch_plain"] = (
                entry["onnxruntime"]["plain"]["median_ms"] / entry["torch"]["plain"]["median_ms"]
            )
            report["formats"][map_format] = entry
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"UNet per call, 2 rows, {report['size']} px, model {report['model']} (median ms)"]
    lines.append(
        f"{'format':<6} {'backend':<12} {'plain':>8} {'capture':>8} {'inject':>8} {'replaced/plain':>15}"
    )
    for fmt, entry in report["formats"].items():
        for name in ("torch", "onnxruntime"):
            r = entry[name]
            lines.append(
                f"{fmt:<6} {name:<12} {r['plain']['median_ms']:8.2f} {r['capture']['median_ms']:8.2f} "
                f"{r['inject']['median_ms']:8.2f} {r['replaced_step_over_plain_step']:15.3f}"
            )
        lines.append(f"{fmt:<6} ORT/torch plain: {entry['ort_over_torch_plain']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = run(args.model, args.size, args.warmup, args.repeat, args.threads)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
