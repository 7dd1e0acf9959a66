"""``fpedit serve``'s job and webhook flags, kept in one dataclass and added to the parser by one function."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from fpedit.engine.errors import InvalidInputError

#: The environment variable read for the webhook secret when ``--webhook-secret`` is not given.
SECRET_ENV = "FPEDIT_WEBHOOK_SECRET"


@dataclass
class JobsConfig:
    """How jobs are kept and called back; field names match the flags (``--state-dir``...)."""

    state_dir: Path | None = None  # None: jobs, results and inversions in memory only
    state_bytes: int = 8 * 1024**3  # results and saved inversions together (--state-gib)
    job_ttl_s: float = 7 * 24 * 3600.0  # a finished job is forgotten this long after it ended
    max_queued: int = 1000  # jobs waiting to run; more are refused (RESOURCE_EXHAUSTED)
    webhook_secret: str | None = None
    webhook_attempts: int = 5
    webhook_allow_private: bool = False
    webhook_timeout_s: float = 10.0
    webhook_backoff_s: float = 1.0  # first retry after this, then doubling

    def validate(self) -> JobsConfig:
        checks = [
            ("state-gib", self.state_bytes > 0, "must be positive"),
            ("job-ttl", self.job_ttl_s > 0, "must be a positive number of seconds"),
            ("max-queued-jobs", self.max_queued >= 1, "must be at least 1"),
            ("webhook-attempts", 1 <= self.webhook_attempts <= 20, "must be in 1..20"),
            ("webhook-timeout-s", self.webhook_timeout_s > 0, "must be positive"),
            ("webhook-backoff-s", self.webhook_backoff_s >= 0, "must be 0 or more"),
        ]
        for flag, ok, message in checks:
            if not ok:
                raise InvalidInputError(flag, message)
        if self.webhook_secret is not None and len(self.webhook_secret) < 16:
            raise InvalidInputError("webhook-secret", "must be at least 16 characters")
        return self


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the jobs flags to ``fpedit serve``'s parser (every default is :class:`JobsConfig`'s)."""
    d = JobsConfig()
    group = parser.add_argument_group("jobs and webhooks")
    group.add_argument(
        "--state-dir",
        type=Path,
        help="keep jobs (SQLite), their results and the inversion cache here, across restarts "
        "(default: memory only)",
    )
    group.add_argument(
        "--state-gib",
        type=float,
        default=d.state_bytes / 1024**3,
        help=f"bound on job results and kept inversions; oldest evicted first (default {d.state_bytes / 1024**3:g})",
    )
    group.add_argument(
        "--job-ttl",
        type=float,
        default=d.job_ttl_s,
        help=f"seconds a finished job is kept (default {d.job_ttl_s:g})",
    )
    group.add_argument(
        "--max-queued-jobs",
        type=int,
        default=d.max_queued,
        help=f"jobs that may wait; more get RESOURCE_EXHAUSTED (default {d.max_queued})",
    )
    group.add_argument(
        "--webhook-secret",
        help=f"HMAC-SHA256 key that signs webhooks (default: ${SECRET_ENV}; without one, webhooks are refused)",
    )
    group.add_argument(
        "--webhook-attempts",
        type=int,
        default=d.webhook_attempts,
        help=f"deliveries tried per webhook (default {d.webhook_attempts})",
    )
    group.add_argument(
        "--webhook-allow-private",
        action="store_true",
        help="allow webhook URLs on loopback, private, link-local and metadata addresses (default: refused)",
    )
    group.add_argument(
        "--webhook-timeout-s",
        type=float,
        default=d.webhook_timeout_s,
        help=f"one delivery's timeout (default {d.webhook_timeout_s:g} s)",
    )
    group.add_argument(
        "--webhook-backoff-s",
        type=float,
        default=d.webhook_backoff_s,
        help=f"wait before the first retry, doubled for each next one (default {d.webhook_backoff_s:g} s)",
    )


def jobs_config_from_args(args: argparse.Namespace) -> JobsConfig:
    """The validated :class:`JobsConfig` of the flags (the secret from the environment when not given)."""
    secret = args.webhook_secret or os.environ.get(SECRET_ENV) or None
    return JobsConfig(
        state_dir=args.state_dir,
        state_bytes=int(args.state_gib * 1024**3),
        job_ttl_s=args.job_ttl,
        max_queued=args.max_queued_jobs,
        webhook_secret=secret,
        webhook_attempts=args.webhook_attempts,
        webhook_allow_private=args.webhook_allow_private,
        webhook_timeout_s=args.webhook_timeout_s,
        webhook_backoff_s=args.webhook_backoff_s,
    ).validate()
