"""``fpedit bench``."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from fpedit.engine.errors import FpeditError

#: What `fpedit bench` imports -> the extra that installs it. Checked before anything runs, so that a
#: client-only install hears everything it lacks in one line instead of a traceback for the first module.
ENGINE_MODULES = {"torch": "engine", "diffusers": "engine", "transformers": "engine", "tqdm": "engine"}
LOAD_TEST_MODULES = {"grpc": "server", "grpc_reflection": "server", "prometheus_client": "server"}
PLOT_MODULES = {"matplotlib": "bench"}


def missing_modules(needed: dict[str, str]) -> dict[str, str]:
    """The modules of ``needed`` that cannot be imported here, with their extras."""
    missing = {}
    for name, extra in needed.items():
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError, AttributeError):  # a broken or blocked install counts as missing
            found = False
        if not found:
            missing[name] = extra
    return missing


def require_bench_modules(args: argparse.Namespace) -> None:
    needed = dict(ENGINE_MODULES)
    if args.ray or not args.no_load_test:
        needed.update(LOAD_TEST_MODULES)
    if args.json:
        needed.update(PLOT_MODULES)  # the .png beside the JSON
    missing = missing_modules(needed)
    if missing:
        extras = ",".join(sorted(set(missing.values()), key=["engine", "server", "bench"].index))
        raise FpeditError(
            f"fpedit bench needs {', '.join(missing)}, not installed here: pip install 'fpedit[{extras}]'"
        )


def cmd_bench(args: argparse.Namespace) -> int:
    require_bench_modules(args)
    if args.ray:
        if args.loras:
            from fpedit.engine.errors import InvalidInputError

            raise InvalidInputError("loras", "the Ray bench takes no --lora; time LoRAs without --ray")
        return cmd_ray_bench(args)
    from .bench import BenchConfig, markdown, run_bench, write_outputs

    overrides = {
        **shared_overrides(args),
        **given(
            warmup=args.warmup,
            concurrency_levels=tuple(args.concurrency) if args.concurrency else None,
            load_steps=args.load_steps,
            backends=tuple(args.backends) if args.backends else None,
            loras=tuple(args.loras) if args.loras else None,
        ),
    }
    cfg = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    report = run_bench(cfg, load=not args.no_load_test, progress=not args.no_progress)
    print(markdown(report))
    if args.json:
        for path in write_outputs(report, args.json):
            print(f"wrote {path}")
    return 0


def cmd_ray_bench(args: argparse.Namespace) -> int:
    """``fpedit bench --ray``: the Ray section alone (it starts its own Ray instance)."""
    from fpedit.server.ray_app import require_ray

    from .ray_bench import RayBenchConfig, markdown, run_ray_bench, write_outputs

    require_ray()
    report = run_ray_bench(RayBenchConfig(**shared_overrides(args)))
    print(markdown(report))
    if args.json:
        for path in write_outputs(report, args.json):
            print(f"wrote {path}")
    return 0


def given(**values: Any) -> dict[str, Any]:
    """The options the user set (argparse leaves the others None): config defaults stay for the rest."""
    return {name: value for name, value in values.items() if value is not None}


def shared_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Options both bench configurations take; a list of client counts gives its largest."""
    return given(
        model=args.model,
        device=args.device,
        steps=args.steps,
        size=args.size,
        repeat=args.repeat,
        requests=args.requests,
        concurrency=max(args.concurrency) if args.concurrency else None,
    )


def client_counts(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]`` (positive, distinct, in order)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sorted(set(counts))


def add_commands(sub: Any) -> None:
    bench = sub.add_parser("bench", help="engine latency per backend and a gRPC load test")
    bench.add_argument(
        "--quick", action="store_true", help="tiny model, 10 steps, 128 px: minutes on a laptop CPU"
    )
    bench.add_argument("--model", help="model (default tiny)")
    bench.add_argument(
        "--lora",
        action="append",
        dest="loras",
        metavar="FILE[:SCALE]",
        help="fuse a LoRA into the model at load (repeatable; not with --ray)",
    )
    bench.add_argument("--device", help="cpu or cuda (default cpu)")
    bench.add_argument(
        "--backends",
        nargs="+",
        choices=("torch", "onnxruntime", "tensorrt"),
        help="backends to time (default: every one that can run here; others are reported as skipped)",
    )
    bench.add_argument("--steps", type=int, help="DDIM steps per edit (default 50; 10 with --quick)")
    bench.add_argument("--size", type=int, help="image side in pixels (default 512; 128 with --quick)")
    bench.add_argument("--warmup", type=int, help="untimed edits first: CUDA graphs, caches (default 1)")
    bench.add_argument(
        "--repeat",
        type=int,
        help="timed edits per case, median and p95 over these (default 5; 3 with --quick)",
    )
    bench.add_argument(
        "--concurrency",
        type=client_counts,
        metavar="N[,N...]",
        help="client counts, e.g. 1,2,4,8: adds the batching table (edits/s and p50/p95 per count, batching "
        "off and on, real edits and re-edits); the load test uses the largest (default 4, no table)",
    )
    bench.add_argument("--requests", type=int, help="load-test requests in all (default 16; 12 with --quick)")
    bench.add_argument("--load-steps", type=int, help="steps per load-test edit (default: --steps)")
    bench.add_argument(
        "--no-load-test", action="store_true", help="skip the gRPC load test (default: run it)"
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    bench.add_argument(
        "--json", type=Path, help="write JSON, plus .md and .png beside it (default: markdown on stdout only)"
    )
    bench.add_argument(
        "--ray",
        action="store_true",
        help="Ray Serve section only: edits/s with 1 and 2 replicas, added latency over the standalone server",
    )
    bench.set_defaults(func=cmd_bench)
