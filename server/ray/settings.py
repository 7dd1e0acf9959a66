"""What every replica needs to build its engine and runner, sent to the replicas by value; and the same
settings read from a config file's ``fpedit serve`` flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fpedit.engine.config import EngineConfig

from ..config import ServerConfig
from .store import DEFAULT_STORE_BYTES, DEFAULT_STORE_TTL_S, STORE_NAME, STORE_NAMESPACE

#: Requests one replica takes at once. With the batching engine, concurrent requests share UNet calls, so
#: this is what lets batches form (the engine's max_batch rows, 8 by default, hold a few requests' rows).
DEFAULT_MAX_ONGOING_REQUESTS = 8
#: Inversion ids a replica advertises as held (Serve's multiplexing LRU); the bytes are bounded by the
#: replica's inversion cache (``--cache-gib``) and the shared store (``store_gib``).
DEFAULT_MAX_INVERSIONS_PER_REPLICA = 64
# --- settings -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica needs to build its engine and runner (sent to the replicas by value)."""

    #: The engine every replica loads (pickled to them; ``batching`` on lets a replica's requests merge).
    engine: EngineConfig
    #: Limits of each replica's runner (workers, queue, inversion cache, image and prompt limits).
    server: ServerConfig = field(default_factory=ServerConfig)
    max_inversions: int = DEFAULT_MAX_INVERSIONS_PER_REPLICA
    store_name: str = STORE_NAME
    store_namespace: str = STORE_NAMESPACE
    store_bytes: int = DEFAULT_STORE_BYTES
    store_ttl_s: float = DEFAULT_STORE_TTL_S


def replica_server_config(front: ServerConfig, max_ongoing_requests: int, batching: bool) -> ServerConfig:
    """The replica runner's limits: Serve admits at most ``max_ongoing_requests`` per replica, so the runner
    queue never refuses; with batching every admitted request runs at once so their UNet calls merge."""
    workers = max(front.workers, max_ongoing_requests) if batching else front.workers
    return dataclasses.replace(
        front, host="127.0.0.1", port=0, token=None, tls_cert=None, tls_key=None, metrics_port=None,
        workers=workers, max_queue=max_ongoing_requests,
    )  # fmt: skip


def replica_settings(front: ServerConfig, engine: EngineConfig) -> ReplicaSettings:
    """What the replicas of a front with ``front``'s limits are built from: their runner's limits
    (:func:`replica_server_config`) and ``engine`` with those limits as its own (``serving_engine_config``).
    The one place ``fpedit serve --ray`` and a Ray Serve config file both build it."""
    from ..runner import serving_engine_config

    server = replica_server_config(front, DEFAULT_MAX_ONGOING_REQUESTS, batching=engine.batching)
    return ReplicaSettings(engine=serving_engine_config(engine, server), server=server)


def build_engine(settings: ReplicaSettings) -> Any:
    """A replica's engine, loaded as every command loads one (one log line, libraries quiet)."""
    from fpedit.engine.flags import engine_from_config

    return engine_from_config(settings.engine)


def settings_from_flags(flags: dict[str, Any]) -> tuple[ServerConfig, ReplicaSettings]:
    """The front's config and the replicas' settings from ``fpedit serve`` flags given as a mapping (a config
    file's ``args``: ``{model: /models/sd15, device: cuda, port: 50051, cache-gib: 8}``), read by the
    flags' owners (:mod:`fpedit.server.config`, :mod:`fpedit.engine.flags`), not the command line."""
    from fpedit.engine.flags import engine_config_from_args

    from ..config import serve_args_from_mapping, server_config_from_args

    args = serve_args_from_mapping(flags)
    config = server_config_from_args(args)
    return config, replica_settings(config, engine_config_from_args(args, batching=args.batching))
