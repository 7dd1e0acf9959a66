"""Assemble and run the gRPC server: EditService, grpc.health.v1, reflection, auth, TLS, graceful drain."""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fpedit.engine import EditEngine
from fpedit.v1 import edit_pb2, edit_pb2_grpc

from .service import EditServicer, ServerConfig

log = logging.getLogger("fpedit.server")

SERVICE_NAME = edit_pb2.DESCRIPTOR.services_by_name["EditService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)"
            )

        self._deny = deny

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return continuation(details)
        metadata = dict(details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: iter(self._deny(req, ctx) or ()),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    servicer: EditServicer
    health: health.HealthServicer

    def drain(self, grace_s: float) -> None:
        """Report NOT_SERVING, stop taking RPCs, let in-flight ones finish (up to ``grace_s``)."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.servicer.pool.shutdown()


def build_server(engine: EditEngine, config: ServerConfig) -> RunningServer:
    """Create, bind and start a server for ``engine``; ``config.port`` 0 picks a free port."""
    servicer = EditServicer(engine, config)
    interceptors = [TokenAuthInterceptor(config.token)] if config.token else []
    # Handler threads only wait on the worker pool; keep enough for the queue plus health checks.
    threads = config.workers + config.max_queue + 8
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fpedit-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=threads,
    )
    edit_pb2_grpc.add_EditServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s on %s:%d (%s)",
        engine.source,
        config.host,
        port,
        "TLS" if config.tls_cert else "plaintext",
    )
    return RunningServer(server, port, servicer, health_servicer)


def serve(engine: EditEngine, config: ServerConfig, ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and return."""
    running = build_server(engine, config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining (grace %.0f s)", signum, config.grace_s)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready:
            ready(running.port)
        stop.wait()
        running.drain(config.grace_s)
        log.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
