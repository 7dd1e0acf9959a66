"""``fpedit bench --ray``: the Ray Serve path against the standalone server, on one machine.

* ``throughput``: edits/s through the gRPC front with 1 and with 2 replicas (``concurrency`` clients sending
  ``requests`` real edits -- invert + edit of an image -- in all), and their ratio, in one run;
* ``added_latency_ms``: the median of one edit at a time through the Ray front (1 replica) minus the same
  through the standalone server, with the engine on the same number of threads in both.

Prints Markdown and writes JSON (``--json``); the figures go in ``benchmarks/README.md``.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .machine import machine_facts


@dataclass
class RayBenchConfig:
    model: str = "tiny"
    device: str = "cpu"
    steps: int = 10
    size: int = 128
    repeat: int = 5
    concurrency: int = 4
    requests: int = 16
    seed: int = 0


def _png(size: int, seed: int) -> bytes:
    from .bench import test_image

    buf = io.BytesIO()
    test_image(size, seed).save(buf, format="PNG")
    return buf.getvalue()


def _one_at_a_time(port: int, image: bytes, cfg: RayBenchConfig) -> list[float]:
    from fpedit.server.client import EditClient, edit_options

    times = []
    with EditClient(f"127.0.0.1:{port}", timeout=600) as client:
        client.edit("warm up", image=image, options=edit_options(steps=cfg.steps))
        for i in range(cfg.repeat):
            start = time.perf_counter()
            client.edit(f"a photo {i}", image=image, options=edit_options(steps=cfg.steps))
            times.append((time.perf_counter() - start) * 1e3)
    return times


def _throughput(port: int, image: bytes, cfg: RayBenchConfig) -> dict[str, Any]:
    from fpedit.server.client import EditClient, edit_options

    served: Counter[str] = Counter()
    with EditClient(f"127.0.0.1:{port}", timeout=600) as client:

        def one(i: int) -> None:
            response = client.edit(f"a photo {i}", image=image, options=edit_options(steps=cfg.steps))
            served[response.stats.replica or "standalone"] += 1

        one(-1)  # warm up
        served.clear()
        start = time.perf_counter()
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            list(pool.map(one, range(cfg.requests)))
        wall = time.perf_counter() - start
    return {
        "edits_per_s": cfg.requests / wall,
        "wall_s": wall,
        "per_replica": sorted(served.values(), reverse=True),
    }


def run_ray_bench(cfg: RayBenchConfig) -> dict[str, Any]:
    import ray
    import torch

    from fpedit.engine import EditEngine
    from fpedit.engine.config import EngineConfig
    from fpedit.server.app import build_server
    from fpedit.server.config import ServerConfig
    from fpedit.server.ray_app import RayService, ReplicaSettings, replica_server_config

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    image = _png(cfg.size, cfg.seed)
    front_config = ServerConfig(port=0, workers=1, max_queue=64)
    report: dict[str, Any] = {"config": asdict(cfg), "machine": machine_facts(), "throughput": {}}
    try:
        replica_threads = 1
        for replicas in (1, 2):
            settings = ReplicaSettings(
                engine=EngineConfig(model=cfg.model, device=cfg.device, backend="torch", batching=True),
                server=replica_server_config(front_config, max_ongoing_requests=8, batching=True),
            )
            service = RayService.start(
                settings,
                replicas=replicas,
                # One CPU each: two replicas share this machine's cores as two engines would share GPUs.
                ray_actor_options={"num_cpus": max(1, cpus // 2)},
            )
            front = build_server(service.runner, front_config)
            try:
                if replicas == 1:
                    report["ray_one_edit_ms"] = _one_at_a_time(front.port, image, cfg)
                    replica_threads = int(service.runner.replica_stats()[0].get("torch_threads") or 1)
                report["throughput"][str(replicas)] = _throughput(front.port, image, cfg)
            finally:
                front.drain(5)
                service.close()
        torch.set_num_threads(replica_threads)  # the standalone engine on the replica's thread count
        engine = EditEngine.from_pretrained(cfg.model, device=cfg.device)
        standalone = build_server(engine, front_config)
        try:
            report["standalone_one_edit_ms"] = _one_at_a_time(standalone.port, image, cfg)
        finally:
            standalone.drain(5)
        report["engine_threads"] = replica_threads
    finally:
        ray.shutdown()
    ray_ms = statistics.median(report["ray_one_edit_ms"])
    local_ms = statistics.median(report["standalone_one_edit_ms"])
    report["added_latency_ms"] = ray_ms - local_ms
    one, two = (report["throughput"][k]["edits_per_s"] for k in ("1", "2"))
    report["scaling_2_over_1"] = two / one
    return report


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    t = report["throughput"]
    rows = [
        f"Ray Serve path, {cfg['model']} on {cfg['device']}, {cfg['size']} px, {cfg['steps']} steps, "
        f"{cfg['requests']} real edits from {cfg['concurrency']} clients "
        f"({report['machine'].get('cpu_count', '?')} CPUs):",
        "",
        "| | edits/s | edits per replica |",
        "| --- | --- | --- |",
        *(f"| {n} replica(s) | {t[n]['edits_per_s']:.2f} | {t[n]['per_replica']} |" for n in ("1", "2")),
        "",
        f"2 replicas / 1 replica: {report['scaling_2_over_1']:.2f}x",
        "",
        f"One edit at a time (median of {cfg['repeat']}, engine on {report['engine_threads']} thread(s)): "
        f"standalone {statistics.median(report['standalone_one_edit_ms']):.1f} ms, "
        f"Ray front {statistics.median(report['ray_one_edit_ms']):.1f} ms, "
        f"added {report['added_latency_ms']:.1f} ms",
    ]
    return "\n".join(rows)


def write_outputs(report: dict[str, Any], json_path: Path) -> list[Path]:
    """The report as JSON and as the Markdown table beside it."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md = json_path.with_suffix(".md")
    md.write_text(markdown(report) + "\n")
    return [json_path, md]
