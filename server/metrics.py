"""Prometheus metrics of one server, in its own registry (several servers in one process do not collide).

Request-side figures are observed by the servicer from each response's ``Stats``, so they are the same for
any runner; load, cache and device figures are read from ``runner.stats()`` at scrape time. Served over
HTTP at ``/metrics`` by ``fpedit serve --metrics-port``, like Triton's metrics endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fpedit.v1 import edit_pb2 as pb

from .runner import RunnerStats

#: Rows per backend UNet call: the batching device loop merges requests up to the backend's max_batch.
BATCH_ROWS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)

# Edits on CPU take seconds, on a GPU tens of milliseconds: buckets cover both.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _RunnerCollector(Collector):
    """Reads the runner's load and cache figures when scraped (no background polling)."""

    def __init__(self, read: Callable[[], RunnerStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        gauges = [
            ("fpedit_requests_running", "Requests an engine worker is running now.", stats.running),
            ("fpedit_requests_queued", "Requests waiting for an engine worker.", stats.queued),
            (
                "fpedit_inversion_cache_entries",
                "Inversions held by the server-side cache.",
                stats.cache_entries,
            ),
            ("fpedit_inversion_cache_bytes", "Bytes held by the inversion cache.", stats.cache_bytes),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            (
                "fpedit_inversion_cache_hits",
                "Edits by inversion id that found their inversion.",
                stats.cache_hits,
            ),
            (
                "fpedit_inversion_cache_misses",
                "Edits by inversion id whose id was unknown or expired.",
                stats.cache_misses,
            ),
            (
                "fpedit_inversion_cache_evictions",
                "Inversions evicted for the byte budget or expired.",
                stats.cache_evictions,
            ),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "fpedit_backend_unet_calls",
            "Backend UNet calls the engine made (with batching, one call carries rows of several requests).",
            value=stats.backend_calls,
        )
        yield CounterMetricFamily(
            "fpedit_backend_unet_rows", "Rows evaluated by backend UNet calls.", value=stats.backend_rows
        )
        yield _batch_rows_histogram(stats.backend_batch_rows)
        if stats.device_memory_bytes is not None:
            yield GaugeMetricFamily(
                "fpedit_gpu_memory_allocated_bytes",
                "CUDA memory allocated by tensors.",
                stats.device_memory_bytes,
            )


class _FamiliesCollector(Collector):
    """Families a runner builds itself when scraped."""

    def __init__(self, families: Callable[[], list[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families()


def _batch_rows_histogram(calls_by_rows: tuple[tuple[int, int], ...]) -> HistogramMetricFamily:
    """Backend calls by their row count, as a cumulative Prometheus histogram (sum = rows)."""
    buckets = []
    for bound in BATCH_ROWS_BUCKETS:
        buckets.append((str(bound), sum(n for rows, n in calls_by_rows if rows <= bound)))
    buckets.append(("+Inf", sum(n for _, n in calls_by_rows)))
    return HistogramMetricFamily(
        "fpedit_backend_batch_rows",
        "Rows per backend UNet call (batch sizes formed by the batching device loop).",
        buckets=buckets,
        sum_value=sum(rows * n for rows, n in calls_by_rows),
    )


class ServerMetrics:
    """The metrics of one server; :meth:`observe` is called once per finished RPC."""

    def __init__(
        self,
        runner_stats: Callable[[], RunnerStats] | None = None,
        runner_families: Callable[[], list[Metric]] | None = None,
    ) -> None:
        """``runner_families``: further families a runner reports at scrape time (the Ray front's replicas
        alive and store restarts)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fpedit_requests",
            "Finished requests by method, status code and transport (grpc or http).",
            ["method", "code", "transport"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "fpedit_request_duration_seconds",
            "Wall time of a request in the server, by method and transport.",
            ["method", "transport"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "fpedit_queue_wait_seconds",
            "Time a successful request waited for an engine worker.",
            ["method"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.engine_seconds = Histogram(
            "fpedit_engine_seconds",
            "Time a successful request spent in the engine.",
            ["method"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "fpedit_stage_seconds",
            "Time per engine stage (text, vae_encode, inversion, source_capture, denoise, vae_decode...).",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.unet_rows = Counter(
            "fpedit_unet_rows", "UNet batch rows evaluated by successful requests.", ["method"], registry=r
        )
        self.unet_calls = Counter(
            "fpedit_unet_calls", "UNet forward calls made by successful requests.", ["method"], registry=r
        )
        self.in_flight = Gauge(
            "fpedit_requests_in_flight", "EditService RPCs being handled (queued or running).", registry=r
        )
        if runner_stats is not None:
            r.register(_RunnerCollector(runner_stats))
        if runner_families is not None:
            r.register(_FamiliesCollector(runner_families))
        self._http: Any = None

    def observe(
        self, method: str, code: str, seconds: float, stats: pb.Stats | None, transport: str = "grpc"
    ) -> None:
        self.requests.labels(method, code, transport).inc()
        self.request_seconds.labels(method, transport).observe(seconds)
        if stats is None:
            return
        self.queue_seconds.labels(method).observe(stats.queue_ms / 1e3)
        self.engine_seconds.labels(method).observe(stats.engine_ms / 1e3)
        for stage, ms in stats.stages_ms.items():
            self.stage_seconds.labels(stage).observe(ms / 1e3)
        self.unet_rows.labels(method).inc(stats.unet_rows)
        self.unet_calls.labels(method).inc(stats.unet_calls)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP from a daemon thread; returns the bound port (``port`` 0 picks one)."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self._http = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
