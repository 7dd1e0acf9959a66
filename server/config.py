"""One server process's limits and security settings (``fpedit serve`` options), checked before start-up."""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

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
    http_port: int | None = None  # None: no HTTP/JSON front; 0 picks a free port
    http_host: str | None = None  # default: the gRPC host
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
            (
                "http-port",
                self.http_port is None or 0 <= self.http_port <= 65535,
                "must be in 0..65535 (0 picks a free port)",
            ),
            ("log-format", self.log_format in LOG_FORMATS, f"must be one of {LOG_FORMATS}"),
            ("tls-key", bool(self.tls_key) or not self.tls_cert, "--tls-cert needs --tls-key as well"),
            ("tls-cert", bool(self.tls_cert) or not self.tls_key, "--tls-key needs --tls-cert as well"),
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


def check_can_start(config: ServerConfig) -> None:
    """What would otherwise fail only after the model loaded, each named by its flag: the TLS pair, whether
    the host resolves and whether the gRPC, metrics and HTTP ports are free. (A port can still be taken
    between this check and the bind; the server then reports that itself.)"""
    if config.tls_cert and config.tls_key:
        check_tls_pair(config.tls_cert, config.tls_key)
    check_bindable(config.host, config.port, "host", "port")
    for front, port, host in (
        ("metrics", config.metrics_port, config.metrics_host),
        ("http", config.http_port, config.http_host),
    ):
        if port is not None:  # each front binds its own host when given, else --host
            check_bindable(host or config.host, port, f"{front}-host" if host else "host", f"{front}-port")


def check_bindable(host: str, port: int, host_flag: str, port_flag: str) -> None:
    """Refuse a host that does not resolve or is not this machine's, and a port something already uses."""
    name = host.strip("[]")  # gRPC takes "[::]"; the socket API takes "::"
    try:
        addresses = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidInputError(
            host_flag, f"cannot bind {host}:{port}: {host} does not resolve ({reason})"
        ) from None
    failures: list[OSError] = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own bind
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise InvalidInputError(
                        port_flag, f"cannot bind {host}:{port}: the port is in use by another process"
                    ) from None
                failures.append(exc)
    if failures and len(failures) == len(addresses):
        exc = failures[0]
        if exc.errno == errno.EADDRNOTAVAIL:
            reason = f"{host} is not an address of this machine"
        elif exc.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need privileges)"
        else:
            reason = exc.strerror or str(exc)
        flag = port_flag if exc.errno == errno.EACCES else host_flag
        raise InvalidInputError(flag, f"cannot bind {host}:{port}: {reason}")


def _no_password() -> bytes:
    """Never prompt on the terminal for a key's passphrase (OpenSSL would): an encrypted key is refused."""
    raise ValueError("encrypted")


def check_tls_pair(cert: str, key: str) -> None:
    """Refuse an unreadable file, a file that is not PEM, swapped files and a key that is not the
    certificate's, each said as what it is."""
    pems: dict[str, bytes] = {}
    for flag, path in (("tls-key", key), ("tls-cert", cert)):
        try:
            pems[flag] = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidInputError(flag, f"cannot read {path}: {exc.strerror or exc}") from None
    for flag, path in (("tls-cert", cert), ("tls-key", key)):
        if b"-----BEGIN" not in pems[flag]:
            raise InvalidInputError(flag, f"{path} is not a PEM file")
    cert_pem, key_pem = pems["tls-cert"], pems["tls-key"]
    if b"CERTIFICATE-----" not in cert_pem:
        hint = " (are --tls-cert and --tls-key swapped?)" if b"PRIVATE KEY-----" in cert_pem else ""
        raise InvalidInputError("tls-cert", f"{cert} holds no certificate{hint}")
    if b"PRIVATE KEY-----" not in key_pem:
        hint = " (are --tls-cert and --tls-key swapped?)" if b"CERTIFICATE-----" in key_pem else ""
        raise InvalidInputError("tls-key", f"{key} holds no private key{hint}")
    if b"ENCRYPTED" in key_pem:
        raise InvalidInputError("tls-key", f"{key} is encrypted; the server needs an unencrypted PEM key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}"
        if "KEY_VALUES_MISMATCH" in text or "key values mismatch" in text:
            raise InvalidInputError(
                "tls-key",
                f"{key} is not the private key of the certificate in {cert} (the pair does not match)",
            ) from None
        raise InvalidInputError(
            "tls-cert", f"cannot load the certificate {cert} with the key {key}: {exc.reason or exc}"
        ) from None
    except ValueError:
        raise InvalidInputError(
            "tls-key", f"{key} is encrypted; the server needs an unencrypted PEM key"
        ) from None
