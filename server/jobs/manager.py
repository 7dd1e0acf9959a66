"""The job manager: one queue of jobs over the server's runner, for both transports.

A job is validated when it is submitted (the servicer's own parse functions, the image decoded, an inversion
id looked up), so a bad request is refused then and never accepted to fail later. It then waits in the
table and runs on one of ``workers`` job threads through the same runner as a synchronous call (its queue,
cache, limits), logged and counted as that call with ``transport="job"``. Cancelling a running job makes its
cancel check raise at the engine's next step. With a state directory the table, results and inversions are on
disk: at start, jobs left queued or running (a restart, kill -9) are queued again, oldest first, and webhooks
not yet delivered are sent. Bounds: ``--job-ttl`` forgets finished jobs, ``--state-gib`` evicts the oldest
results and saved inversions first (a job whose result went says ``result_evicted``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from fpedit.engine import InvalidInputError
from fpedit.engine.errors import CancelledError, NotFoundError
from fpedit.v1 import edit_pb2 as pb

from ..convert import edit_response, generate_response, invert_response
from ..errors import OverloadedError, UnavailableError
from ..http_support import HTTP_STATUS
from ..logs import log_request
from ..service import EditServicer, parse_edit, parse_generate, parse_invert, status_of
from . import views
from .config import JobsConfig
from .state import JobRow, JobTable, ResultFiles, StateDir, now
from .views import STATE_ENUM, STATE_NAMES, STATES, TERMINAL
from .webhooks import Attempt, WebhookSender

log = logging.getLogger("fpedit.server")

#: The synchronous RPC each kind of job runs, for the log line and the metrics.
METHODS = {"edit": "Edit", "generate": "GenerateEdit", "invert": "Invert"}
#: Image fields of each kind's response: kept as files, not in the table.
IMAGE_FIELDS = {
    "edit": ("edited_image", "reconstruction_image"),
    "generate": ("source_image", "edited_image"),
    "invert": (),
}
RESPONSES: dict[str, type[Message]] = {
    "edit": pb.EditResponse, "generate": pb.GenerateEditResponse, "invert": pb.InvertResponse,
}  # fmt: skip
MAX_LIST = 100
DEFAULT_LIST = 20
SWEEP_EVERY_S = 60.0
#: A job waits this long before trying again when synchronous calls fill the runner's queue.
BUSY_RETRY_S = 0.2


def owner_of(token: str | None) -> str:
    """What the table keeps of a token: its hash (the token itself never lands on disk)."""
    return "" if not token else hashlib.sha256(token.encode()).hexdigest()


def unknown_job(job_id: str) -> NotFoundError:
    return NotFoundError(f"job {job_id!r} is unknown, expired, or not this token's")


class Stopping(CancelledError):
    """The server stops while the job runs: with a state directory it runs again after the restart."""


class JobManager:
    """Jobs of one server over its servicer's runner; see the module docstring."""

    def __init__(self, servicer: EditServicer, config: JobsConfig, state: StateDir | None) -> None:
        self.servicer = servicer
        self.config = config
        self.state = state
        self.table = JobTable(state.database if state is not None else None)
        self.results = ResultFiles(state.results if state is not None else None)
        self.webhooks = WebhookSender(
            config.webhook_secret,
            config.webhook_attempts,
            config.webhook_allow_private,
            config.webhook_timeout_s,
            config.webhook_backoff_s,
            self._record_attempt,
        )
        self.deliveries: collections.Counter[str] = collections.Counter()
        self._queue: collections.deque[str] = collections.deque()
        self._changed = threading.Condition()
        self._versions: dict[str, int] = {}
        self._progress: dict[str, tuple[str, int, int]] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._stopping = threading.Event()
        self._closing = threading.Event()  # no new job starts; running ones may finish
        self._running = 0
        self._recover()
        workers = max(1, servicer.config.workers)
        self._threads = [
            threading.Thread(target=self._work, name=f"fpedit-job-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="fpedit-job-sweep", daemon=True)
        self._sweeper.start()

    # --- submit, read, cancel -------------------------------------------------------------------------------

    def submit(self, request: pb.SubmitJobRequest, token: str | None) -> pb.Job:
        """Validate ``request`` as its synchronous call would be, then queue it; raises what that call would."""
        kind = request.WhichOneof("request")
        if kind is None:
            raise InvalidInputError("request", "give one of edit, generate or invert")
        self._refuse_when_unable()  # before judging it: a refusal for load or shutdown costs nothing
        self._validate(kind, request)
        if request.webhook_url:
            self.webhooks.check(request.webhook_url)
        with self._changed:
            self._refuse_when_unable()  # again, under the lock: the queue may have filled meanwhile
            job_id = secrets.token_urlsafe(16)  # 128 random bits
            self.table.insert(
                {
                    "id": job_id,
                    "owner": owner_of(token),
                    "kind": kind,
                    "state": "queued",
                    "request": request.SerializeToString(),
                    "created": now(),
                    "webhook_url": request.webhook_url,
                    "webhook_delivery": secrets.token_hex(16) if request.webhook_url else "",
                    "webhook_done": 0 if request.webhook_url else 1,
                }
            )
            self._queue.append(job_id)
            self._touch(job_id)
        return self.get(job_id, token)

    def _refuse_when_unable(self) -> None:
        if self.servicer.draining or self._stopping.is_set():
            raise UnavailableError("the server is shutting down; retry on another replica")
        if len(self._queue) >= self.config.max_queued:
            raise OverloadedError(f"{len(self._queue)} jobs queued (limit {self.config.max_queued})")

    def _validate(self, kind: str, request: pb.SubmitJobRequest) -> Any:
        """The request parsed and judged as its synchronous call would judge it, without running it: the
        servicer's parse, then the runner's check (the engine's refusals, the image decoded, an inversion id
        looked up)."""
        call = self._parse(kind, request)
        self.servicer.runner.check(call)
        return call

    def _parse(self, kind: str, request: pb.SubmitJobRequest) -> Any:
        chars = self.servicer.config.max_prompt_chars
        if kind == "edit":
            return parse_edit(request.edit, chars)
        if kind == "generate":
            return parse_generate(request.generate, chars)
        return parse_invert(request.invert, chars)

    def _row(self, job_id: str, token: str | None) -> JobRow:
        row = self.table.get(job_id) if isinstance(job_id, str) and len(job_id) <= 64 else None
        if row is None or row.owner != owner_of(token):
            raise unknown_job(job_id)
        return row

    def get(self, job_id: str, token: str | None) -> pb.Job:
        return self.message(self._row(job_id, token))

    def list(self, request: pb.ListJobsRequest, token: str | None) -> pb.ListJobsResponse:
        limit = request.limit or DEFAULT_LIST
        if not 1 <= limit <= MAX_LIST:
            raise InvalidInputError("limit", f"must be in 1..{MAX_LIST}")
        state = None
        if request.state:
            if request.state not in STATE_NAMES:
                raise InvalidInputError("state", f"unknown value {request.state}")
            state = STATE_NAMES[request.state]
        before = None
        if request.page_token:
            if not request.page_token.isdigit() or len(request.page_token) > 18:
                raise InvalidInputError("page_token", "is not a token this server issued")
            before = int(request.page_token)
        rows = self.table.list(owner_of(token), state, before, limit + 1)
        response = pb.ListJobsResponse(jobs=[self.message(row) for row in rows[:limit]])
        if len(rows) > limit:
            response.next_page_token = str(rows[limit - 1].seq)
        return response

    def cancel(self, job_id: str, token: str | None) -> pb.Job:
        """A queued job ends at once; a running one stops at its next step; an ended one is left as it is."""
        row = self._row(job_id, token)
        with self._changed:
            row = self.table.get(job_id) or row
            if row.state == "queued":
                self._end(row, "cancelled", error=(grpc.StatusCode.CANCELLED, "cancelled by the client"))
            elif row.state == "running":
                self._cancel.setdefault(job_id, threading.Event()).set()
        return self.get(job_id, token)

    def watch(self, job_id: str, token: str | None, active: Callable[[], bool]) -> Iterator[pb.Job]:
        """The job now, then at each change until it ends (or ``active()`` turns false)."""
        self._row(job_id, token)
        seen = -1
        while True:
            with self._changed:
                self._changed.wait_for(lambda seen=seen: self._versions.get(job_id, 0) != seen, timeout=0.5)
                version = self._versions.get(job_id, 0)
            if not active():
                return
            if version == seen:
                continue
            seen = version
            job = self.get(job_id, token)
            yield job
            if job.state in (STATE_ENUM[name] for name in TERMINAL):
                return

    # --- the job message ------------------------------------------------------------------------------------

    def message(self, row: JobRow) -> pb.Job:
        job = pb.Job(
            id=row.id,
            kind=row.kind,
            state=STATE_ENUM[row.state],
            created=row.created,
            started=row.started,
            finished=row.finished,
            webhook_url=row.webhook_url,
            webhook_delivery=row.webhook_delivery,
            attempts=row.attempts,
        )
        progress = self._progress.get(row.id)
        if progress is not None:
            job.progress.stage, job.progress.step, job.progress.total = progress
        for attempt in json.loads(row.webhook_attempts):
            job.webhook_attempts.add(**attempt)
        error = row.error_fields
        if error is not None:
            job.error.code, job.error.status, job.error.message = (
                error["code"],
                error["status"],
                error["message"],
            )
        if row.state == "succeeded" and row.result is not None:
            fields = json.loads(row.result_files)
            files = self.results.get(row.id, fields) if fields else {}
            if files is None or row.result_evicted:
                job.result_evicted = True
            else:
                result = getattr(job, row.kind)
                result.ParseFromString(row.result)
                for field, data in files.items():
                    setattr(result, field, data)
        return job

    def job_json(self, job_id: str) -> bytes:
        """The webhook's body: the job's JSON exactly as ``GET /v1/jobs/{id}`` answers it."""
        row = self.table.get(job_id)
        if row is None:
            raise unknown_job(job_id)
        return views.job_json(self.message(row)).encode()

    # --- running --------------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Queue again what a previous process left queued or running; resend undelivered webhooks."""
        for row in self.table.in_states("queued", "running"):
            if row.state == "running":
                self.table.update(row.id, state="queued")
                log.info("job %s was running when the server stopped: queued again", row.id)
            self._queue.append(row.id)
        for row in self.table.pending_webhooks():
            self._schedule_webhook(row)

    def _touch(self, job_id: str) -> None:
        """Wake watchers (call with ``_changed`` held)."""
        self._versions[job_id] = self._versions.get(job_id, 0) + 1
        self._changed.notify_all()

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(
                    lambda: (self._queue and not self._closing.is_set()) or self._stopping.is_set()
                )
                if self._stopping.is_set():
                    return
                job_id = self._queue.popleft()
                row = self.table.get(job_id)
                if row is None or row.state != "queued":
                    continue
                self.table.update(job_id, state="running", started=now(), attempts=row.attempts + 1)
                self._cancel[job_id] = threading.Event()
                self._running += 1
                self._touch(job_id)
            try:
                self._run(row)
            finally:
                with self._changed:
                    self._running -= 1
                    self._cancel.pop(job_id, None)
                    self._progress.pop(job_id, None)
                    self._touch(job_id)

    def _run(self, row: JobRow) -> None:
        request = pb.SubmitJobRequest.FromString(row.request)
        kind, method = row.kind, METHODS[row.kind]
        cancelled = self._cancel[row.id]
        started = time.perf_counter()

        def check() -> None:
            if cancelled.is_set():
                raise CancelledError("cancelled by the client")
            if self._stopping.is_set():
                raise Stopping("the server stopped while the job ran")

        def progress(event: Any) -> None:
            with self._changed:
                self._progress[row.id] = (str(event.stage), int(event.step), int(event.total))
                self._touch(row.id)

        response: Message | None = None
        try:
            call = self._parse(kind, request)  # judged at submit; the runner judges it again as it runs
            runner = self.servicer.runner
            run = {"edit": runner.edit, "generate": runner.generate, "invert": runner.invert}[kind]
            encode = {"edit": edit_response, "generate": generate_response, "invert": invert_response}[kind]
            while True:
                try:
                    response = encode(run(call, progress=progress, cancel_check=check))
                    break
                except OverloadedError:  # synchronous calls fill the runner's queue: wait for a slot
                    check()
                    time.sleep(BUSY_RETRY_S)
        except Stopping:
            if self.state is not None:  # on disk: it runs again after the restart
                self.table.update(row.id, state="queued")
                self._log(row, method, "UNAVAILABLE", started, None, "stopped; runs again after a restart")
                return
            code, detail = grpc.StatusCode.UNAVAILABLE, "the server stopped while the job ran"
            self._finish(row, method, started, None, (code, detail))
            return
        except Exception as exc:
            code, detail = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("job %s failed", row.id, exc_info=exc)
            self._finish(row, method, started, None, (code, detail))
            return
        self._finish(row, method, started, response, None)

    def _finish(
        self,
        row: JobRow,
        method: str,
        started: float,
        response: Message | None,
        error: tuple[grpc.StatusCode, str] | None,
    ) -> None:
        with self._changed:
            if response is not None:
                files = {f: getattr(response, f) for f in IMAGE_FIELDS[row.kind] if getattr(response, f)}
                kept = self.results.put(row.id, files)
                for field in files:
                    response.ClearField(field)
                self.table.update(
                    row.id, result=response.SerializeToString(), result_files=json.dumps(sorted(files)),
                    result_bytes=kept,
                )  # fmt: skip
                self._end(row, "succeeded")
            else:
                assert error is not None
                state = "cancelled" if error[0] == grpc.StatusCode.CANCELLED else "failed"
                self._end(row, state, error=error)
        code = "OK" if error is None else error[0].name
        self._log(row, method, code, started, response, "" if error is None else error[1])
        self.sweep()

    def _end(self, row: JobRow, state: str, error: tuple[grpc.StatusCode, str] | None = None) -> None:
        """Record the end (call with ``_changed`` held) and send the webhook."""
        fields: dict[str, Any] = {"state": state, "finished": now()}
        if error is not None:
            code, detail = error
            fields["error"] = json.dumps(
                {"code": HTTP_STATUS.get(code, 500), "status": code.name, "message": detail}
            )
        self.table.update(row.id, **fields)
        self._touch(row.id)
        if row.webhook_url:
            self._schedule_webhook(row)

    def _log(
        self, row: JobRow, method: str, code: str, started: float, response: Message | None, detail: str
    ) -> None:
        seconds = time.perf_counter() - started
        stats = getattr(response, "stats", None) if response is not None else None
        fields: dict[str, Any] = {
            "method": method,
            "status": code,
            "ms": round(seconds * 1e3, 1),
            "job": row.id,
        }
        fields["transport"] = "job"
        if detail:
            fields["detail"] = detail
        log_request(fields)
        if self.servicer.metrics is not None:
            self.servicer.metrics.observe(method, code, seconds, stats, transport="job")

    # --- webhooks -------------------------------------------------------------------------------------------

    def _schedule_webhook(self, row: JobRow) -> None:
        done = len(json.loads(row.webhook_attempts))
        self.webhooks.send(row.id, row.webhook_url, row.webhook_delivery, lambda: self.job_json(row.id), done)

    def _record_attempt(self, job_id: str, attempt: Attempt, final: bool) -> None:
        self.deliveries[attempt.outcome] += 1
        with self._changed:
            row = self.table.get(job_id)
            if row is None:
                return
            attempts = json.loads(row.webhook_attempts)
            attempts.append({"time": attempt.time, "status": attempt.status, "error": attempt.error})
            self.table.update(job_id, webhook_attempts=json.dumps(attempts), webhook_done=int(final))
            self._touch(job_id)

    # --- bounds ---------------------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Forget jobs finished longer than ``--job-ttl`` ago; evict the oldest results and saved inversions
        while they hold more than ``--state-gib``."""
        for job_id in self.table.expired(now() - self.config.job_ttl_s):
            self.results.delete(job_id)
            self.table.delete(job_id)
        entries: list[tuple[float, str, int, Any]] = []
        for job_id, finished, nbytes in self.table.results_oldest_first():
            entries.append((finished, "result", nbytes, job_id))
        if self.state is not None:
            for path in self.state.inversions.glob("*.safetensors"):
                try:
                    info = path.stat()
                except OSError:
                    continue
                entries.append((info.st_mtime, "inversion", info.st_size, path))
        total = sum(entry[2] for entry in entries)
        for _, what, nbytes, key in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.config.state_bytes:
                break
            if what == "result":
                self.results.delete(key)
                self.table.update(key, result_evicted=1)
            else:
                key.unlink(missing_ok=True)
            total -= nbytes

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(SWEEP_EVERY_S):
            try:
                self.sweep()
            except Exception:
                log.exception("the job sweep failed")

    # --- figures and shutdown -------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        found = self.table.count_by_state()
        return {state: int(found.get(state, 0)) for state in STATES}

    def queue_age_s(self) -> float:
        oldest = self.table.oldest_queued()
        return 0.0 if oldest is None else max(0.0, now() - oldest)

    def close(self, grace_s: float = 0.0) -> None:
        """Let running jobs finish for up to ``grace_s``, then stop them (with a state directory they run
        again after a restart); stop the webhook threads and release the state directory."""
        with self._changed:
            self._closing.set()
            self._changed.wait_for(lambda: self._running == 0, timeout=grace_s)
            self._stopping.set()
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(30)
        self.webhooks.close()
        self.table.close()
        if self.state is not None:
            self.state.close()
