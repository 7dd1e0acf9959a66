"""One server process's limits and security settings and the ``fpedit serve`` flags that set them (one
definition per field), checked before start-up."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fpedit.engine.adapters import ADAPTER_BATCHING, DEFAULT_ADAPTER_BATCHING
from fpedit.engine.errors import InvalidInputError
from fpedit.engine.flags import (
    add_config_arguments,
    add_model_arguments,
    config_values_from_args,
    flag,
    flag_name,
)
from fpedit.engine.options import DEFAULT_MAX_PROMPT_CHARS

LOG_FORMATS = ("text", "json")
#: Requests in flight on one engine when batching is on: enough for the device loop to fill batches of
#: 2-row target steps and 8-row capture calls without holding many requests' activations at once.
DEFAULT_BATCHING_WORKERS = 4
#: The variable a bearer token is read from when --token is left out (server and client).
TOKEN_ENV = "FPEDIT_TOKEN"


@dataclass
class ServerConfig:
    """Limits and security of one server process. Each field carries its ``fpedit serve`` flag (name, help,
    parser): the field's default is the flag's, and error messages name the flag (``--max-message-mb``)."""

    host: str = field(default="127.0.0.1", metadata=flag("bind address (default loopback)"))
    port: int = field(
        default=50051, metadata=flag("gRPC port (default {default}; 0 picks a free one)", type=int)
    )
    workers: int = field(
        default=1,
        metadata=flag(
            f"requests the engine runs at once (default: {DEFAULT_BATCHING_WORKERS} with batching, whose "
            "device loop merges their UNet calls; {default} without)",
            type=int,
            unset=True,  # settled by --batching (server_config_from_args)
        ),
    )
    #: CPU intra-op threads of the engine (torch's, process-wide). None: all cores with batching (one device
    #: loop computes every merged call), else cores // workers so that concurrent requests share the cores
    #: instead of each spinning up every OpenMP thread (workers x threads <= cores).
    threads_per_worker: int | None = field(
        default=None,
        metadata=flag(
            "CPU: torch intra-op threads (default: all cores with batching, else cores // --workers)",
            type=int,
        ),
    )
    max_queue: int = field(
        default=8,
        metadata=flag("requests that may wait; more get RESOURCE_EXHAUSTED (default {default})", type=int),
    )
    max_message_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata=flag(
            "largest request or response message (default {default} MiB)",
            type=int,
            name="max-message-mb",
            unit=1024**2,
        ),
    )
    cache_bytes: int = field(
        default=4 * 1024**3,
        metadata=flag(
            "inversion cache budget (default {default:g} GiB)", type=float, name="cache-gib", unit=1024**3
        ),
    )
    cache_ttl_s: float = field(
        default=3600.0,
        metadata=flag("an unused inversion expires after this (default {default:g} s)", type=float),
    )
    max_image_pixels: int = field(
        default=4096 * 4096,
        metadata=flag("larger images get INVALID_ARGUMENT (default {default})", type=int),
    )
    max_prompt_chars: int = field(
        default=DEFAULT_MAX_PROMPT_CHARS,
        metadata=flag("longer prompts get INVALID_ARGUMENT (default {default})", type=int),
    )
    token: str | None = field(
        default=None,
        metadata=flag("require 'authorization: Bearer TOKEN' (default: $FPEDIT_TOKEN, else no token)"),
    )
    tls_cert: str | None = field(
        default=None, metadata=flag("PEM certificate chain (default: plaintext; needs --tls-key)")
    )
    tls_key: str | None = field(
        default=None, metadata=flag("PEM private key of --tls-cert, unencrypted (default: none)")
    )
    grace_s: float = field(
        default=30.0, metadata=flag("drain time on SIGTERM, in seconds (default {default:g})", type=float)
    )
    #: None: no metrics endpoint; 0 picks a free port.
    metrics_port: int | None = field(
        default=None,
        metadata=flag("serve Prometheus metrics at http://HOST:PORT/metrics (default: off)", type=int),
    )
    metrics_host: str | None = field(default=None, metadata=flag("metrics bind address (default: --host)"))
    #: None: no HTTP/JSON front; 0 picks a free port.
    http_port: int | None = field(
        default=None,
        metadata=flag(
            "also serve HTTP/JSON and the editor page at http://HOST:PORT/ (default: off; 0 picks a port)",
            type=int,
        ),
    )
    http_host: str | None = field(default=None, metadata=flag("HTTP bind address (default: --host)"))
    log_format: str = field(
        default="text",
        metadata=flag("json: one object per request (default {default})", choices=LOG_FORMATS),
    )

    def validate(self) -> ServerConfig:
        """Raise :class:`InvalidInputError` naming the flag of the first unusable setting."""
        checks = [
            ("port", 0 <= self.port <= 65535, "must be in 0..65535 (0 picks a free port)"),
            ("workers", self.workers >= 1, "must be at least 1"),
            ("max_queue", self.max_queue >= 0, "must be 0 or more"),
            ("max_message_bytes", self.max_message_bytes >= 1024 * 1024, "must be at least 1"),
            ("cache_bytes", self.cache_bytes >= 0, "must be 0 or more"),
            ("cache_ttl_s", self.cache_ttl_s > 0, "must be positive"),
            ("max_image_pixels", self.max_image_pixels >= 64 * 64, "must be at least 4096 (64x64)"),
            ("max_prompt_chars", self.max_prompt_chars >= 1, "must be at least 1"),
            ("grace_s", self.grace_s >= 0, "must be 0 or more"),
            (
                "metrics_port",
                self.metrics_port is None or 0 <= self.metrics_port <= 65535,
                "must be in 0..65535",
            ),
            (
                "http_port",
                self.http_port is None or 0 <= self.http_port <= 65535,
                "must be in 0..65535 (0 picks a free port)",
            ),
            ("log_format", self.log_format in LOG_FORMATS, f"must be one of {LOG_FORMATS}"),
            ("tls_key", bool(self.tls_key) or not self.tls_cert, "--tls-cert needs --tls-key as well"),
            ("tls_cert", bool(self.tls_cert) or not self.tls_key, "--tls-key needs --tls-cert as well"),
            (
                "threads_per_worker",
                self.threads_per_worker is None or self.threads_per_worker >= 1,
                "must be at least 1",
            ),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidInputError(flag_name(ServerConfig, name), message)
        return self


# --- `fpedit serve` flags -------------------------------------------------------------------------------------


def bearer_token(given: str | None) -> str | None:
    """``--token``, else ``$FPEDIT_TOKEN``, else none (``fpedit serve`` and ``fpedit client``)."""
    return given or os.environ.get(TOKEN_ENV) or None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``fpedit serve``'s flags: the model's (:mod:`fpedit.engine.flags`), then :class:`ServerConfig`'s own
    fields, then Ray's. Read by the command line and by a Ray Serve config file's ``args`` alike."""
    add_model_arguments(parser)
    add_config_arguments(parser, ServerConfig)
    parser.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="merge the UNet calls of concurrent requests into shared backend calls (default: on)",
    )
    parser.add_argument(
        "--adapter-batching",
        choices=ADAPTER_BATCHING,
        default=DEFAULT_ADAPTER_BATCHING,
        help="with --batching and --lora-dir: 'mix' lets requests of different adapter sets share a UNet call "
        "(a scale per row; calls of one set are still preferred), 'group' runs only requests of one set "
        "together, 'auto' is group where CUDA graphs replay and mix elsewhere "
        f"(default {DEFAULT_ADAPTER_BATCHING})",
    )
    ray = parser.add_argument_group("scale out on Ray Serve (pip install 'fpedit[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run the engines as Ray Serve replicas (one per GPU on CUDA) behind this gRPC front",
    )
    ray.add_argument("--replicas", type=int, help="with --ray: engine replicas (default 1)")
    ray.add_argument(
        "--ray-address",
        help="with --ray: join this Ray cluster (auto, or HEAD:6379; run on one of its nodes); default: start one",
    )
    # Start-up errors name the flag as typed (`--workers: must be at least 1`): config fields are flag names.
    flags = {
        option[2:]: option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    parser.set_defaults(flags=flags)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The validated :class:`ServerConfig` of ``fpedit serve`` flags (also read by the Ray Serve config file)."""
    values = config_values_from_args(args, ServerConfig)
    values["token"] = bearer_token(args.token)
    if "workers" not in values:
        values["workers"] = DEFAULT_BATCHING_WORKERS if args.batching else ServerConfig.workers
    return ServerConfig(**values).validate()  # before the model loads: a bad flag fails in a second


class _FlagError(Exception):
    """argparse's complaint about flags given as a mapping (raised instead of exiting the process)."""


class _MappingParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _FlagError(message)


def serve_args_from_mapping(flags: dict[str, Any]) -> argparse.Namespace:
    """``fpedit serve`` flags given as a mapping (a Ray Serve config file's ``args``: ``{model: /models/sd15,
    device: cuda, cache-gib: 8}``), judged by the same parser as the command line."""
    argv: list[str] = []
    for key, value in flags.items():
        name = "--" + str(key).replace("_", "-")
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is True:
                argv.append(name)
            elif item is not False and item is not None:
                argv += [name, str(item)]
    parser = _MappingParser(prog="fpedit serve")
    add_serve_arguments(parser)
    try:
        return parser.parse_args(argv)
    except _FlagError as exc:
        raise InvalidInputError("args", f"not valid `fpedit serve` flags: {argv} ({exc})") from None


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
        named = port_flag if exc.errno == errno.EACCES else host_flag
        raise InvalidInputError(named, f"cannot bind {host}:{port}: {reason}")


def _no_password() -> bytes:
    """Never prompt on the terminal for a key's passphrase (OpenSSL would): an encrypted key is refused."""
    raise ValueError("encrypted")


def check_tls_pair(cert: str, key: str) -> None:
    """Refuse an unreadable file, a file that is not PEM, swapped files and a key that is not the
    certificate's, each said as what it is."""
    pems: dict[str, bytes] = {}
    for name, path in (("tls-key", key), ("tls-cert", cert)):
        try:
            pems[name] = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidInputError(name, f"cannot read {path}: {exc.strerror or exc}") from None
    for name, path in (("tls-cert", cert), ("tls-key", key)):
        if b"-----BEGIN" not in pems[name]:
            raise InvalidInputError(name, f"{path} is not a PEM file")
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
