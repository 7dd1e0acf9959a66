"""``fpedit serve``'s job and webhook settings: one dataclass whose fields carry their flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from fpedit.engine.errors import InvalidInputError
from fpedit.engine.flags import add_config_arguments, config_values_from_args, flag, flag_name

#: The environment variable read for the webhook secret when ``--webhook-secret`` is not given.
SECRET_ENV = "FPEDIT_WEBHOOK_SECRET"


@dataclass
class JobsConfig:
    """How jobs are kept and called back; each field carries its ``fpedit serve`` flag."""

    state_dir: Path | None = field(  # None: jobs, results and inversions in memory only
        default=None,
        metadata=flag(
            "keep jobs (SQLite), their results and the inversion cache here, across restarts (default: memory only)",
            type=Path,
        ),
    )
    state_bytes: int = field(  # results and saved inversions together
        default=8 * 1024**3,
        metadata=flag(
            "bound on job results and kept inversions; oldest evicted first (default {default:g})",
            type=float,
            name="state-gib",
            unit=1024**3,
        ),
    )
    job_ttl_s: float = field(  # a finished job is forgotten this long after it ended
        default=7 * 24 * 3600.0,
        metadata=flag("seconds a finished job is kept (default {default:g})", type=float, name="job-ttl"),
    )
    max_queued: int = field(  # jobs waiting to run; more are refused (RESOURCE_EXHAUSTED)
        default=1000,
        metadata=flag(
            "jobs that may wait; more get RESOURCE_EXHAUSTED (default {default})",
            type=int,
            name="max-queued-jobs",
        ),
    )
    webhook_secret: str | None = field(
        default=None,
        metadata=flag(
            f"HMAC-SHA256 key that signs webhooks (default: ${SECRET_ENV}; without one, webhooks are refused)"
        ),
    )
    webhook_attempts: int = field(
        default=5, metadata=flag("deliveries tried per webhook (default {default})", type=int)
    )
    webhook_allow_private: bool = field(
        default=False,
        metadata=flag(
            "allow webhook URLs on loopback, private, link-local and metadata addresses (default: refused)",
            action="store_true",
        ),
    )
    webhook_timeout_s: float = field(
        default=10.0, metadata=flag("one delivery's timeout (default {default:g} s)", type=float)
    )
    webhook_backoff_s: float = field(  # first retry after this, then doubling
        default=1.0,
        metadata=flag(
            "wait before the first retry, doubled for each next one (default {default:g} s)", type=float
        ),
    )

    def validate(self) -> JobsConfig:
        checks = [
            ("state_bytes", self.state_bytes > 0, "must be positive"),
            ("job_ttl_s", self.job_ttl_s > 0, "must be a positive number of seconds"),
            ("max_queued", self.max_queued >= 1, "must be at least 1"),
            ("webhook_attempts", 1 <= self.webhook_attempts <= 20, "must be in 1..20"),
            ("webhook_timeout_s", self.webhook_timeout_s > 0, "must be positive"),
            ("webhook_backoff_s", self.webhook_backoff_s >= 0, "must be 0 or more"),
        ]
        for name, ok, message in checks:
            if not ok:  # named as the user typed it: the field's flag
                raise InvalidInputError(flag_name(JobsConfig, name), message)
        if self.webhook_secret is not None and len(self.webhook_secret) < 16:
            raise InvalidInputError(flag_name(JobsConfig, "webhook_secret"), "must be at least 16 characters")
        return self


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the jobs flags to ``fpedit serve``'s parser, from :class:`JobsConfig`'s fields."""
    add_config_arguments(parser.add_argument_group("jobs and webhooks"), JobsConfig)


def jobs_config_from_args(args: argparse.Namespace) -> JobsConfig:
    """The validated :class:`JobsConfig` of the flags (the secret from the environment when not given)."""
    values = config_values_from_args(args, JobsConfig)
    values["webhook_secret"] = values["webhook_secret"] or os.environ.get(SECRET_ENV) or None
    return JobsConfig(**values).validate()
