"""Throughput of per-request adapters under batching (issue 29), both ways the executor can batch them:
edits/s of 8 concurrent generated edits when they use 1, 2, 4 or 8 different adapter sets, against all 8 on
one set and against no adapters, with ``adapter_batching="group"`` (a backend call carries one set) and
``"mix"`` (calls of different sets share a backend call, a scale per row) side by side; and the cost of an
adapter switch: sequential single edits alternating two sets (A, B, A, B) against one set (A, A, A, A).

    python -m fpedit.benchmarks.adapter_mix --model tiny --size 64 --steps 4 --json out/adapter_mix.json

Grouping gives k sets among n requests backend calls of about n/k requests' rows once k exceeds what a call
holds; mixing keeps calls full but makes every row of a mixed call compute the LoRA deltas of every adapter
in it (0-scaled where the row's set lacks one). Random rank-4 PEFT files on every attention projection of the
UNet (timings do not depend on weight values). Both strategies run on one backend, alternating round by
round, so their ratios are measured side by side; absolute CPU times are only indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fpedit import EditEngine, EditOptions
from fpedit.engine.adapters import ADAPTER_BATCHING

from .machine import machine_facts

RANK = 4
REQUESTS = 8
#: Adapter sets among the :data:`REQUESTS` concurrent requests (8: more than the 2 requests a call holds).
SET_COUNTS = (1, 2, 4, 8)


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


def layouts(names: list[str]) -> dict[str, list[tuple[tuple[str, float], ...]]]:
    """Request ``i`` of a round uses ``sets[i % len(sets)]``: no adapters, then 1, 2, 4 and 8 sets."""
    out: dict[str, list[tuple[tuple[str, float], ...]]] = {"no adapters": [()]}
    for k in SET_COUNTS:
        out[f"{k} set" + ("s" if k > 1 else "")] = [((name, 1.0),) for name in names[:k]]
    return out


def switch_cost(engine: EditEngine, names: list[str], size: int, steps: int, edits: int, repeat: int) -> dict:
    """Seconds per sequential edit (no batching) alternating sets A, B, A, B against A, A, A, A."""
    patterns = {"same set": [names[0]] * edits, "alternating": [names[i % 2] for i in range(edits)]}
    best = dict.fromkeys(patterns, float("inf"))
    for _ in range(repeat):
        for label, order in patterns.items():
            started = time.perf_counter()
            for i, name in enumerate(order):
                options = EditOptions(steps=steps, adapters=[(name, 1.0)])
                engine.edit_generated("a cat", "a dog", seed=i, height=size, width=size, options=options)
            best[label] = min(best[label], (time.perf_counter() - started) / edits)
    return {
        "edits_per_pattern": edits,
        "s_per_edit": best,
        "alternating_vs_same": best["alternating"] / best["same set"],
    }


def measure(model: str, size: int, steps: int, repeat: int, switch_edits: int) -> dict[str, Any]:
    plain = EditEngine.from_pretrained(model)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_adapters(plain.backend.unet_module, Path(tmp), max(SET_COUNTS))
        loaded = EditEngine.from_pretrained(model, lora_dir=tmp)
    backend, tokenizer = loaded.backend, loaded.tokenizer
    engines = {
        strategy: EditEngine(backend, tokenizer, batching=True, max_wait_ms=20, adapter_batching=strategy)
        for strategy in ADAPTER_BATCHING
    }
    mixed = [0]  # backend calls that carried rows of more than one set
    unet = backend.unet

    def counting(call: Any) -> Any:
        mixed[0] += call.row_adapters is not None
        return unet(call)

    backend.unet = counting  # type: ignore[method-assign]
    rounds = layouts(names)
    for engine in engines.values():  # warm-up: every set's prompt embeddings cached, allocations made
        run_round(engine, rounds["8 sets"], size, steps)
    best: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], list[int]] = {}
    for r in range(repeat):
        for label, sets in rounds.items():
            # Side by side, each first every other repetition: drifting load hits both alike.
            for strategy, engine in list(engines.items())[:: 1 if r % 2 == 0 else -1]:
                before, mixed_before = engine.counters(), mixed[0]
                seconds = run_round(engine, sets, size, steps)
                after = engine.counters()
                key = (strategy, label)
                best[key] = min(best.get(key, float("inf")), seconds)
                tally = counts.setdefault(key, [0, 0, 0])
                tally[0] += after["unet_calls"] - before["unet_calls"]
                tally[1] += after["unet_rows"] - before["unet_rows"]
                tally[2] += mixed[0] - mixed_before
    results: dict[str, Any] = {}
    for strategy in engines:
        one = REQUESTS / best[(strategy, "1 set")]
        results[strategy] = {}
        for label in rounds:
            calls, rows, mixed_calls = counts[(strategy, label)]
            edits_per_s = REQUESTS / best[(strategy, label)]
            results[strategy][label] = {
                "edits_per_s": edits_per_s,
                "vs_one_set": edits_per_s / one,
                "unet_calls_per_round": calls / repeat,
                "rows_per_call": rows / calls,
                "mixed_calls_per_round": mixed_calls / repeat,
            }
    mix_vs_group = {
        label: results["mix"][label]["edits_per_s"] / results["group"][label]["edits_per_s"]
        for label in rounds
    }
    sequential = EditEngine(backend, tokenizer)
    switch = switch_cost(sequential, names, size, steps, switch_edits, repeat)
    for engine in engines.values():
        engine.close()
    return {
        "model": model,
        "size": size,
        "steps": steps,
        "requests": REQUESTS,
        "max_batch": backend.max_batch,
        "repeat": repeat,
        "results": results,
        "mix_vs_group": mix_vs_group,
        "switch": switch,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fpedit.benchmarks.adapter_mix", description=__doc__)
    parser.add_argument("--model", default="tiny", help="model folder or tiny (default tiny)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per edit (default 4)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds per layout and strategy; the best counts (default 3)"
    )
    parser.add_argument(
        "--switch-edits",
        type=int,
        default=8,
        help="sequential edits per pattern of the switch measurement (default 8)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()  # the figures' context on a shared machine
    out = {
        **measure(args.model, args.size, args.steps, args.repeat, args.switch_edits),
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "machine": machine_facts(),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
