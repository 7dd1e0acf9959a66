"""Assemble and run the gRPC server: EditService, grpc.health.v1, reflection, auth, TLS, metrics, drain.

The pieces here do not depend on how requests are executed: ``build_server`` takes any runner (see
:mod:`fpedit.server.runner`), so a Ray Serve front reuses health, reflection, auth, TLS, metrics and drain.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fpedit.engine import EditEngine
from fpedit.engine.errors import InvalidInputError
from fpedit.v1 import edit_pb2

from .config import ServerConfig
from .health import NOT_SERVING, SERVING, HealthServicer, runner_readiness
from .logs import log_request
from .metrics import ServerMetrics
from .runner import LocalRunner, Runner
from .service import TRANSPORT_HEADROOM, EditServicer

log = logging.getLogger("fpedit.server")

SERVICE_NAME = edit_pb2.DESCRIPTOR.services_by_name["EditService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health checks."""

    def __init__(self, token: str, metrics: ServerMetrics | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    def _denier(self, method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        name = method.rsplit("/", 1)[-1]

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            log_request(
                {"method": name, "status": "UNAUTHENTICATED", "peer": context.peer(), "transport": "grpc"}
            )
            if self._metrics is not None:  # token guessing shows in fpedit_requests_total
                self._metrics.observe(name, grpc.StatusCode.UNAUTHENTICATED.name, 0.0, None)
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)"
            )

        return deny

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
        deny = self._denier(details.method)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: iter(deny(req, ctx) or ()),
                request_deserializer=None,  # refuse before parsing: garbage bodies get UNAUTHENTICATED too
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            deny,
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )


#: After the grace period, how long aborted requests get to notice and answer before the port closes.
ABORT_WAIT_S = 10.0
#: How often health follows a runner that can tell whether it can serve (the Ray front's replicas and store).
READINESS_POLL_S = 0.5


def follow_readiness(runner: Any, health: HealthServicer, stop: threading.Event) -> threading.Thread | None:
    """Keep health SERVING/NOT_SERVING as the runner's readiness says, until ``stop`` (the drain, which then
    owns health). Health answers from memory: a probe never waits on the runner."""
    if getattr(runner, "readiness", None) is None:
        return None

    def follow() -> None:
        while not stop.wait(READINESS_POLL_S):
            status = SERVING if runner_readiness(runner)[0] else NOT_SERVING
            for name in ("", SERVICE_NAME):
                health.set(name, status)

    thread = threading.Thread(target=follow, name="fpedit-readiness", daemon=True)
    thread.start()
    return thread


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    servicer: EditServicer
    runner: Runner
    health: HealthServicer
    metrics: ServerMetrics
    metrics_port: int | None = None
    http: Any = None  # the HTTP/JSON front (fpedit.server.http.HttpFront) with --http-port
    jobs: Any = None  # the job manager (fpedit.server.jobs.manager.JobManager)
    readiness_stop: threading.Event = field(default_factory=threading.Event)

    def drain(self, grace_s: float) -> None:
        """Drain: health says NOT_SERVING and new work gets UNAVAILABLE while in-flight work finishes (up to
        ``grace_s``); what still runs then is aborted (UNAVAILABLE, logged as aborted by shutdown)."""
        self.readiness_stop.set()
        self.health.enter_graceful_shutdown()  # the port stays open: probes keep getting answers
        self.servicer.begin_drain()
        if not self.servicer.wait_idle(grace_s):
            log.warning("grace period over: aborting %d in-flight requests", self.servicer.in_flight)
            self.servicer.abort_in_flight()
            self.servicer.wait_idle(ABORT_WAIT_S)
        if self.jobs is not None:  # running jobs get what is left of the grace; queued ones stay queued
            self.jobs.close(grace_s=0 if self.servicer.in_flight else grace_s)
        if self.http is not None:
            self.http.close()
        self.server.stop(1).wait()
        self.runner.close()
        self.metrics.close()


def build_server(
    target: EditEngine | Runner, config: ServerConfig, jobs: Any = None, state: Any = None
) -> RunningServer:
    """Create, bind and start a server over a runner (or an engine, run by a :class:`LocalRunner`).

    ``config.port`` 0 picks a free port. Configuration and bind problems raise :class:`InvalidInputError`
    or :class:`OSError` with a one-line message, before anything is served. ``jobs``: the job settings
    (:class:`~fpedit.server.jobs.config.JobsConfig`; default: in memory, no webhooks); ``state``: the state
    directory already claimed (``fpedit serve`` claims it before the model loads), else claimed here.
    """
    config.validate()
    address = f"{config.host}:{config.port}"
    credentials = _tls_credentials(config) if config.tls_cert else None
    runner: Runner = LocalRunner(target, config) if isinstance(target, EditEngine) else target
    metrics = ServerMetrics(runner.stats, getattr(runner, "metric_families", None))
    servicer = EditServicer(runner, config, metrics)
    interceptors = [TokenAuthInterceptor(config.token, metrics)] if config.token else []
    # Handler threads mostly wait on the runner, and admission control is the runner's (refusals are
    # immediate), so every admitted call has a thread; health runs on its own pool (``health.py``). No
    # gRPC-wide concurrency cap: it would refuse health checks and reflection under load.
    admitted = getattr(runner, "capacity", None) or config.workers + config.max_queue
    threads = admitted + 16
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fpedit-rpc"),
        interceptors=interceptors,
        options=[
            # The servicer judges --max-message-mb itself (logged, counted); gRPC's limit is a backstop.
            ("grpc.max_receive_message_length", config.max_message_bytes * TRANSPORT_HEADROOM),
            ("grpc.max_send_message_length", config.max_message_bytes * TRANSPORT_HEADROOM),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((servicer.rpc_handler(),))
    manager = _start_jobs(runner, servicer, metrics, jobs, state)
    server.add_generic_rpc_handlers((servicer.jobs.rpc_handler(),))
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind ...")
        manager.close()
        runner.close()
        raise OSError(f"cannot bind {address}: the port is in use or the host does not resolve") from exc
    if port == 0:
        manager.close()
        runner.close()
        raise OSError(f"cannot bind {address}: the port is in use or the host does not resolve")
    metrics_port = None
    if config.metrics_port is not None:
        try:
            metrics_port = metrics.serve(config.metrics_host or config.host, config.metrics_port)
        except OSError:
            server.stop(None)
            manager.close()
            runner.close()
            raise
    http = None
    if config.http_port is not None:  # the same servicer: one validation path, queue, cache and metrics
        from .http import start_http_front

        try:
            http = start_http_front(servicer, config)
        except BaseException:
            server.stop(None)
            manager.close()
            runner.close()
            metrics.close()
            raise
    server.start()
    status = SERVING if runner_readiness(runner)[0] else NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)
    readiness_stop = threading.Event()
    follow_readiness(runner, health_servicer, readiness_stop)
    log.info(
        "serving %s on %s:%d (%s)%s",
        getattr(getattr(runner, "engine", None), "source", type(runner).__name__),
        config.host,
        port,
        "TLS" if config.tls_cert else "plaintext",
        f", metrics on http://{config.metrics_host or config.host}:{metrics_port}/metrics"
        if metrics_port is not None
        else "",
    )
    if http is not None:
        log.info("HTTP/JSON front and editor page on %s", http.url)
    return RunningServer(
        server, port, servicer, runner, health_servicer, metrics, metrics_port, http, manager, readiness_stop
    )


def _start_jobs(runner: Runner, servicer: EditServicer, metrics: ServerMetrics, jobs: Any, state: Any) -> Any:
    """The job manager over ``servicer`` (and, with a state directory, the runner's inversions on disk)."""
    from .jobs.config import JobsConfig
    from .jobs.inversions import SavedInversionCache
    from .jobs.manager import JobManager
    from .jobs.metrics import JobsCollector
    from .jobs.service import JobServicer
    from .jobs.state import open_state

    jobs = (jobs or JobsConfig()).validate()
    if state is None:
        state = open_state(jobs.state_dir)
    if state is not None and isinstance(runner, LocalRunner):
        runner.cache = SavedInversionCache(
            runner.engine, state.inversions, runner.config.cache_bytes, runner.config.cache_ttl_s
        )
    manager = JobManager(servicer, jobs, state)
    servicer.jobs = JobServicer(servicer, manager)
    metrics.registry.register(JobsCollector(manager))
    return manager


def _tls_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    pems = []
    for flag, path in (("tls-key", config.tls_key), ("tls-cert", config.tls_cert)):
        try:
            data = Path(str(path)).read_bytes()
        except OSError as exc:
            raise OSError(f"cannot read --{flag} {path}: {exc.strerror or exc}") from exc
        if b"-----BEGIN" not in data:
            raise InvalidInputError(flag, f"{path} is not a PEM file")
        pems.append(data)
    return grpc.ssl_server_credentials([(pems[0], pems[1])])


def serve(
    target: EditEngine | Runner,
    config: ServerConfig,
    ready: Callable[[RunningServer], None] | None = None,
    jobs: Any = None,
    state: Any = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and return."""
    running = build_server(target, config, jobs, state)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining (grace %.0f s)", signum, config.grace_s)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready:
            ready(running)
        stop.wait()
        running.drain(config.grace_s)
        log.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
