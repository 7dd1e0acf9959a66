"""``fpedit bench``: engine latency per backend and a gRPC load test, written as JSON, Markdown and a chart.

Engine figures, per backend (torch, onnxruntime via a fresh export, tensorrt where it is installed):

* ``real_edit``: invert + first edit of an image (what a new photo costs);
* ``cached_edit``: a further edit of that inversion with another prompt (target branch only);
* ``generated_edit``: Algorithm 1 from a seed.

Each kind is run ``warmup`` times, then ``repeat`` times; median and p95 wall times, per-stage medians and
UNet rows are reported. The load test starts a server on 127.0.0.1, drives it with ``concurrency`` clients
for ``requests`` edits in all, and reports latency percentiles, throughput, errors and the gRPC overhead
(end-to-end time minus the engine's and the queue's time, median per request).
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fpedit.engine import EditEngine, EditOptions

from .machine import machine_facts

KINDS = ("real_edit", "cached_edit", "generated_edit")


@dataclass
class BenchConfig:
    model: str = "tiny"
    backends: Sequence[str] = ("torch", "onnxruntime", "tensorrt")
    device: str = "cpu"
    steps: int = 50
    size: int = 512
    warmup: int = 1
    repeat: int = 5
    concurrency: int = 4
    requests: int = 16
    load_steps: int | None = None
    seed: int = 0
    #: Client counts for the batching section (``--concurrency 1,2,4,8``); empty: no such section.
    concurrency_levels: Sequence[int] = ()
    #: LoRAs fused into the model at load (``--lora FILE[:SCALE]``): an edit should cost the same.
    loras: Sequence[str] = ()

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """Small enough for a 2-core CPU in a few minutes: the tiny model, 10 steps, 128 px."""
        return cls(**{"steps": 10, "size": 128, "warmup": 1, "repeat": 3, "requests": 12, **overrides})


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def test_image(size: int, seed: int = 0) -> Image.Image:
    """A structured synthetic photo stand-in (gradients and shapes), deterministic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([255 * x, 255 * y, 120 + 60 * np.sin(12 * x * y)], axis=-1)
    disc = (x - 0.4) ** 2 + (y - 0.55) ** 2 < 0.05
    rgb[disc] = (220, 50, 40)
    rgb += rng.normal(0, 4, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    totals = [s["total_ms"] for s in samples]
    stage_names = sorted({k for s in samples for k in s["stages_ms"]})
    return {
        "median_ms": statistics.median(totals),
        "p95_ms": percentile(totals, 95),
        "min_ms": min(totals),
        "runs": len(totals),
        "stages_ms": {k: statistics.median(s["stages_ms"].get(k, 0.0) for s in samples) for k in stage_names},
        "unet_rows": samples[-1]["unet_rows"],
        "unet_calls": samples[-1]["unet_calls"],
    }


def bench_engine(engine: EditEngine, cfg: BenchConfig, bar: tqdm | None = None) -> dict[str, Any]:
    """Median/p95 of the three kinds of work on one engine."""
    opts = EditOptions(steps=cfg.steps)
    image = test_image(cfg.size, cfg.seed)
    prompts = ("a photo of a red car", "a photo of a blue truck")
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}

    def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        t0 = time.perf_counter()
        result = fn()
        engine.backend.synchronize()
        stats = dict(result.stats)
        stats["total_ms"] = (time.perf_counter() - t0) * 1e3
        return result, stats

    for run in range(cfg.warmup + cfg.repeat):
        keep = run >= cfg.warmup
        real, stats = timed(lambda: engine.edit_real(image, prompts[0], options=opts))
        if keep:
            samples["real_edit"].append(stats)
        inversion = real.inversion
        _, stats = timed(lambda inv=inversion: engine.edit_real(inv, prompts[1], options=opts))
        if keep:
            samples["cached_edit"].append(stats)
        _, stats = timed(
            lambda: engine.edit_generated(
                "a photo of a cat",
                "a photo of a dog",
                seed=cfg.seed,
                height=cfg.size,
                width=cfg.size,
                options=opts,
            )
        )
        if keep:
            samples["generated_edit"].append(stats)
        if bar is not None:
            bar.update(1)
    return {kind: summarize(samples[kind]) for kind in KINDS}


def backend_availability(requested: Sequence[str], device: str) -> tuple[list[str], dict[str, str]]:
    """The requested backends that can run here, and for each one that cannot, the reason (reported)."""
    found: list[str] = []
    skipped: dict[str, str] = {}
    for name in requested:
        if name == "torch":
            found.append(name)
        elif name == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                skipped[name] = "onnxruntime is not installed (pip install 'fpedit[onnx]')"
                continue
            found.append(name)
        elif name == "tensorrt":
            try:
                import tensorrt  # noqa: F401
            except ImportError:
                skipped[name] = "TensorRT is not installed (pip install 'fpedit[tensorrt]' on an NVIDIA GPU)"
                continue
            import torch

            if torch.cuda.is_available():
                found.append(name)
            else:
                skipped[name] = "TensorRT needs a CUDA GPU, and torch sees none"
        else:
            skipped[name] = "unknown backend"
    return found, skipped


def load_engine(name: str, cfg: BenchConfig, workdir: Path) -> EditEngine:
    """The engine for one backend; exports (and builds engines) into ``workdir`` when needed."""
    from fpedit.engine.contract import ShapeRange

    if name == "torch":
        return EditEngine.from_pretrained(cfg.model, device=cfg.device, loras=cfg.loras)
    from fpedit.export.onnx_export import export_onnx

    onnx_dir = workdir / "onnx"
    if not (onnx_dir / "manifest.json").exists():
        export_onnx(
            cfg.model,
            onnx_dir,
            image_size=ShapeRange(cfg.size, cfg.size, cfg.size),
            fp16=cfg.device.startswith("cuda"),
            loras=cfg.loras,
        )
    if name == "onnxruntime":
        return EditEngine.from_pretrained(onnx_dir, backend="onnxruntime", device=cfg.device)
    from fpedit.export.tensorrt_build import build_engines

    plans = workdir / "tensorrt"
    build_engines(onnx_dir, plans)  # precision is the export's: fp16 UNet/text on CUDA
    return EditEngine.from_pretrained(plans, backend="tensorrt", device="cuda")


def load_test(engine: EditEngine, cfg: BenchConfig, bar: tqdm | None = None) -> dict[str, Any]:
    """K concurrent clients against a real server on 127.0.0.1, a bounded number of edits in all."""
    import grpc

    from fpedit.server.app import build_server
    from fpedit.server.client import EditClient, edit_options
    from fpedit.server.service import ServerConfig

    steps = cfg.load_steps or cfg.steps
    server = build_server(engine, ServerConfig(port=0, workers=1, max_queue=max(8, cfg.concurrency)))
    buf = io.BytesIO()
    test_image(cfg.size, cfg.seed + 1).save(buf, format="PNG")
    image = buf.getvalue()
    latencies: list[float] = []
    overheads: list[float] = []
    queues: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    target = f"127.0.0.1:{server.port}"
    try:
        with EditClient(target, timeout=600) as warm:  # first request pays one-time costs; not counted
            warm.edit("warm-up", image=image, options=edit_options(steps=steps))

        def one(i: int) -> None:
            with EditClient(target, timeout=600) as client:
                t0 = time.perf_counter()
                try:
                    response = client.edit(
                        f"a photo of a car, variant {i}",
                        image=image,
                        options=edit_options(steps=steps),
                        skip_reconstruction=True,
                    )
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(f"{exc.code().name}: {exc.details()}")
                    return
                elapsed = (time.perf_counter() - t0) * 1e3
                with lock:
                    latencies.append(elapsed)
                    queues.append(response.stats.queue_ms)
                    overheads.append(elapsed - response.stats.engine_ms - response.stats.queue_ms)
                    if bar is not None:
                        bar.update(1)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            list(pool.map(one, range(cfg.requests)))
        wall = time.perf_counter() - started
    finally:
        server.drain(10)
    result: dict[str, Any] = {
        "concurrency": cfg.concurrency,
        "requests": cfg.requests,
        "completed": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "steps": steps,
        "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
    }
    if latencies:
        result.update(
            p50_ms=percentile(latencies, 50),
            p95_ms=percentile(latencies, 95),
            p99_ms=percentile(latencies, 99),
            overhead_ms=statistics.median(overheads),
            queue_ms_p50=percentile(queues, 50),
        )
    return result


def run_bench(cfg: BenchConfig, *, load: bool = True, progress: bool = True) -> dict[str, Any]:
    backends, skipped = backend_availability(cfg.backends, cfg.device)
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "engine": {},
        "skipped_backends": skipped,
    }
    total = len(backends) * (cfg.warmup + cfg.repeat) + (cfg.requests if load else 0)
    total += 2 * len(CONCURRENCY_KINDS) * len(cfg.concurrency_levels)
    with (
        tqdm(total=total, desc="bench", unit="run", disable=not progress) as bar,
        tempfile.TemporaryDirectory() as tmp,
    ):
        torch_engine = None
        for name in backends:
            bar.set_postfix_str(name)
            engine = load_engine(name, cfg, Path(tmp))
            if name == "torch":
                torch_engine = engine
            report["engine"][name] = bench_engine(engine, cfg, bar)
        if cfg.concurrency_levels:
            bar.set_postfix_str("concurrency")
            report["concurrency"] = run_concurrency(cfg, bar)
        if load:
            bar.set_postfix_str("grpc")
            report["grpc"] = load_test(torch_engine or load_engine("torch", cfg, Path(tmp)), cfg, bar)
    return report


CONCURRENCY_KINDS = ("real_edit", "re_edit")


def timed_clients(engine: EditEngine, source: Any, clients: int, requests: int, opts: EditOptions) -> dict:
    """``requests`` real edits of ``source`` (an image or an inversion) from ``clients`` threads: edits/s,
    per-request latency percentiles, and the backend calls they took."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        engine.edit_real(source, f"a photo of a red car, variant {i}", options=opts)
        with lock:
            latencies.append((time.perf_counter() - t0) * 1e3)

    before = engine.counters()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    after = engine.counters()
    calls = after["unet_calls"] - before["unet_calls"]
    return {
        "concurrency": clients,
        "requests": len(latencies),
        "edits_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "unet_calls": calls,
        "mean_rows_per_call": (after["unet_rows"] - before["unet_rows"]) / max(calls, 1),
    }


def concurrency_table(
    engines: dict[str, EditEngine],
    levels: Sequence[int],
    *,
    steps: int,
    size: int,
    rounds: int = 2,
    seed: int = 0,
    bar: tqdm | None = None,
) -> dict[str, Any]:
    """Edits/s and per-request p50/p95 latency at each concurrency level, for each engine (e.g. batching
    ``"off"`` and ``"on"`` over the same backend) and each kind: ``real_edit`` (invert + edit of a new photo)
    and ``re_edit`` (a further edit of a cached inversion). Each level runs ``level * rounds`` requests from
    ``level`` threads; ``mean_rows_per_call`` is the engine's backend-call figure over that level."""
    opts = EditOptions(steps=steps)
    image = test_image(size, seed)
    table: dict[str, Any] = {
        "steps": steps,
        "size": size,
        "rounds": rounds,
        "levels": list(levels),
        "rows": [],
    }
    inversions = {}
    for mode, engine in engines.items():
        inversions[mode] = engine.invert(image, options=opts)
        engine.edit_real(inversions[mode], "a photo of a car", options=opts)  # warm-up; caches the maps
    # Modes alternate within each level, so that drifting machine load hits both sides alike.
    for level in levels:
        for kind in CONCURRENCY_KINDS:
            for mode, engine in engines.items():
                source = image if kind == "real_edit" else inversions[mode]
                row = timed_clients(engine, source, level, level * rounds, opts)
                table["rows"].append({"batching": mode, "kind": kind, **row})
                if bar is not None:
                    bar.update(1)
    return table


def concurrency_markdown(table: dict[str, Any]) -> list[str]:
    """Batching off and on side by side per kind and level."""
    lines = [
        f"Concurrency ({table['steps']} steps, {table['size']} px, {table['rounds']} requests per client):",
        "",
        "| kind | clients | edits/s off | edits/s on | speed-up | p50 ms off | p50 ms on | p95 ms off | p95 ms on "
        "| rows/call off | rows/call on |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = {(r["batching"], r["kind"], r["concurrency"]): r for r in table["rows"]}
    for kind in CONCURRENCY_KINDS:
        for level in table["levels"]:
            off, on = rows.get(("off", kind, level)), rows.get(("on", kind, level))
            if off is None or on is None:
                continue
            lines.append(
                f"| {kind} | {level} | {off['edits_per_s']:.2f} | {on['edits_per_s']:.2f} | "
                f"{on['edits_per_s'] / off['edits_per_s']:.2f}x | {off['p50_ms']:.0f} | {on['p50_ms']:.0f} | "
                f"{off['p95_ms']:.0f} | {on['p95_ms']:.0f} | {off['mean_rows_per_call']:.2f} | "
                f"{on['mean_rows_per_call']:.2f} |"
            )
    return lines


def run_concurrency(cfg: BenchConfig, bar: tqdm | None = None) -> dict[str, Any]:
    """The concurrency table for ``cfg.model`` on the torch backend: one backend, two engines over it."""
    off = EditEngine.from_pretrained(cfg.model, device=cfg.device, loras=cfg.loras)
    on = EditEngine(off.backend, off.tokenizer, source=off.source, batching=True)
    try:
        return concurrency_table(
            {"off": off, "on": on},
            cfg.concurrency_levels,
            steps=cfg.steps,
            size=cfg.size,
            seed=cfg.seed,
            bar=bar,
        )
    finally:
        on.close()


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gpu = m.get("gpu") or {}
    lines = [
        f"Machine: {gpu.get('name') or m['cpu']} ({m['cpu_count']} CPUs), {m['date']}, commit {m.get('commit')}",
        f"Model {report['config']['model']}, {report['config']['steps']} steps, {report['config']['size']} px",
        "",
        "| backend | kind | median ms | p95 ms | UNet rows | stages (median ms) |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for backend, kinds in report["engine"].items():
        for kind, r in kinds.items():
            stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages_ms"].items())
            lines.append(
                f"| {backend} | {kind} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['unet_rows']} | {stages} |"
            )
    for backend, reason in report.get("skipped_backends", {}).items():
        lines.append(f"| {backend} | skipped: {reason} | | | | |")
    if "grpc" in report:
        g = report["grpc"]
        lines += [
            "",
            "| gRPC load | concurrency | requests | errors | p50 ms | p95 ms | p99 ms | req/s | overhead ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| torch | {g['concurrency']} | {g['requests']} | {g['errors']} | {g.get('p50_ms', 0):.1f} | "
            f"{g.get('p95_ms', 0):.1f} | {g.get('p99_ms', 0):.1f} | {g['throughput_rps']:.2f} | {g.get('overhead_ms', 0):.1f} |",
        ]
    if "concurrency" in report:
        lines += ["", *concurrency_markdown(report["concurrency"])]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    """Stacked bars: per backend and kind, the median time of each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, stacks = [], []
    for backend, kinds in report["engine"].items():
        for kind, r in kinds.items():
            labels.append(f"{backend}\n{kind}")
            stacks.append(r["stages_ms"])
    stages = sorted({k for s in stacks for k in s})
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4.5))
    bottom = np.zeros(len(labels))
    for stage in stages:
        values = np.array([s.get(stage, 0.0) for s in stacks])
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    ax.set_ylabel("median ms")
    ax.set_title(f"fpedit stage breakdown ({report['config']['steps']} steps, {report['config']['size']} px)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], json_path: Path) -> list[Path]:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    md = json_path.with_suffix(".md")
    md.write_text(markdown(report))
    png = json_path.with_suffix(".png")
    chart(report, png)
    return [json_path, md, png]
