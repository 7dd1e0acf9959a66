"""What the front knows about the service behind it: live replicas and the shared store, probed in the
background so that health checks, ``/readyz`` and metrics scrapes answer from memory and never wait on Ray.

Why: a front that says SERVING while no replica is alive or the store is gone sends every client into
failing calls and keeps load balancers pointing at it. The probe runs on its own thread every ``period_s``;
if it stops reporting (a control-plane call that hangs) the view goes stale and counts as not serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from .store import StoreClient, StoreUnreachable

log = logging.getLogger("fpedit.server")

#: How often the front probes its replicas and the store.
WATCH_PERIOD_S = 1.0
#: A view older than this many periods means the probe itself is stuck: not serving.
STALE_PERIODS = 10


@dataclass(frozen=True)
class ServiceView:
    """One probe's outcome; ``problem`` is empty when the service can serve."""

    replicas_alive: int
    store_reachable: bool
    store_restarts: int
    store_node_id: str
    problem: str
    checked_at: float  # time.monotonic() of the probe


def count_running_replicas(app_name: str, deployment_name: str) -> int:
    """Replicas Serve's controller reports RUNNING (dead ones leave this count once Serve's health check or
    Ray's node failure detection has noticed them)."""
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is None:
        return 0
    deployment = application.deployments.get(deployment_name)
    if deployment is None:
        return 0
    return int(deployment.replica_states.get("RUNNING", 0))


class ServiceWatch:
    """Probes replicas and store every ``period_s`` on a daemon thread; :meth:`readiness` reads the last view."""

    def __init__(
        self, app_name: str, deployment_name: str, store: StoreClient, period_s: float = WATCH_PERIOD_S
    ) -> None:
        self.app_name, self.deployment_name, self.store, self.period_s = (
            app_name,
            deployment_name,
            store,
            period_s,
        )
        self._incarnation: str | None = None
        self._restarts = 0
        self._stop = threading.Event()
        self._view = self._probe()  # the first view before anyone asks
        if self._view.problem:
            log.warning("service not serving yet: %s", self._view.problem)
        self._thread = threading.Thread(target=self._run, name="fpedit-ray-watch", daemon=True)
        self._thread.start()

    def _probe(self) -> ServiceView:
        problems = []
        try:
            alive = count_running_replicas(self.app_name, self.deployment_name)
        except Exception as exc:  # the controller is restarting: no figure this time
            log.debug("serve.status failed: %r", exc)
            alive = 0
        if alive == 0:
            problems.append("no live replica")
        node_id, reachable = "", True
        try:
            pong = self.store.ping()
        except StoreUnreachable as exc:
            reachable = False
            problems.append(str(exc))
        else:
            node_id = pong["node_id"]
            if self._incarnation is not None and pong["incarnation"] != self._incarnation:
                self._restarts += 1
                log.warning(
                    "the shared inversion store restarted: the inversions it held in memory are lost "
                    "(with --state-dir they are read back from it)"
                )
            self._incarnation = pong["incarnation"]
        return ServiceView(alive, reachable, self._restarts, node_id, "; ".join(problems), time.monotonic())

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            view = self._probe()
            if view.problem != self._view.problem:
                log.warning("service %s", f"not serving: {view.problem}" if view.problem else "serving again")
            self._view = view

    @property
    def view(self) -> ServiceView:
        return self._view

    def readiness(self) -> tuple[bool, str]:
        """(can serve, why not). A view older than STALE_PERIODS periods: the probe is stuck."""
        view = self._view
        if time.monotonic() - view.checked_at > STALE_PERIODS * self.period_s + self.store.timeout_s:
            return False, "the service probe stopped answering"
        return not view.problem, view.problem

    def metric_families(self) -> list[Any]:
        """Prometheus families: replicas alive (gauge), store restarts (counter), store reachable (gauge)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        view = self._view
        return [
            GaugeMetricFamily(
                "fpedit_ray_replicas_alive",
                "Engine replicas Serve reports running.",
                value=view.replicas_alive,
            ),
            CounterMetricFamily(
                "fpedit_ray_store_restarts",
                "Restarts of the shared inversion store seen by this front (each loses the records it held in "
                "memory; with --state-dir they are read back from it).",
                value=view.store_restarts,
            ),
            GaugeMetricFamily(
                "fpedit_ray_store_reachable",
                "1 when the shared inversion store answered the last probe.",
                value=int(view.store_reachable),
            ),
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.period_s + self.store.timeout_s + 5)
