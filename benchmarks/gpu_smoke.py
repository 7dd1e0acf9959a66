"""The shortest run that exercises every GPU path of fpedit on the tiny model (under 5 minutes on one H100/H200).

    python benchmarks/gpu_smoke.py --json out/gpu-smoke.json     # on a machine with an NVIDIA GPU
    python benchmarks/gpu_smoke.py --dry-run                     # the same checks on the CPU, small (CI)

Checks, each printed as one ``PASS``/``FAIL``/``SKIP <name>: <detail>`` line and kept in the JSON file:

* ``torch_graphs_vs_eager`` - CUDA graphs against eager after shape changes (64 px, 128x64, back to 64 px, a
  real edit, a re-edit), same dtype;
* ``torch_batching_concurrent`` - batching on, a cold graph cache of 4 (new keys and re-captures happen under
  load): 8 concurrent mixed edits, no errors, each equal to its lone run, captures counted;
* ``onnx_fp16_export`` - the fp16 export passes the checker (the exporter checks every graph);
* ``onnxruntime_cuda_vs_cpu`` - ONNX Runtime's CUDA provider against its CPU provider on one edit (SKIP with
  the reason when this onnxruntime has no CUDA provider; FAIL when it has one that falls back);
* ``tensorrt`` - engines built, several shapes replayed and returned to (graphs against eager launches of the
  same engines, and against ONNX Runtime), an unaligned tensor bound, 4 concurrent edits (SKIP with the
  reason when TensorRT is absent);
* ``peak_memory`` - the run's peak CUDA allocation.

Only torch must be installed on the GPU machine: without an installed fpedit the script maps the repository's
folders to the ``fpedit`` package itself (the diffusers wheel travels with it; ``benchmarks/device_run.sh`` is
the one device command, see benchmarks/README.md). The exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Longest wait for a check's concurrent requests, all threads together: a hang must not take the lease.
CONCURRENT_TIMEOUT_S = 120.0
#: pyproject's package-dir, for a checkout that is not installed.
PACKAGE_DIRS = {
    "fpedit": "fpedit",
    "fpedit.engine": "engine",
    "fpedit.export": "export",
    "fpedit.server": "server",
    "fpedit.benchmarks": "benchmarks",
}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``fpedit.*`` in this checkout's folders (what ``pip install -e .`` would map)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        folder = PACKAGE_DIRS.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, ROOT / folder / "__init__.py", submodule_search_locations=[str(ROOT / folder)]
        )


def ensure_fpedit() -> None:
    try:
        import fpedit.engine  # noqa: F401
    except ImportError:
        for name in [n for n in sys.modules if n == "fpedit" or n.startswith("fpedit.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _CheckoutFinder())


def rel_l2(a: Any, b: Any) -> float:
    import torch

    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class Smoke:
    """Runs checks and records one outcome per check."""

    def __init__(self, json_path: Path | None) -> None:
        self.json_path = json_path
        self.report: dict[str, Any] = {"checks": []}

    def check(self, name: str, fn: Callable[[], tuple[str, str, dict[str, Any]]]) -> None:
        t0 = time.perf_counter()
        try:
            status, detail, data = fn()
        except Exception as exc:  # recorded, the run goes on
            status, detail, data = (
                "FAIL",
                f"{type(exc).__name__}: {exc}",
                {"traceback": traceback.format_exc()},
            )
        except BaseException as exc:  # SIGTERM from `timeout` (see terminate_on_sigterm) or ^C: record, stop
            self.record(name, "FAIL", f"interrupted ({type(exc).__name__}: {exc})", {}, t0)
            raise
        self.record(name, status, detail, data, t0)

    def record(self, name: str, status: str, detail: str, data: dict[str, Any], t0: float) -> None:
        """One outcome: its PASS/FAIL/SKIP line printed and the JSON rewritten at once (a cut run keeps it)."""
        seconds = round(time.perf_counter() - t0, 2)
        entry = {"name": name, "status": status, "seconds": seconds, "data": data}
        entry["reason" if status == "SKIP" else "detail"] = detail
        self.report["checks"].append(entry)
        print(f"{status} {name}: {detail} ({seconds} s)", flush=True)
        if status == "FAIL" and "traceback" in data:
            print(data["traceback"], flush=True)
        self.write()

    def write(self) -> None:
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(self.report, indent=2, default=str))

    @property
    def failed(self) -> bool:
        return any(c["status"] == "FAIL" for c in self.report["checks"])


def join_all(threads: list[threading.Thread], seconds: float) -> int:
    """Wait for ``threads`` at most ``seconds`` in all (one deadline, not one per thread); returns how many
    still run. Callers start them as daemons and leave hung ones behind, so a hang costs one deadline."""
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return sum(t.is_alive() for t in threads)


def terminate_on_sigterm() -> None:
    """Turn SIGTERM (what ``timeout`` sends) into SystemExit, so the check in progress is recorded as cut
    and the JSON written before the process ends (the default SIGTERM action writes nothing)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, stop)


def noise(seed: int, h: int, w: int) -> Any:
    import torch

    return torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(seed))


def image(side_h: int, side_w: int, seed: int) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side_h, side_w, 3), dtype=np.uint8))


def outcome(result: Any) -> list[Any]:
    if hasattr(result, "edited_latents"):
        return [result.source_latents, result.edited_latents]
    return [result.trajectory]


def torch_graphs_vs_eager(
    model: str, device: str, dtype: str, steps: int, tol: float
) -> tuple[str, str, dict]:
    from fpedit import EditEngine, EditOptions

    graphs = EditEngine.from_pretrained(
        model, device=device, dtype=dtype, backend_options={"cuda_graphs": True}
    )
    eager = EditEngine.from_pretrained(
        model, device=device, dtype=dtype, backend_options={"cuda_graphs": False}
    )
    opts = EditOptions(steps=steps)
    photo = image(64, 64, 1)

    def sequence(engine: Any) -> list[Any]:
        inv = engine.invert(photo, options=opts)
        return [
            engine.edit_generated("a cat", "a dog", latents=noise(1, 8, 8), options=opts),
            engine.edit_generated("a cat", "a dog", latents=noise(2, 16, 8), options=opts),
            engine.edit_generated("a cat", "a tiger", latents=noise(3, 8, 8), options=opts),  # back to 64 px
            engine.edit_real(inv, "a red car", options=opts),
            engine.edit_real(inv, "a blue car", options=opts),  # re-edit: cached maps, batch 2 inject
        ]

    errors = [
        max(rel_l2(x, y) for x, y in zip(outcome(a), outcome(b), strict=True))
        for a, b in zip(sequence(graphs), sequence(eager), strict=True)
    ]
    captured = len(graphs.backend.graphs or ())
    data = {"rel_l2": errors, "graphs_held": captured, "graphs_captured": graphs.backend.graphs.captures}
    status = "PASS" if max(errors) < tol and captured > 0 else "FAIL"
    return status, f"max rel L2 {max(errors):.2e} (tolerance {tol:.0e}) over 5 edits, {captured} graphs", data


def torch_batching_concurrent(model: str, device: str, steps: int, tol: float) -> tuple[str, str, dict]:
    """float32 on both sides: what is checked is capture under load, not fp16 rounding."""
    from fpedit import EditEngine, EditOptions
    from fpedit.engine.backends.capture import CAPTURE_GATE

    options = {"cuda_graphs": True, "max_graphs": 4}
    lone = EditEngine.from_pretrained(model, device=device, dtype="float32", backend_options=options)
    batched = EditEngine.from_pretrained(
        model, device=device, dtype="float32", backend_options=options, batching=True, max_wait_ms=5
    )
    opts = EditOptions(steps=steps)

    def jobs(engine: Any) -> list[Callable[[], Any]]:
        return [
            lambda: engine.edit_generated("a cat", "a dog", latents=noise(1, 8, 8), options=opts),
            lambda: engine.edit_generated("a", "b", latents=noise(2, 16, 8), options=opts),
            lambda: engine.edit_real(image(64, 64, 3), "a red car", options=opts),
            lambda: engine.edit_real(image(64, 128, 4), "a bus", options=opts.replace(map_format="probs")),
            lambda: engine.invert(image(64, 64, 5), options=opts),
            lambda: engine.edit_generated("x", "y", latents=noise(6, 8, 16), options=opts),
            lambda: engine.edit_real(image(64, 64, 7), "a boat", options=opts.replace(layers=(2, 15))),
            lambda: engine.edit_generated(
                "p", "q", latents=noise(8, 8, 8), options=opts.replace(steps=steps + 1)
            ),
        ]

    expected = [job() for job in jobs(lone)]
    results: list[Any] = [None] * 8
    barrier = threading.Barrier(8)

    def work(i: int, job: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = job()
        except Exception as exc:
            results[i] = exc

    captures = CAPTURE_GATE.captures
    threads = [
        threading.Thread(target=work, args=(i, job), daemon=True) for i, job in enumerate(jobs(batched))
    ]
    for t in threads:
        t.start()
    hung = join_all(threads, CONCURRENT_TIMEOUT_S)
    if not hung:  # close() waits for the device loop, which a hang would keep busy forever
        batched.close()
    captures = CAPTURE_GATE.captures - captures
    errors = [repr(r) for r in results if isinstance(r, Exception)]
    diffs = [
        max(rel_l2(x, y) for x, y in zip(outcome(b), outcome(a), strict=True))
        for a, b in zip(expected, results, strict=True)
        if not isinstance(b, Exception) and b is not None
    ]
    counters = batched.counters()
    data = {
        "errors": errors,
        "hung": hung,
        "rel_l2": diffs,
        "captures_under_load": captures,
        "counters": counters,
    }
    ok = not hung and not errors and len(diffs) == 8 and max(diffs) < tol and captures > 0
    detail = (
        f"8 concurrent edits, {len(errors)} errors, {hung} hung, max rel L2 vs lone {max(diffs, default=0):.2e} "
        f"(tolerance {tol:.0e}), {captures} captures under load, mean rows/call {counters['mean_rows_per_call']:.2f}"
    )
    return ("PASS" if ok else "FAIL"), detail, data


def onnx_fp16_export(model: str, work: Path, small: bool) -> tuple[str, str, dict]:
    """Every graph on a GPU run; the dry run exports only the text encoder (tests/export/test_onnx.py exports
    every graph in fp16 already)."""
    from fpedit.engine.contract import GRAPHS
    from fpedit.export.onnx_export import export_onnx

    graphs = ("text_encoder",) if small else GRAPHS
    manifest = export_onnx(model, work / "fp16", fp16=True, graphs=graphs)
    return (
        "PASS",
        f"{len(manifest.files)} graphs, precision {manifest.precision}, checker passed",
        {"files": manifest.files},
    )


def float32_export(model: str, work: Path) -> Path:
    from fpedit.engine.contract import ShapeRange
    from fpedit.export.onnx_export import export_onnx

    out = work / "fp32"
    if not (out / "manifest.json").is_file():
        export_onnx(model, out, image_size=ShapeRange(64, 64, 128))
    return out


def onnxruntime_cuda_vs_cpu(model: str, work: Path, steps: int, cuda: bool) -> tuple[str, str, dict]:
    import onnxruntime as ort

    from fpedit import EditEngine, EditOptions

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available or not cuda:
        why = "no CUDA device (dry run)" if not cuda else "this onnxruntime is a CPU build"
        return (
            "SKIP",
            f"CUDAExecutionProvider missing: {why} (onnxruntime {ort.__version__}, providers {available}); "
            "install onnxruntime-gpu>=1.19 alone",
            {"providers": available},
        )
    folder = float32_export(model, work)
    opts = EditOptions(steps=steps)
    gpu = EditEngine.from_pretrained(folder, backend="onnxruntime", device="cuda")  # refuses a CPU fallback
    cpu = EditEngine.from_pretrained(folder, backend="onnxruntime")
    a = gpu.edit_generated("a cat", "a dog", latents=noise(1, 8, 8), options=opts)
    b = cpu.edit_generated("a cat", "a dog", latents=noise(1, 8, 8), options=opts)
    err = rel_l2(a.edited_latents, b.edited_latents)
    # ONNX Runtime's CUDA provider runs float32 GEMMs and convolutions in TF32 unless told otherwise
    # (CUDAExecutionProviderInfo: use_tf32 defaults to true), so CUDA vs CPU is compared at TensorRT's
    # tolerance; a wrongly bound pointer or a CPU fallback is off by order 1.
    return (
        ("PASS" if err < 1e-2 else "FAIL"),
        f"rel L2 CUDA vs CPU {err:.2e}",
        {
            "rel_l2": err,
            "providers": gpu.backend.providers,
        },
    )


def tensorrt_check(model: str, work: Path, steps: int, cuda: bool) -> tuple[str, str, dict]:
    try:
        import tensorrt
    except ImportError:
        return "SKIP", "TensorRT is not installed (pip install 'fpedit[tensorrt]' on the GPU machine)", {}
    if not cuda:
        return "SKIP", f"TensorRT {tensorrt.__version__} needs a CUDA GPU (dry run)", {}
    import torch

    from fpedit import EditEngine, EditOptions
    from fpedit.export.tensorrt_build import build_engines

    folder = float32_export(model, work)
    build_engines(folder, work / "plans")
    trt = EditEngine.from_pretrained(work / "plans", backend="tensorrt", device="cuda")
    # The same engines launched eagerly (one context per graph, re-bound every call): a captured graph that
    # replays the wrong shape or stale addresses differs from these far beyond TensorRT's own rounding.
    eager = EditEngine.from_pretrained(
        work / "plans", backend="tensorrt", device="cuda", backend_options={"cuda_graphs": False}
    )
    ref = EditEngine.from_pretrained(folder, backend="onnxruntime")
    opts = EditOptions(steps=steps)
    diffs, graph_vs_eager = [], []
    for seed, (h, w) in enumerate([(8, 8), (16, 8), (8, 8), (16, 16), (8, 8)]):  # returns to earlier shapes
        a = trt.edit_generated("a cat", "a dog", latents=noise(seed, h, w), options=opts)
        e = eager.edit_generated("a cat", "a dog", latents=noise(seed, h, w), options=opts)
        b = ref.edit_generated("a cat", "a dog", latents=noise(seed, h, w), options=opts)
        diffs.append(rel_l2(a.edited_latents, b.edited_latents))
        graph_vs_eager.append(rel_l2(a.edited_latents, e.edited_latents))
    # An unaligned input (4 bytes into its storage) through the backends' unet directly. Only the eager
    # backend binds the caller's address (the graphed one copies into its static buffer), so that is the
    # one that checks the aligned copy; the graphed one is checked too.
    from fpedit.engine.calls import UNetCall

    backend = trt.backend
    sample = torch.randn(2, 4, 8, 8, device="cuda")
    flat = torch.empty(sample.numel() + 1, device="cuda")
    shifted = flat[1:].view_as(sample).copy_(sample)
    context = torch.randn(2, 77, backend.spec.cross_attention_dim, device="cuda")
    timesteps = torch.tensor([500.0, 500.0], device="cuda")
    unaligned = max(
        rel_l2(
            b.unet(UNetCall(shifted, timesteps, context)).noise,
            b.unet(UNetCall(sample, timesteps, context)).noise,
        )
        for b in (eager.backend, backend)
    )
    # Concurrency: 4 edits at once over one engine with batching, each equal to its lone eager run.
    batched = EditEngine.from_pretrained(work / "plans", backend="tensorrt", device="cuda", batching=True)
    results: list[Any] = [None] * 4

    def job(engine: Any, i: int) -> Any:
        return engine.edit_generated("a", "b", latents=noise(10 + i, 8, 8 * (1 + i % 2)), options=opts)

    alone = [job(eager, i) for i in range(4)]

    def work_item(i: int) -> None:
        try:
            results[i] = job(batched, i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=work_item, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    hung = join_all(threads, CONCURRENT_TIMEOUT_S)
    if not hung:
        batched.close()
    errors = [repr(r) for r in results if isinstance(r, Exception) or r is None]
    concurrent = [
        rel_l2(r.edited_latents, a.edited_latents)
        for r, a in zip(results, alone, strict=True)
        if not isinstance(r, Exception) and r is not None
    ]
    data = {
        "rel_l2_vs_onnxruntime": diffs,
        "rel_l2_graphs_vs_eager": graph_vs_eager,
        "unaligned_rel_l2": unaligned,
        "rel_l2_concurrent_vs_alone": concurrent,
        "errors": errors,
        "hung": hung,
        **backend.describe(),
    }
    ok = (
        max(diffs) < 1e-2
        and max(graph_vs_eager) < 1e-3
        and unaligned < 1e-6
        and not errors
        and max(concurrent, default=1.0) < 1e-2
    )
    detail = (
        f"TensorRT {tensorrt.__version__}: max rel L2 vs ONNX Runtime {max(diffs):.2e}, graphs vs eager "
        f"{max(graph_vs_eager):.2e} over 5 shapes, unaligned bind {unaligned:.1e}, {len(errors)} errors in 4 "
        f"concurrent edits (max rel L2 vs alone {max(concurrent, default=float('nan')):.2e})"
    )
    return ("PASS" if ok else "FAIL"), detail, data


def peak_memory(cuda: bool) -> tuple[str, str, dict]:
    import torch

    if not cuda:
        return "SKIP", "no CUDA device (dry run)", {}
    peak = torch.cuda.max_memory_allocated() / 1024**3
    return (
        "PASS",
        f"peak CUDA allocation {peak:.2f} GiB on {torch.cuda.get_device_name()}",
        {"peak_gib": peak},
    )


def run_checks(smoke: Smoke, model: str, device: str, steps: int, cuda: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        smoke.check(
            "torch_graphs_vs_eager",
            lambda: torch_graphs_vs_eager(
                model, device, "float16" if cuda else "float32", steps, 1e-2 if cuda else 1e-5
            ),
        )
        smoke.check(
            "torch_batching_concurrent", lambda: torch_batching_concurrent(model, device, steps, 1e-3)
        )
        smoke.check("onnx_fp16_export", lambda: onnx_fp16_export(model, work, small=not cuda))
        smoke.check("onnxruntime_cuda_vs_cpu", lambda: onnxruntime_cuda_vs_cpu(model, work, steps, cuda))
        smoke.check("tensorrt", lambda: tensorrt_check(model, work, steps, cuda))
        smoke.check("peak_memory", lambda: peak_memory(cuda))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fpedit GPU smoke run (every GPU path, tiny model)")
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU, small (CI)")
    parser.add_argument("--json", type=Path, help="write the checks here")
    parser.add_argument(
        "--model", default="tiny", help="an SD 1.x diffusers folder or 'tiny' (default; built in memory)"
    )
    args = parser.parse_args(argv)
    ensure_fpedit()
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: running the dry run instead", flush=True)
    device = "cuda" if cuda else "cpu"
    steps = 4 if cuda else 2
    smoke = Smoke(args.json)
    smoke.report.update(
        mode="gpu" if cuda else "dry-run",
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name() if cuda else None,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if not cuda:  # 8 request threads on a small CPU: intra-op threads on top only oversubscribe it
        torch.set_num_threads(1)
    try:
        run_checks(smoke, args.model, device, steps, cuda)
    finally:
        torch.set_num_threads(threads)
    smoke.report["seconds"] = round(time.perf_counter() - started, 1)
    smoke.write()
    counts = {s: sum(c["status"] == s for c in smoke.report["checks"]) for s in ("PASS", "FAIL", "SKIP")}
    print(f"SUMMARY {smoke.report['mode']}: {counts} in {smoke.report['seconds']} s", flush=True)
    return 1 if smoke.failed else 0


if __name__ == "__main__":
    terminate_on_sigterm()
    sys.exit(main())
