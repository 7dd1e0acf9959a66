"""Job figures for ``/metrics``, read from the table at scrape time (no polling): ``fpedit_jobs{state}``,
``fpedit_job_queue_age_seconds`` (the oldest queued job's wait) and
``fpedit_webhook_deliveries_total{outcome}`` (one per attempt)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .manager import JobManager
from .webhooks import OUTCOMES


class JobsCollector(Collector):
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("fpedit_jobs", "Jobs in the table by state.", labels=["state"])
        for state, count in self.manager.counts().items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            "fpedit_job_queue_age_seconds",
            "How long the oldest queued job has waited (0 when none waits).",
            value=self.manager.queue_age_s(),
        )
        deliveries = CounterMetricFamily(
            "fpedit_webhook_deliveries", "Webhook delivery attempts by outcome.", labels=["outcome"]
        )
        counted = dict(self.manager.deliveries)
        for outcome in OUTCOMES:
            deliveries.add_metric([outcome], counted.get(outcome, 0))
        yield deliveries
