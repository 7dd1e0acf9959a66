"""Scale out on Ray Serve: fpedit's own gRPC front over a Serve deployment of engine replicas.

Why this shape: clients keep ``fpedit.v1.EditService`` exactly as the standalone server speaks it -- the
``grpc.health.v1`` service, reflection, the bearer-token interceptor, TLS, the status codes and the drain
all come from ``app.build_server``. Ray Serve's own gRPC proxy has none of those (no health service, no
server interceptors or TLS of ours), so the front is fpedit's server with a :class:`RayRunner` in place of
the in-process runner; the runner calls Serve deployment handles.

- :class:`EditReplica` is the deployment: one engine per replica (one GPU each with
  ``ray_actor_options={"num_gpus": 1}``), wrapping a :class:`~fpedit.server.runner.LocalRunner` (worker pool,
  inversion cache) over an engine with the batching device loop (``--no-batching`` turns it off).
- **Affinity** is Serve model multiplexing with the inversion id as the multiplexed model id. The front makes
  the id of a new inversion itself (Invert, or Edit with an image) and sends that call with
  ``multiplexed_model_id=id``, so the replica that inverts becomes the id's holder and Serve routes later
  edits by that id to it.
- **Never required for correctness**: every new inversion is also put in the shared
  :mod:`~fpedit.server.ray.store` (bounded by bytes and age). A replica asked for an id it does not hold
  (holder scaled down, restarted, evicted) rebuilds the inversion from the store; the first edit recomputes
  the source maps from the trajectory, so the result is the same as on the holder.
- **Node loss**: the store is pinned to the front's node and restarted by Ray, every call to it has a
  timeout, and a :class:`~fpedit.server.ray.watch.ServiceWatch` on the front probes live replicas and the
  store, so health and ``/readyz`` say NOT_SERVING when nothing can serve (docs/design.md §10).
- Errors cross the Ray boundary by value (:class:`ReplicaError`) and come back out of the runner as the same
  fpedit errors a :class:`~fpedit.server.runner.LocalRunner` raises, so the servicer maps them to the same
  status codes. A full Serve queue (``max_queued_requests``) is RESOURCE_EXHAUSTED; a replica that dies
  mid-request is UNAVAILABLE (retry).

Modules: :mod:`.install` (is the extra there), :mod:`.settings` (what replicas are built from),
:mod:`.errors` (errors across the boundary), :mod:`.replica` (the deployment), :mod:`.front` (the front's
runner), :mod:`.deployment` (assembling and running the application), :mod:`.store` (the shared inversion
store), :mod:`.watch` (what the front knows of its replicas and store). Nothing here imports Ray at import time: ``require_ray`` answers in one line when it is missing.
"""

from __future__ import annotations

from .deployment import (
    APP_NAME,
    CLOSE_TIMEOUT_S,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEPLOYMENT_NAME,
    GrpcFront,
    RayService,
    build_app,
    replica_actor_options,
    replica_deployment,
    serve_on_ray,
)
from .errors import ReplicaError
from .front import CANCEL_POLL_S, RayRunner, sum_replica_stats
from .install import RAY_MISSING, require_ray
from .replica import EditReplica
from .settings import (
    DEFAULT_MAX_INVERSIONS_PER_REPLICA,
    DEFAULT_MAX_ONGOING_REQUESTS,
    ReplicaSettings,
    build_engine,
    replica_server_config,
    replica_settings,
    settings_from_flags,
)

__all__ = [
    "APP_NAME",
    "CANCEL_POLL_S",
    "CLOSE_TIMEOUT_S",
    "DEFAULT_MAX_INVERSIONS_PER_REPLICA",
    "DEFAULT_MAX_ONGOING_REQUESTS",
    "DEFAULT_MAX_QUEUED_REQUESTS",
    "DEPLOYMENT_NAME",
    "RAY_MISSING",
    "EditReplica",
    "GrpcFront",
    "RayRunner",
    "RayService",
    "ReplicaError",
    "ReplicaSettings",
    "build_app",
    "build_engine",
    "replica_actor_options",
    "replica_deployment",
    "replica_server_config",
    "replica_settings",
    "require_ray",
    "serve_on_ray",
    "settings_from_flags",
    "sum_replica_stats",
]
