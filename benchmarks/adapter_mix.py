"""Throughput of per-request adapters under batching (issue 29): edits/s of 8 concurrent generated edits when
they use 1, 2 or 4 different adapter sets, against all 8 on one set and against no adapters.

    python -m fpedit.benchmarks.adapter_mix --model tiny --size 64 --steps 4 --json out/adapter_mix.json

The executor merges only calls of one set, so k sets among n requests give backend calls of about n/k
requests' rows; this measures what that costs on this machine. Random rank-4 PEFT files on every attention
projection of the UNet (timings do not depend on weight values). Ratios are measured side by side in one run;
absolute CPU times are only indicative.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fpedit import EditEngine, EditOptions

from .machine import machine_facts

RANK = 4
REQUESTS = 8


def write_adapters(engine_model: Any, folder: Path, count: int) -> list[str]:
    """``count`` PEFT-layout files ``a0..`` on every attention projection of ``engine_model`` (a UNet)."""
    from safetensors.torch import save_file

    targets = {
        name: m
        for name, m in engine_model.named_modules()
        if isinstance(m, torch.nn.Linear) and (".attn1." in name or ".attn2." in name)
    }
    names = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for name, m in targets.items():
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * 0.01
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.01
        metadata = {"unet.r": RANK, "unet.lora_alpha": RANK, "unet.target_modules": sorted(targets)}
        save_file(
            tensors,
            str(folder / f"a{i}.safetensors"),
            metadata={"lora_adapter_metadata": json.dumps(metadata)},
        )
        names.append(f"a{i}")
    return names


def run_round(engine: EditEngine, sets: list[tuple[tuple[str, float], ...]], size: int, steps: int) -> float:
    """Seconds for :data:`REQUESTS` concurrent generated edits, request ``i`` on ``sets[i % len(sets)]``."""
    barrier = threading.Barrier(REQUESTS)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        barrier.wait()
        try:
            options = EditOptions(steps=steps, adapters=sets[i % len(sets)])
            engine.edit_generated("a cat", "a dog", seed=i, height=size, width=size, options=options)
        except BaseException as exc:  # reported after the round
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(REQUESTS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def measure(model: str, size: int, steps: int, repeat: int) -> dict[str, Any]:
    plain = EditEngine.from_pretrained(model)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_adapters(plain.backend.unet_module, Path(tmp), 4)
        engine = EditEngine.from_pretrained(model, lora_dir=tmp, batching=True, max_wait_ms=20)
    layouts: dict[str, list[tuple[tuple[str, float], ...]]] = {
        "no adapters": [()],
        "1 set": [((names[0], 1.0),)],
        "2 sets": [((n, 1.0),) for n in names[:2]],
        "4 sets": [((n, 1.0),) for n in names[:4]],
    }
    run_round(engine, layouts["1 set"], size, steps)  # warm-up
    results: dict[str, Any] = {}
    for label, sets in layouts.items():
        before = engine.counters()
        best = min(run_round(engine, sets, size, steps) for _ in range(repeat))
        after = engine.counters()
        calls, rows = after["unet_calls"] - before["unet_calls"], after["unet_rows"] - before["unet_rows"]
        results[label] = {"edits_per_s": REQUESTS / best, "rows_per_call": rows / calls, "unet_calls": calls}
    one = results["1 set"]["edits_per_s"]
    for entry in results.values():
        entry["vs_one_set"] = entry["edits_per_s"] / one
    engine.close()
    return {"model": model, "size": size, "steps": steps, "requests": REQUESTS, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fpedit.benchmarks.adapter_mix", description=__doc__)
    parser.add_argument("--model", default="tiny", help="model folder or tiny (default tiny)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per edit (default 4)")
    parser.add_argument(
        "--repeat", type=int, default=2, help="rounds per layout; the best counts (default 2)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    out = {**measure(args.model, args.size, args.steps, args.repeat), "machine": machine_facts()}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
