"""Signed webhook delivery: one POST of the job's JSON when it ends, retried with backoff.

Why these rules: a receiver must be able to tell the server's calls from anyone else's (``Fpedit-Signature``:
``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``, the time inside the MAC so a captured call cannot be
replayed later) and to drop a repeat (``Fpedit-Delivery``, the same on every retry of one job's webhook). And
the server must not become a way into its own network: a URL is resolved and refused when any address is
loopback, private, link-local, reserved or a cloud metadata address (unless ``--webhook-allow-private``), both
at submit and again before every attempt, whose connection goes to the address just checked. Redirects are
never followed (``http.client`` does not), so a receiver cannot bounce the call inward either.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from fpedit.engine.errors import FpeditError, InvalidInputError

log = logging.getLogger("fpedit.server")

FIELD = "webhook_url"
MAX_URL_CHARS = 2048
#: Metadata services outside the ranges Python calls private or link-local (Alibaba's, in shared space).
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("100.100.100.200")})
SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")
#: Outcomes of one delivery attempt (the metrics' label values).
OUTCOMES = (
    "delivered", "server_error", "client_error", "redirect", "timeout", "connection_error", "refused",
)  # fmt: skip


class WebhooksOffError(FpeditError):
    """A webhook asked of a server without a secret to sign it (FAILED_PRECONDITION)."""


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Fpedit-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the server must not call ``address`` (None: a public address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if address.is_private or (isinstance(address, ipaddress.IPv4Address) and address in SHARED_SPACE):
        return "a private address"
    if address.is_multicast or address.is_reserved or address.is_unspecified:
        return "a reserved address"
    return None


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    address: str  # the checked address the connection goes to


def resolve(url: str, allow_private: bool) -> Target:
    """Check ``url`` and resolve its host; refuse (``InvalidInputError`` on ``webhook_url``) what may not be
    called. Every address the name resolves to must pass, so DNS cannot pick an inward one later."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidInputError(FIELD, f"is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInputError(FIELD, f"is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInputError(FIELD, f"must be an http or https URL, not {parts.scheme or 'schemeless'!r}")
    if not parts.hostname:
        raise InvalidInputError(FIELD, "has no host")
    if parts.username or parts.password:
        raise InvalidInputError(FIELD, "must not carry credentials")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInputError(FIELD, f"{parts.hostname} does not resolve ({exc})") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not allow_private:
        for address in addresses:
            why = forbidden(address)
            if why is not None:
                raise InvalidInputError(
                    FIELD,
                    f"{parts.hostname} resolves to {address}, {why}; the server calls public addresses only "
                    "(--webhook-allow-private allows others)",
                )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port, path, str(addresses[0]))


@dataclass
class Attempt:
    time: float
    status: int
    error: str

    @property
    def outcome(self) -> str:
        """The metrics label: delivered, server_error, client_error, redirect, timeout, connection_error,
        refused (the address check failed at delivery)."""
        if self.error:
            return self.error.split(":", 1)[0]
        if 200 <= self.status < 300:
            return "delivered"
        if 300 <= self.status < 400:
            return "redirect"
        return "server_error" if self.status >= 500 else "client_error"

    @property
    def retry(self) -> bool:
        return self.outcome in ("timeout", "connection_error", "server_error")


def post_once(target: Target, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """One POST to the checked address (TLS verified against the URL's host name); returns the status."""
    sock = socket.create_connection((target.address, target.port), timeout=timeout_s)
    try:
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
        connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
        connection.sock = sock  # connect() is skipped: the socket goes where the check said
        default_port = 443 if target.scheme == "https" else 80
        host = target.host if target.port == default_port else f"{target.host}:{target.port}"
        connection.putrequest("POST", target.path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": host, **headers, "Content-Length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        response.read(64 * 1024)
        return response.status
    finally:
        sock.close()


class WebhookSender:
    """Delivers webhooks on a few threads of its own, so a slow receiver never holds a job worker."""

    def __init__(
        self,
        secret: str | None,
        attempts: int,
        allow_private: bool,
        timeout_s: float,
        backoff_s: float,
        on_attempt: Callable[[str, Attempt, bool], None],
    ) -> None:
        self.secret = secret
        self.attempts = attempts
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.on_attempt = on_attempt
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fpedit-webhook")

    def check(self, url: str) -> None:
        """Refuse at submit what could never be delivered."""
        if self.secret is None:
            raise WebhooksOffError(
                "webhook_url: this server has no webhook secret (--webhook-secret or FPEDIT_WEBHOOK_SECRET)"
            )
        resolve(url, self.allow_private)

    def send(self, job_id: str, url: str, delivery: str, body: Callable[[], bytes], done_before: int) -> None:
        """Deliver ``body()`` (read again at every attempt) to ``url``; ``done_before`` attempts already made."""
        self._executor.submit(self._deliver, job_id, url, delivery, body, done_before)

    def _deliver(self, job_id: str, url: str, delivery: str, body: Callable[[], bytes], done: int) -> None:
        assert self.secret is not None
        for number in range(done, self.attempts):
            if number > 0 and self._stop.wait(self.backoff_s * 2 ** (number - 1)):
                return  # shutting down: a state directory delivers the rest after the restart
            data = body()
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "fpedit-webhook",
                "Fpedit-Delivery": delivery,
                "Fpedit-Signature": signature(self.secret, timestamp, data),
            }
            status, error = 0, ""
            try:
                target = resolve(url, self.allow_private)
                status = post_once(target, data, headers, self.timeout_s)
            except InvalidInputError as exc:
                error = f"refused: {exc.reason}"
            except TimeoutError:
                error = "timeout: no answer in time"
            except (OSError, http.client.HTTPException) as exc:
                error = f"connection_error: {type(exc).__name__}: {exc}"
            attempt = Attempt(time.time(), status, error)
            final = number + 1 == self.attempts or not attempt.retry
            try:
                self.on_attempt(job_id, attempt, final)
            except Exception:  # the job may have expired meanwhile
                log.exception("recording a webhook attempt of job %s failed", job_id)
            if not attempt.retry:
                return

    def close(self) -> None:
        self._stop.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
