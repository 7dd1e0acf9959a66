"""Assembling and running the application: ``fpedit serve --ray`` (:class:`RayService`) and Ray's own
tooling (``serve run`` / ``serve deploy`` with :func:`build_app`, the front as the ingress deployment)."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fpedit.engine.errors import InvalidInputError

from ..config import ServerConfig
from .front import RayRunner
from .install import LOCAL_ONLY_ENV, local_ray_on_loopback, require_ray, starts_local_ray
from .replica import EditReplica
from .settings import DEFAULT_MAX_ONGOING_REQUESTS, ReplicaSettings, settings_from_flags
from .store import StoreClient, open_store
from .watch import ServiceWatch

log = logging.getLogger("fpedit.server")
LOOPBACK = "127.0.0.1"

APP_NAME = "fpedit"
DEPLOYMENT_NAME = "EditReplica"
#: Requests the front lets wait for a replica; beyond that a call gets RESOURCE_EXHAUSTED at once.
DEFAULT_MAX_QUEUED_REQUESTS = 64
#: How long ``fpedit serve --ray`` waits for Ray to delete the application when it stops.
CLOSE_TIMEOUT_S = 30.0
#: How often Serve's controller checks each replica: a replica lost with its node is replaced (and leaves the
#: front's count of live replicas) within about this period after Ray reports the node dead.
DEFAULT_HEALTH_CHECK_PERIOD_S = 2.0

# --- assembling and running the application -----------------------------------------------------------------


def replica_actor_options(device: str, num_cpus: float | None = None) -> dict[str, Any]:
    """One GPU per replica on CUDA (Ray pins it through CUDA_VISIBLE_DEVICES); one CPU per replica else."""
    if device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": 1 if num_cpus is None else num_cpus}
    return {"num_cpus": 1 if num_cpus is None else num_cpus}


def replica_deployment(
    settings: ReplicaSettings,
    *,
    replicas: int | None = None,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
    ray_actor_options: dict[str, Any] | None = None,
    health_check_period_s: float = DEFAULT_HEALTH_CHECK_PERIOD_S,
) -> Any:
    """The bound :class:`EditReplica` deployment (a fixed replica count, or Serve autoscaling)."""
    from ray import serve

    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": ray_actor_options or replica_actor_options(settings.engine.device),
        # A short period finds replicas lost with their node quickly; a long timeout keeps a busy replica
        # (a GPU-second edit, a model loading on a cold node) from being killed for a slow answer.
        "health_check_period_s": health_check_period_s,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": settings.server.grace_s,
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas or 1
    return serve.deployment(EditReplica).options(**options).bind(settings)


def local_node_address(host: str) -> str:
    """The node address of a Ray instance ``fpedit serve --ray`` starts itself: the front's ``--host`` when
    that is one IPv4 address, else loopback (a wildcard, a name or IPv6). A local instance serves this
    machine only, so its agents and object transfers have no reason to listen on an outside address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return LOOPBACK
    if address.version != 4 or address.is_unspecified:
        return LOOPBACK
    return str(address)


@dataclass
class RayService:
    """A deployed application and the front's runner; :meth:`close` deletes what :meth:`start` created."""

    runner: RayRunner
    settings: ReplicaSettings
    app_name: str
    owns_ray: bool

    @classmethod
    def start(
        cls,
        settings: ReplicaSettings,
        *,
        replicas: int | None = None,
        autoscaling: dict[str, Any] | None = None,
        address: str | None = None,
        app_name: str = APP_NAME,
        max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
        max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
        ray_actor_options: dict[str, Any] | None = None,
        ray_init: dict[str, Any] | None = None,
        host: str = LOOPBACK,
        health_check_period_s: float = DEFAULT_HEALTH_CHECK_PERIOD_S,
        inversions_dir: Path | None = None,
    ) -> RayService:
        """Join (``address``) or start a local Ray instance, deploy the replicas, wait until they serve.

        A local instance gets its node address from ``host`` (the front's, see :func:`local_node_address`)
        and no dashboard, so that only what Ray hard-codes listens beyond it. ``inversions_dir`` (the
        ``--state-dir``'s inversions folder): the store keeps its records there too, so that inversion ids
        outlive a restart of the front."""
        import ray
        from ray import serve

        owns_ray = not ray.is_initialized()
        if owns_ray:
            init: dict[str, Any] = {"include_dashboard": False, **(ray_init or {})}
            if starts_local_ray(address):
                if not local_ray_on_loopback():
                    log.warning(
                        "the local Ray instance listens on this machine's outside address: %s is %r, or Ray "
                        "was imported before fpedit set it to 0",
                        LOCAL_ONLY_ENV,
                        os.environ.get(LOCAL_ONLY_ENV),
                    )
                init.setdefault("_node_ip_address", local_node_address(host))
            init_ray(ray, address, init)
        serve.start(proxy_location="Disabled")  # clients reach the gRPC front, never Serve's proxies
        # On this (the front's) node: the store shares the front's failure domain, not a worker's, and can
        # write the front's state directory.
        open_store(
            settings.store_name,
            settings.store_namespace,
            settings.store_bytes,
            settings.store_ttl_s,
            folder=inversions_dir,
        )
        app = replica_deployment(
            settings,
            replicas=replicas,
            autoscaling=autoscaling,
            max_ongoing_requests=max_ongoing_requests,
            max_queued_requests=max_queued_requests,
            ray_actor_options=ray_actor_options,
            health_check_period_s=health_check_period_s,
        )
        handle = serve.run(app, name=app_name, route_prefix=None)
        store = StoreClient(settings.store_name, settings.store_namespace)
        most_replicas = (autoscaling or {}).get("max_replicas", replicas or 1)
        runner = RayRunner(
            handle,
            store,
            max_running=int(most_replicas) * max_ongoing_requests,
            max_queue=max_queued_requests,
            watch=ServiceWatch(app_name, DEPLOYMENT_NAME, store),
        )
        return cls(runner, settings, app_name, owns_ray)

    def close(self) -> None:
        import ray
        from ray import serve

        from .store import close_store

        if self.runner.watch is not None:
            self.runner.watch.close()
        try:
            serve.delete(self.app_name)
        finally:
            close_store(self.settings.store_name, self.settings.store_namespace)
            if self.owns_ray:
                serve.shutdown()
                ray.shutdown()


#: What ``ray.init`` raises when a process of a new local instance did not come up in time (its port file).
RAY_START_TIMEOUT = "Timed out waiting for file"


def init_ray(ray: Any, address: str | None, init: dict[str, Any]) -> None:
    """``ray.init``, with one more try when a *new local* instance's GCS or raylet did not come up in time.

    On a loaded machine Ray's head processes occasionally miss their start-up wait without leaving a log (seen
    once in a test run on 2 busy cores); a second start in a new session comes up. Joining a cluster is never
    retried: a cluster that cannot be reached is the operator's to fix.

    Without an address (and no ``RAY_ADDRESS``) the instance is always a new one (``address="local"``):
    left to ``None``, ``ray.init`` joins whatever cluster ``ray start`` last started on this machine, which is
    not the private, loopback-only instance the docs promise."""
    local = starts_local_ray(address)
    target = "local" if local else address
    try:
        ray.init(address=target, **init)
    except RuntimeError as exc:
        if not local or RAY_START_TIMEOUT not in str(exc):
            raise
        log.warning("the local Ray instance did not start (%s); starting it again", str(exc).splitlines()[0])
        ray.shutdown()
        ray.init(address=target, **init)


def serve_on_ray(
    settings: ReplicaSettings,
    config: ServerConfig,
    *,
    replicas: int | None = None,
    address: str | None = None,
    ready: Callable[[Any], None] | None = None,
    jobs: Any = None,
    state: Any = None,
) -> None:
    """``fpedit serve --ray``: deploy ``replicas`` engine replicas (``settings``, see
    :func:`~.settings.replica_settings`) on Ray Serve, joining the cluster at ``address`` or starting a local
    one, and serve the gRPC front of ``config`` until SIGTERM or SIGINT; then drain the front and delete the
    application. Configs only: the command line's flags are mapped before this is called. ``jobs`` and
    ``state`` (the job settings and the open ``--state-dir``) are the front's: it owns the job table and
    runs each job's call through the replicas, as a synchronous call; the shared store keeps its inversions
    in the state directory too."""
    require_ray(local=starts_local_ray(address))
    replicas = 1 if replicas is None else replicas
    if replicas < 1:
        raise InvalidInputError("replicas", "must be at least 1")
    from ..app import serve
    from ..jobs.state import open_state

    if state is None and jobs is not None:
        state = open_state(jobs.state_dir)  # claimed before Ray starts, as the command line does

    log.info("starting Ray Serve (%s), %d replicas", address or "local Ray instance", replicas)
    service = RayService.start(
        settings,
        replicas=replicas,
        address=address,
        host=config.host,
        max_queued_requests=max(1, config.max_queue),  # --max-queue is the front's queue, as standalone
        inversions_dir=state.inversions if state is not None else None,
    )
    try:
        serve(service.runner, config, ready=ready, jobs=jobs, state=state)
    finally:
        # Bounded: if the Ray instance itself was stopped (a SIGTERM to the whole process group reaches its
        # GCS too), Ray would wait a minute for it before giving up.
        closer = threading.Thread(target=service.close, name="fpedit-ray-close", daemon=True)
        closer.start()
        closer.join(CLOSE_TIMEOUT_S)
        if closer.is_alive():
            log.warning(
                "Ray did not confirm the application's deletion in %.0f s; exiting anyway", CLOSE_TIMEOUT_S
            )


# --- `serve run` / `serve deploy`: the front as the application's ingress deployment -------------------------


class GrpcFront:
    """The ingress of a config-file deployment: fpedit's gRPC server (health, reflection, token, TLS,
    metrics, drain) in one Serve replica, over the :class:`EditReplica` deployment's handle.

    It binds ``--host``/``--port`` on the node it runs on; pin it (``ray_actor_options.resources``) to the
    node your load balancer or Kubernetes Service points at.
    """

    def __init__(self, replicas: Any, config: ServerConfig, settings: ReplicaSettings) -> None:
        from ray import serve

        from ..app import build_server

        self.config = config
        # The store on this replica's node: the front's failure domain (replicas only look it up by name).
        open_store(settings.store_name, settings.store_namespace, settings.store_bytes, settings.store_ttl_s)
        store = StoreClient(settings.store_name, settings.store_namespace)
        self.watch = ServiceWatch(serve.get_replica_context().app_name, DEPLOYMENT_NAME, store)
        self.running = build_server(RayRunner(replicas, store, watch=self.watch), config)
        log.info("fpedit gRPC front on %s:%d over Ray Serve", config.host, self.running.port)

    async def port(self) -> int:
        return self.running.port

    def __del__(self) -> None:
        running = getattr(self, "running", None)
        if running is not None:
            running.drain(self.config.grace_s)
        watch = getattr(self, "watch", None)
        if watch is not None:
            watch.close()


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for Ray's tooling: ``serve run fpedit.server.ray:build_app model=tiny`` or
    ``import_path: fpedit.server.ray:build_app`` in a config file (``deploy/ray-serve.yaml``); the
    config file's ``deployments`` section sets replicas, autoscaling and resources."""
    from ray import serve

    config, settings = settings_from_flags(dict(args))
    replicas = replica_deployment(settings)
    front = serve.deployment(GrpcFront).options(
        name="GrpcFront", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100
    )
    return front.bind(replicas, config, settings)
