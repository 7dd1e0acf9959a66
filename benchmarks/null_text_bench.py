"""Cost of the three inversion methods, side by side, in one run (prints a table, writes JSON).

    python benchmarks/null_text_bench.py                         # tiny model, CPU, 10 steps, 128 px
    python benchmarks/null_text_bench.py --model sd15-random --device cuda --steps 50 --size 512

For each method (``ddim``: Algorithm 2; ``negative-prompt``; ``null-text``: Algorithm 3) it reports the
inversion's wall time (median of ``--repeat`` runs), its UNet forward rows and backward rows (null-text's Adam iterations), and the first
edit (source branch + target) and a re-edit (target only) of that inversion. ``sd15-random`` is the SD 1.5
architecture with seeded random weights (latency does not depend on weight values; quality does). The
null-text figures depend on how soon the optimisation stops early (random weights rarely reach the loss
threshold, so they show the full ``inner_steps`` per step: the worst case).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

METHODS = ("ddim", "negative-prompt", "null-text")


def load_engine(model: str, device: str, dtype: str | None) -> Any:
    from fpedit.engine import EditEngine

    if model == "sd15-random":
        from fpedit.benchmarks.gpu import make_engine, sd15_random_modules
        from fpedit.engine.backends import parse_dtype

        torch_dtype = parse_dtype(dtype or ("float16" if device.startswith("cuda") else "float32"))
        return make_engine(sd15_random_modules(device), device, torch_dtype)
    return EditEngine.from_pretrained(model, device=device, dtype=dtype)


def measure(engine: Any, image: Any, method: str, args: argparse.Namespace) -> dict[str, Any]:
    from fpedit.engine import EditOptions

    options = EditOptions(steps=args.steps, guidance_scale=args.guidance)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    extra = {} if method == "ddim" else {"source_prompt": args.source_prompt, "method": method}
    t0 = time.perf_counter()
    inversion = engine.invert(image, options=options, null_text_steps=args.inner_steps, **extra)
    invert_s = time.perf_counter() - t0
    stats = inversion.stats
    t0 = time.perf_counter()
    first = engine.edit_real(inversion, args.target_prompt, options=options)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = engine.edit_real(inversion, args.target_prompt + ", night", options=options)
    again_s = time.perf_counter() - t0
    return {
        "method": method,
        "invert_s": round(invert_s, 3),
        "invert_unet_forward_rows": stats["unet_rows"],
        "invert_unet_backward_rows": stats.get("unet_backward_rows", 0),
        "null_text_iterations": stats.get("null_text_iterations", 0),
        "invert_stages_ms": {k: round(v, 1) for k, v in stats["stages_ms"].items()},
        "first_edit_s": round(first_s, 3),
        "first_edit_unet_rows": first.stats["unet_rows"],
        "reedit_s": round(again_s, 3),
        "reedit_unet_rows": again.stats["unet_rows"],
        # Other processes on a shared machine slow every figure: the 1-minute load before and after.
        "load_before": load_before,
        "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="model folder, 'tiny' or 'sd15-random'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; medians are reported")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--source-prompt", default="a photo of a red disc")
    parser.add_argument("--target-prompt", default="a photo of a blue square")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    from fpedit.benchmarks.bench import test_image
    from fpedit.benchmarks.machine import machine_facts

    engine = load_engine(args.model, args.device, args.dtype)
    image = test_image(args.size)
    from fpedit.engine import EditOptions

    engine.invert(image, options=EditOptions(steps=2))  # warm-up: allocator, kernels, text cache
    rows = []
    for method in args.methods:
        # Medians over repeats: other processes on a shared machine make single timings jump.
        runs = [measure(engine, image, method, args) for _ in range(args.repeat)]
        row = dict(runs[0])
        for key in ("invert_s", "first_edit_s", "reedit_s"):
            row[key] = round(statistics.median(r[key] for r in runs), 3)
            row[f"{key}_all"] = [r[key] for r in runs]
        rows.append(row)

    print(
        f"{args.model} on {args.device}, {args.size} px, {args.steps} steps, inner steps {args.inner_steps}"
    )
    print(
        f"{'method':<16}{'invert s':>10}{'fwd rows':>10}{'bwd rows':>10}{'1st edit s':>12}{'re-edit s':>11}"
    )
    for r in rows:
        print(
            f"{r['method']:<16}{r['invert_s']:>10.2f}{r['invert_unet_forward_rows']:>10}"
            f"{r['invert_unet_backward_rows']:>10}{r['first_edit_s']:>12.2f}{r['reedit_s']:>11.2f}"
        )
    if args.json is not None:
        report = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine_facts(),
            "engine": engine.info(),
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
