"""What a word-mask blend costs (issue 27): UNet time and memory of the target's two-row call with and
without the cross-attention probabilities of the 1/4-grid layers, on the SD 1.5 architecture with random
weights (timings do not depend on weight values), through the same ``Backend.unet`` call the engine makes.

    python -m fpedit.benchmarks.blend_cost --size 256 --json out/blend_cost.json

A user mask costs no UNet work at all (one multiply-add on the latent per blended step); a word mask adds,
per call, the q/k projections and softmax of five cross-attention layers beside their fused attention, and
returns (rows, queries, 77) float32 per layer. Ratios are measured side by side in one run; absolute CPU times
are only indicative.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from fpedit.engine.calls import UNetCall
from fpedit.engine.local_blend import word_layers

from .machine import machine_facts
from .unet_variants import time_calls


def measure(size: int, repeat: int, warmup: int) -> dict[str, Any]:
    """Per-call UNet ms (median, min) of a plain two-row call and the same call handing out the word-map
    layers' cross-attention probabilities, the bytes those probabilities take, and the peak RSS growth."""
    from .gpu import make_engine, sd15_random_modules

    engine = make_engine(sd15_random_modules("cpu"), "cpu", torch.float32)
    backend = engine.backend
    side = size // 8
    layers = word_layers(engine.spec, (side, side))
    sample = torch.randn((2, 4, side, side), generator=torch.Generator().manual_seed(0))
    context = torch.randn((2, engine.spec.text_max_length, engine.spec.text_hidden_size))
    t = torch.full((2,), 500.0)
    plain = UNetCall(sample, t, context)
    words = UNetCall(sample, t, context, cross_probs=layers)
    cross = backend.unet(words).cross
    assert cross is not None
    times = time_calls(
        {"plain": lambda: backend.unet(plain), "word_mask": lambda: backend.unet(words)}, warmup, repeat
    )
    return {
        "size": size,
        "layers": list(layers),
        "unet_ms": times,
        "overhead": times["word_mask"]["median_ms"] / times["plain"]["median_ms"] - 1.0,
        "cross_bytes_per_call": sum(c.numel() * c.element_size() for c in cross.values()),
        # The blend keeps one (grid) float32 sum per prompt over the steps: what an edit holds between calls.
        "accumulator_bytes_per_prompt": (side // 4) ** 2 * 4,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[256])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = [measure(size, args.repeat, args.warmup) for size in args.size]
    print(
        "| size | plain UNet ms (median) | word-mask UNet ms (median) | overhead | probabilities per call |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        p, w = r["unet_ms"]["plain"]["median_ms"], r["unet_ms"]["word_mask"]["median_ms"]
        print(
            f"| {r['size']} px | {p:.0f} | {w:.0f} | {100 * r['overhead']:+.1f} % | {r['cross_bytes_per_call'] / 1024:.0f} KiB |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"machine": machine_facts(), "rows": rows, "seconds": time.perf_counter() - started}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
