"""One server process's limits and security settings (``fpedit serve`` options), checked before start-up."""

from __future__ import annotations

from dataclasses import dataclass

from fpedit.engine.errors import InvalidInputError
from fpedit.engine.options import DEFAULT_MAX_PROMPT_CHARS

LOG_FORMATS = ("text", "json")


@dataclass
class ServerConfig:
    """Limits and security of one server process; field names match the CLI flags (``--max-queue``...)."""

    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 1
    max_queue: int = 8
    max_message_bytes: int = 32 * 1024 * 1024
    cache_bytes: int = 4 * 1024**3
    cache_ttl_s: float = 3600.0
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    grace_s: float = 30.0
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    metrics_host: str | None = None  # default: the gRPC host
    log_format: str = "text"
    #: CPU intra-op threads of the engine (torch's, process-wide). None: all cores with batching (one device
    #: loop computes every merged call), else cores // workers so that concurrent requests share the cores
    #: instead of each spinning up every OpenMP thread (workers x threads <= cores).
    threads_per_worker: int | None = None

    def validate(self) -> ServerConfig:
        """Raise :class:`InvalidInputError` naming the flag of the first unusable setting."""
        checks = [
            ("port", 0 <= self.port <= 65535, "must be in 0..65535 (0 picks a free port)"),
            ("workers", self.workers >= 1, "must be at least 1"),
            ("max-queue", self.max_queue >= 0, "must be 0 or more"),
            ("max-message-mb", self.max_message_bytes >= 1024 * 1024, "must be at least 1"),
            ("cache-gib", self.cache_bytes >= 0, "must be 0 or more"),
            ("cache-ttl-s", self.cache_ttl_s > 0, "must be positive"),
            ("max-image-pixels", self.max_image_pixels >= 64 * 64, "must be at least 4096 (64x64)"),
            ("max-prompt-chars", self.max_prompt_chars >= 1, "must be at least 1"),
            ("grace-s", self.grace_s >= 0, "must be 0 or more"),
            (
                "metrics-port",
                self.metrics_port is None or 0 <= self.metrics_port <= 65535,
                "must be in 0..65535",
            ),
            ("log-format", self.log_format in LOG_FORMATS, f"must be one of {LOG_FORMATS}"),
            ("tls", bool(self.tls_cert) == bool(self.tls_key), "give both --tls-cert and --tls-key"),
            (
                "threads-per-worker",
                self.threads_per_worker is None or self.threads_per_worker >= 1,
                "must be at least 1",
            ),
        ]
        for flag, ok, message in checks:
            if not ok:
                raise InvalidInputError(flag, message)
        return self
