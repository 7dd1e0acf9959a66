"""Where jobs live: a SQLite table (in memory, or ``jobs.db`` in ``--state-dir`` with WAL), the result images
(a dict, or files under ``results/``), and in a state directory its lock and marker.

One code path for both: without a directory the table is SQLite's ``:memory:``, so memory mode differs only in
where bytes go. A state directory is refused with one line when another server holds it (``fcntl`` lock,
released by the kernel even on kill -9), when it is not one (other files, no marker) and when its database is
damaged; the checks run before the model loads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fpedit.engine.errors import InvalidInputError
from fpedit.engine.paths import claimed_format, write_atomically

MARKER = "fpedit-state.json"
FORMAT = {"format": "fpedit-state", "version": 1}
FLAG = "state-dir"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    request BLOB NOT NULL,
    created REAL NOT NULL,
    started REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    result_files TEXT NOT NULL DEFAULT '[]',
    result_bytes INTEGER NOT NULL DEFAULT 0,
    result_evicted INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    webhook_url TEXT NOT NULL DEFAULT '',
    webhook_delivery TEXT NOT NULL DEFAULT '',
    webhook_attempts TEXT NOT NULL DEFAULT '[]',
    webhook_done INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
"""

#: Columns a caller may update.
COLUMNS = (
    "state", "started", "finished", "attempts", "result", "result_files", "result_bytes", "result_evicted",
    "error", "webhook_attempts", "webhook_done",
)  # fmt: skip


@dataclass
class JobRow:
    """One row of the table, as stored."""

    seq: int
    id: str
    owner: str
    kind: str
    state: str
    request: bytes
    created: float
    started: float
    finished: float
    attempts: int
    result: bytes | None
    result_files: str
    result_bytes: int
    result_evicted: int
    error: str | None
    webhook_url: str
    webhook_delivery: str
    webhook_attempts: str
    webhook_done: int

    @property
    def error_fields(self) -> dict[str, Any] | None:
        return None if not self.error else json.loads(self.error)


def refuse(message: str) -> InvalidInputError:
    return InvalidInputError(FLAG, message)


class StateDir:
    """A claimed ``--state-dir``: checked, locked for this process's life, its database open."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().resolve()
        self._check_layout()
        self._lock_file = self._lock()
        (self.path / "results").mkdir(exist_ok=True)
        (self.path / "inversions").mkdir(exist_ok=True)

    @property
    def inversions(self) -> Path:
        return self.path / "inversions"

    @property
    def results(self) -> Path:
        return self.path / "results"

    @property
    def database(self) -> Path:
        return self.path / "jobs.db"

    def _check_layout(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise refuse(f"{path} is not a directory")
        marker = path / MARKER
        if not marker.exists():
            if path.exists() and any(path.iterdir()):
                raise refuse(
                    f"{path} is not an fpedit state directory (it holds other files and no {MARKER}); "
                    "give an empty or new directory"
                )
            try:
                path.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps(FORMAT) + "\n")
            except OSError as exc:
                raise refuse(f"cannot create {path}: {exc.strerror or exc}") from None
            return
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            found = None
        if not isinstance(found, dict) or found.get("format") != FORMAT["format"]:
            raise refuse(f"{marker} is damaged or not fpedit's; move {path} away or give another directory")
        if found.get("version") != FORMAT["version"]:
            raise refuse(
                f"{path} has state format version {found.get('version')!r}; this fpedit reads {FORMAT['version']}"
            )

    def _lock(self) -> Any:
        lock_path = self.path / "lock"
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise refuse(f"{self.path} is in use by another fpedit server (pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()


def open_state(path: Path | None) -> StateDir | None:
    """Claim ``path`` (None: memory only) and check its database, before any model loads."""
    if path is None:
        return None
    state = StateDir(path)
    try:
        JobTable(state.database).close()
    except BaseException:
        state.close()
        raise
    return state


class JobTable:
    """The jobs table, thread-safe (one connection under a lock)."""

    def __init__(self, database: Path | None) -> None:
        name = ":memory:" if database is None else str(database)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(name, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            if database is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                (check,) = self._db.execute("PRAGMA quick_check").fetchone()
                if check != "ok":
                    raise sqlite3.DatabaseError(check)
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            missing = {"id", "owner", "state", "request", *COLUMNS} - columns
            if missing:
                raise sqlite3.DatabaseError(f"its jobs table lacks {sorted(missing)[0]}")
        except sqlite3.DatabaseError as exc:
            raise refuse(
                f"{database} is damaged or not an fpedit job database ({exc}); move it away to start afresh"
            ) from None

    def insert(self, row: dict[str, Any]) -> None:
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(row.values()))

    def update(self, job_id: str, **fields: Any) -> None:
        unknown = set(fields) - set(COLUMNS)
        assert not unknown, unknown
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRow(**dict(row))

    def list(self, owner: str, state: str | None, before_seq: int | None, limit: int) -> list[JobRow]:
        """``owner``'s jobs, newest first, older than ``before_seq`` when given."""
        sql, args = "SELECT * FROM jobs WHERE owner = ?", [owner]
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        if before_seq is not None:
            sql += " AND seq < ?"
            args.append(before_seq)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            return [JobRow(**dict(row)) for row in self._db.execute(sql, args)]

    def in_states(self, *states: str) -> list[JobRow]:
        """Every job in one of ``states``, oldest first."""
        marks = ", ".join("?" for _ in states)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq", states)
            return [JobRow(**dict(row)) for row in rows]

    def pending_webhooks(self) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE webhook_done = 0 AND finished > 0 ORDER BY seq")
            return [JobRow(**dict(row)) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def oldest_queued(self) -> float | None:
        with self._lock:
            (created,) = self._db.execute("SELECT MIN(created) FROM jobs WHERE state = 'queued'").fetchone()
        return created

    def results_oldest_first(self) -> list[tuple[str, float, int]]:
        """(id, finished, bytes) of every kept result, oldest first."""
        with self._lock:
            return list(
                self._db.execute(
                    "SELECT id, finished, result_bytes FROM jobs WHERE result_bytes > 0 AND result_evicted = 0 "
                    "ORDER BY finished"
                ).fetchall()
            )

    def expired(self, before: float) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE finished > 0 AND finished < ?", (before,))
            return [row[0] for row in rows]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ResultFiles:
    """Result images by job id and field: files under ``results/<id>/`` in a state directory, else a dict."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._memory: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()

    def put(self, job_id: str, files: dict[str, bytes]) -> int:
        """Keep ``files`` (field -> encoded image); returns the bytes kept."""
        if self.root is None:
            with self._lock:
                self._memory[job_id] = dict(files)
        else:
            folder = self.root / job_id
            folder.mkdir(exist_ok=True)
            for field, data in files.items():
                write_atomically(folder / f"{field}.{image_extension(data)}", data)
        return sum(len(data) for data in files.values())

    def get(self, job_id: str, fields: list[str]) -> dict[str, bytes] | None:
        """The files, or None when any is gone (evicted)."""
        if self.root is None:
            with self._lock:
                held = self._memory.get(job_id)
            return None if held is None or set(fields) - set(held) else dict(held)
        found: dict[str, bytes] = {}
        folder = self.root / job_id
        for field in fields:
            matches = sorted(folder.glob(f"{field}.*")) if folder.is_dir() else []
            if not matches:
                return None
            found[field] = matches[0].read_bytes()
        return found

    def delete(self, job_id: str) -> None:
        if self.root is None:
            with self._lock:
                self._memory.pop(job_id, None)
            return
        folder = self.root / job_id
        if folder.is_dir():
            for file in folder.iterdir():
                file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()


#: A result image's file extension, by the format its signature claims.
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def image_extension(data: bytes) -> str:
    return EXTENSIONS.get(claimed_format(data) or "", "bin")


def now() -> float:
    return time.time()
