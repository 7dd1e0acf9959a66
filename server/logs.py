"""Log formats of ``fpedit serve``: text lines with timestamps, or one JSON object per line.

The servicer logs each finished RPC with its fields in ``extra={"fpedit_request": {...}}``; the JSON format
writes those fields (method, status, ms, queue_ms, engine_ms, rows, inversion_id, peer, detail) as the object,
so a log pipeline needs no parsing of the text line.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("fpedit.server")


def log_request(fields: dict[str, object]) -> None:
    """The one line per request (``rpc=Edit status=OK ms=... detail='...'``), with ``fields`` attached so the
    JSON format writes them as the object: for the servicer's RPCs and for refusals before it (token, size)."""
    text = " ".join(
        f"{k}={v!r}" if k == "detail" else f"{'rpc' if k == 'method' else k}={v}" for k, v in fields.items()
    )
    log.info("%s", text, extra={"fpedit_request": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, and the request's fields or the message."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fpedit_request", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str) -> None:
    """Log the server at INFO; ``"json"`` switches the root handlers to one JSON object per line.

    Text keeps the handlers' format (``fpedit`` main() sets one with timestamps), so a caller's own logging
    set-up (a test's capture handler, an embedding application) is left alone.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=TEXT_FORMAT)
    if log_format == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
    logging.getLogger("fpedit.server").setLevel(logging.INFO)
