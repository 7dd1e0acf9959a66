"""Jobs (issue 28) against real servers on 127.0.0.1: HTTP and gRPC, a webhook receiver written here that
checks signatures itself, state directories across in-process restarts and a kill -9 of `fpedit serve`.

Every expected image comes from the synchronous call (or an uninterrupted run), never from the job code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import make_image
from helpers import assert_one_line, b64, run_cli, scrape
from helpers import decoded_pixels as pixels

from fpedit import EditEngine, EditOptions
from fpedit.engine.errors import InvalidInputError
from fpedit.engine.tiny import save_tiny_model
from fpedit.server.app import build_server
from fpedit.server.config import ServerConfig
from fpedit.server.jobs.config import JobsConfig
from fpedit.v1 import edit_pb2 as pb

STEPS = 2
TOKEN = "alpha-token"
SECRET = "a-webhook-secret-of-some-length"
AUTH = {"authorization": f"Bearer {TOKEN}"}
META = (("authorization", f"Bearer {TOKEN}"),)


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(64, 64, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def wait_job(http: httpx.Client, job_id: str, until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             timeout: float = 120.0, headers: dict | None = None) -> dict:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}", headers=headers if headers is not None else AUTH).json()
        if job["state"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not {until} in {timeout} s: {job}")


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers 503 to its first delivery and checks every signature
    with its own HMAC."""

    def __init__(self, secret: str, statuses: tuple[int, ...] = (503, 200)) -> None:
        self.secret = secret.encode()
        self.calls: list[dict] = []
        self.done = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                parts = dict(item.split("=", 1) for item in self.headers["Fpedit-Signature"].split(","))
                expected = hmac.new(
                    outer.secret, parts["t"].encode() + b"." + body, hashlib.sha256
                ).hexdigest()
                call = {
                    "valid": hmac.compare_digest(expected, parts["v1"]),
                    "fresh": abs(time.time() - int(parts["t"])) < 60,
                    "delivery": self.headers["Fpedit-Delivery"],
                    "job": json.loads(body),
                }
                outer.calls.append(call)
                status = statuses[min(len(outer.calls), len(statuses)) - 1]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                if status == 302:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.end_headers()
                if status != 503:
                    outer.done.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def jobs_engine(model_dir):
    return EditEngine.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def running(jobs_engine, tmp_path_factory):
    config = ServerConfig(port=0, http_port=0, metrics_port=0, token=TOKEN, workers=1, max_queue=4)
    jobs = JobsConfig(
        state_dir=tmp_path_factory.mktemp("state"),
        webhook_secret=SECRET,
        webhook_allow_private=True,
        webhook_backoff_s=0.05,
        max_queued=1,
    )
    server = build_server(jobs_engine, config, jobs)
    yield server
    server.drain(5)


EDIT = {"image": b64(png()), "targetPrompt": "a red car", "options": {"steps": STEPS}}
GENERATE = {"sourcePrompt": "a cat", "targetPrompt": "a dog", "options": {"steps": STEPS}}


def test_http_edit_job_equals_the_synchronous_edit_and_its_webhook_is_signed_and_retried(http, stub):
    receiver = Receiver(SECRET)
    try:
        sync = stub.Edit(
            pb.EditRequest(image=png(), target_prompt="a red car", options=pb.EditOptions(steps=STEPS)),
            metadata=META,
            timeout=120,
        )
        submitted = http.post(
            "/v1/jobs", json={"kind": "edit", "webhookUrl": receiver.url, **EDIT}, headers=AUTH
        )
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        assert submitted.headers["location"] == f"/v1/jobs/{job_id}"
        assert len(base64.urlsafe_b64decode(job_id + "==")) >= 16  # >= 122 random bits
        assert submitted.json()["state"] in ("queued", "running", "succeeded")  # the short names (issue 28)
        job = wait_job(http, job_id)
        assert job["state"] == "succeeded", job
        assert np.array_equal(pixels(job["edit"]["editedImage"]), pixels(sync.edited_image))
        assert np.array_equal(pixels(job["edit"]["reconstructionImage"]), pixels(sync.reconstruction_image))
        assert job["finished"] >= job["started"] >= job["created"] > 0

        # The same job over gRPC, byte for byte.
        over_grpc = stub.GetJob(pb.GetJobRequest(id=job_id), metadata=META, timeout=10)
        assert over_grpc.edit.edited_image == base64.b64decode(job["edit"]["editedImage"])

        assert receiver.done.wait(30)
        first, second = receiver.calls[:2]
        assert first["valid"] and second["valid"] and second["fresh"]
        assert first["delivery"] == second["delivery"] == job["webhookDelivery"]
        assert second["job"]["id"] == job_id and second["job"]["state"] == "succeeded"  # as GET says it
        deadline = time.monotonic() + 10
        while len(http.get(f"/v1/jobs/{job_id}", headers=AUTH).json().get("webhookAttempts", [])) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        attempts = http.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["webhookAttempts"]
        assert [a["status"] for a in attempts] == [503, 200]
    finally:
        receiver.close()


def test_a_redirecting_receiver_is_not_followed_nor_retried(http):
    receiver = Receiver(SECRET, statuses=(302,))
    try:
        job_id = http.post(
            "/v1/jobs", json={"kind": "invert", "image": b64(png()), "options": {"steps": STEPS},
                              "webhookUrl": receiver.url}, headers=AUTH,
        ).json()["id"]  # fmt: skip
        assert receiver.done.wait(30)
        deadline = time.monotonic() + 10
        while not http.get(f"/v1/jobs/{job_id}", headers=AUTH).json().get("webhookAttempts"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # a retry (backoff 0.05 s) would have come by now
        attempts = http.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["webhookAttempts"]
        assert [a["status"] for a in attempts] == [302] and len(receiver.calls) == 1
    finally:
        receiver.close()


def test_grpc_generate_job_watch_and_list_pages_newest_first(http, stub):
    request = pb.GenerateEditRequest(
        source_prompt="a car", target_prompt="a red car", seed=5, options=pb.EditOptions(steps=STEPS),
        height=64, width=64,
    )  # fmt: skip
    sync = stub.GenerateEdit(request, metadata=META, timeout=120)
    job = stub.SubmitJob(pb.SubmitJobRequest(generate=request), metadata=META, timeout=10)
    assert job.state == pb.JOB_STATE_QUEUED and job.kind == "generate"
    seen = list(stub.WatchJob(pb.GetJobRequest(id=job.id), metadata=META, timeout=120))
    assert seen[-1].state == pb.JOB_STATE_SUCCEEDED
    assert any(event.progress.total for event in seen)
    assert seen[-1].generate.edited_image and pixels(seen[-1].generate.edited_image).shape == (64, 64, 3)
    assert np.array_equal(pixels(seen[-1].generate.edited_image), pixels(sync.edited_image))

    newest = stub.ListJobs(pb.ListJobsRequest(limit=1), metadata=META, timeout=10)
    assert [j.id for j in newest.jobs] == [job.id] and newest.next_page_token
    older = stub.ListJobs(pb.ListJobsRequest(limit=1, page_token=newest.next_page_token), metadata=META)
    assert len(older.jobs) == 1 and older.jobs[0].created <= job.created
    by_state = http.get("/v1/jobs", params={"state": "succeeded", "limit": 100}, headers=AUTH)
    assert "JOB_STATE_" not in by_state.text
    succeeded = by_state.json()["jobs"]
    assert job.id in [j["id"] for j in succeeded] and all(j["state"] == "succeeded" for j in succeeded)
    for given in ("JOB_STATE_SUCCEEDED", "Succeeded", "job_state_succeeded"):  # the enum's names, as before
        same = http.get("/v1/jobs", params={"state": given, "limit": 100}, headers=AUTH).json()["jobs"]
        assert [j["id"] for j in same] == [j["id"] for j in succeeded], given
    everything = http.get("/v1/jobs", params={"limit": 100}, headers=AUTH).json()["jobs"]
    assert {j["state"] for j in everything} <= {"queued", "running", "succeeded", "failed", "cancelled"}
    assert http.get("/v1/jobs", params={"state": "queued"}, headers=AUTH).json().get("jobs", []) == []


def test_cancel_a_running_and_a_queued_job_and_a_full_queue(http, stub):
    long = {"kind": "edit", **EDIT, "options": {"steps": 400}}
    running = http.post("/v1/jobs", json=long, headers=AUTH).json()["id"]
    wait_job(http, running, until=("running",))
    queued_job = http.post("/v1/jobs", json=long, headers=AUTH)
    assert queued_job.status_code == 202 and queued_job.json()["state"] == "queued"  # the one worker is busy
    queued = queued_job.json()["id"]
    full = http.post("/v1/jobs", json=long, headers=AUTH)  # max_queued=1
    assert full.status_code == 429 and full.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitJob(
            pb.SubmitJobRequest(edit=pb.EditRequest(image=png(), target_prompt="x")), metadata=META
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    cancelled = http.delete(f"/v1/jobs/{queued}", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert stub.CancelJob(pb.CancelJobRequest(id=running), metadata=META).id == running
    job = wait_job(http, running)
    assert job["state"] == "cancelled" and job["error"]["status"] == "CANCELLED"
    assert job["finished"] - job["started"] < 30  # stopped at a step, not after 400 of them


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        ({"kind": "edit", **EDIT, "targetPrompt": ""}, 400, "INVALID_ARGUMENT", "target_prompt"),
        ({"kind": "edit", **EDIT, "image": b64(b"not an image")}, 400, "INVALID_ARGUMENT", "image"),
        ({"kind": "edit", "inversionId": "f" * 32, "targetPrompt": "x"}, 404, "NOT_FOUND", "unknown"),
        ({"kind": "paint", **EDIT}, 400, "INVALID_ARGUMENT", "kind"),
        ({"kind": "edit", **EDIT, "options": {"steps": 0}}, 400, "INVALID_ARGUMENT", "steps"),
        ({"kind": "edit", **EDIT, "webhookUrl": "ftp://127.0.0.1/x"}, 400, "INVALID_ARGUMENT", "webhook_url"),
        # Refusals only the engine makes (its size limits, prompts' words, mask images, adapters): judged at
        # submit by the runner's check, without running anything.
        ({"kind": "generate", **GENERATE, "height": 8192}, 400, "INVALID_ARGUMENT", "height"),
        ({"kind": "edit", **EDIT, "options": {"blendWords": ["zebra"]}}, 400, "INVALID_ARGUMENT", "zebra"),
        ({"kind": "edit", **EDIT, "options": {"mask": b64(b"not a mask")}}, 400, "INVALID_ARGUMENT", "mask"),
        (
            {"kind": "invert", "image": b64(png()), "options": {"adapters": [{"name": "ink"}]}},
            400,
            "INVALID_ARGUMENT",
            "offers no adapters",
        ),
    ],
    ids=[
        "prompt",
        "image",
        "inversion-id",
        "kind",
        "steps",
        "webhook",
        "size",
        "blend-word",
        "mask",
        "adapters",
    ],
)
def test_bad_submissions_are_refused_at_submit(http, stub, body, status, code, fragment):
    before = http.get("/v1/jobs", params={"limit": 100}, headers=AUTH).json().get("jobs", [])
    response = http.post("/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert response.json()["error"]["status"] == code and fragment in response.json()["error"]["message"]
    after = http.get("/v1/jobs", params={"limit": 100}, headers=AUTH).json().get("jobs", [])
    assert len(after) == len(before)  # nothing was accepted


def test_an_inversion_the_cache_could_never_keep_is_refused_by_the_check(jobs_engine):
    """An invert job whose trajectory and image alone exceed the whole inversion cache is refused at submit
    (RESOURCE_EXHAUSTED, as the run refuses it after the work), and one that fits passes."""
    from fpedit.server.errors import OverloadedError
    from fpedit.server.runner import InvertCall, LocalRunner

    call = InvertCall(png(), EditOptions(steps=2))
    tiny_cache = LocalRunner(jobs_engine, ServerConfig(cache_bytes=10_000))
    try:
        with pytest.raises(OverloadedError, match="exceeds the whole inversion cache") as checked:
            tiny_cache.check(call)
        with pytest.raises(OverloadedError, match="exceeds the whole inversion cache"):
            tiny_cache.invert(call)
        assert "at least" in str(checked.value)
        roomy = LocalRunner(jobs_engine, ServerConfig())
        roomy.check(call)
        assert roomy.invert(call).inversion_id
    finally:
        tiny_cache.close()


def test_job_route_and_rpc_refusals(http, stub):
    assert http.get("/v1/jobs/nope", headers=AUTH).status_code == 404
    assert http.delete("/v1/jobs/nope", headers=AUTH).status_code == 404
    assert http.get("/v1/jobs", params={"limit": 1000}, headers=AUTH).status_code == 400
    for state in ("sleeping", "bogus", "JOB_STATE_BOGUS", "JOB_STATE_UNSPECIFIED"):
        refused = http.get("/v1/jobs", params={"state": state}, headers=AUTH)
        assert refused.status_code == 400 and refused.json()["error"]["status"] == "INVALID_ARGUMENT"
        assert f"got {state!r}" in refused.json()["error"]["message"], refused.text
    assert http.get("/v1/jobs", params={"pageToken": "abc"}, headers=AUTH).status_code == 400
    assert http.get("/v1/jobs").status_code == 401
    assert http.post("/v1/jobs", json={"kind": "edit", **EDIT}).status_code == 401
    cases = [
        (lambda: stub.GetJob(pb.GetJobRequest(id="nope"), metadata=META), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.CancelJob(pb.CancelJobRequest(id="nope"), metadata=META), grpc.StatusCode.NOT_FOUND),
        (lambda: list(stub.WatchJob(pb.GetJobRequest(id="nope"), metadata=META)), grpc.StatusCode.NOT_FOUND),
        (
            lambda: stub.ListJobs(pb.ListJobsRequest(limit=101), metadata=META),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (lambda: stub.SubmitJob(pb.SubmitJobRequest(), metadata=META), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: stub.ListJobs(pb.ListJobsRequest()), grpc.StatusCode.UNAUTHENTICATED),
    ]
    for call, expected in cases:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == expected, caught.value.details()


def test_job_metrics_over_a_real_scrape(running, http):
    http.get("/v1/jobs", headers=AUTH)
    samples = scrape(running.metrics_port)
    jobs = {dict(labels)["state"]: v for (name, labels), v in samples.items() if name == "fpedit_jobs"}
    assert set(jobs) == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert jobs["succeeded"] >= 2 and jobs["cancelled"] >= 2
    assert samples[("fpedit_job_queue_age_seconds", frozenset())] >= 0
    delivered = ("fpedit_webhook_deliveries_total", frozenset({("outcome", "delivered")}))
    failed = ("fpedit_webhook_deliveries_total", frozenset({("outcome", "server_error")}))
    assert samples[delivered] >= 1 and samples[failed] >= 1
    listed = (
        "fpedit_requests_total",
        frozenset({("method", "ListJobs"), ("code", "OK"), ("transport", "http")}),
    )
    assert samples[listed] >= 1
    ran = ("fpedit_requests_total", frozenset({("method", "Edit"), ("code", "OK"), ("transport", "job")}))
    assert samples[ran] >= 1


def test_tokens_restart_and_a_foreign_engine_on_one_state_dir(jobs_engine, tmp_path):
    """In-process restarts on one directory: a job is another token's business only, finished jobs read the
    same after a restart, and inversions another engine wrote are refused by the field that differs."""
    state = tmp_path / "state"

    def start(engine: EditEngine, token: str, **jobs: object):
        config = ServerConfig(port=0, http_port=0, token=token)
        server = build_server(engine, config, JobsConfig(state_dir=state, **jobs))
        return server, httpx.Client(
            base_url=server.http.url, timeout=120, headers={"authorization": f"Bearer {token}"}
        )

    server, http = start(jobs_engine, TOKEN)
    job_id = http.post(
        "/v1/jobs", json={"kind": "invert", "image": b64(png(1)), "options": {"steps": STEPS}}
    ).json()["id"]
    before = wait_job(http, job_id, headers={})
    assert before["state"] == "succeeded"
    inversion = before["invert"]["inversionId"]
    # No secret here: webhooks are refused; a second server on the directory is refused while this one holds it.
    refused = http.post("/v1/jobs", json={"kind": "edit", **EDIT, "webhookUrl": "https://example.com/"})
    assert refused.status_code == 400 and refused.json()["error"]["status"] == "FAILED_PRECONDITION"
    with pytest.raises(InvalidInputError) as caught:
        build_server(jobs_engine, ServerConfig(port=0), JobsConfig(state_dir=state))
    assert "in use by another fpedit server" in str(caught.value)
    http.close()
    server.drain(5)

    server, http = start(jobs_engine, "beta-token", webhook_secret=SECRET)
    assert http.get(f"/v1/jobs/{job_id}").status_code == 404
    assert http.get("/v1/jobs").json().get("jobs", []) == []
    private = http.post("/v1/jobs", json={"kind": "edit", **EDIT, "webhookUrl": "http://127.0.0.1:9/x"})
    assert private.status_code == 400 and "loopback" in private.json()["error"]["message"]
    metadata = http.post("/v1/jobs", json={"kind": "edit", **EDIT, "webhookUrl": "http://169.254.169.254/"})
    assert metadata.status_code == 400 and "link-local" in metadata.json()["error"]["message"]
    http.close()
    server.drain(5)

    other_dir = save_tiny_model(tmp_path / "other-model", seed=8)
    other = EditEngine.from_pretrained(other_dir)
    server, http = start(other, TOKEN)
    after = http.get(f"/v1/jobs/{job_id}").json()
    assert after == before  # readable and unchanged
    edit = http.post("/v1/edit", json={"inversionId": inversion, "targetPrompt": "a boat"})
    assert edit.status_code == 400 and "another weights" in edit.json()["error"]["message"], edit.text
    http.close()
    server.drain(5)


def test_state_dir_mistakes_are_one_line_before_the_model_loads(tmp_path, capsys, no_engine, model_dir):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = run_cli(
        ["serve", "--model", str(model_dir), "--port", "0", "--state-dir", str(foreign)], capsys
    )
    assert code == 2
    assert_one_line(err, "state-dir", "not an fpedit state directory")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "fpedit-state.json").write_text('{"format": "fpedit-state", "version": 1}')
    (corrupt / "jobs.db").write_bytes(b"this is no database" * 100)
    code, err = run_cli(
        ["serve", "--model", str(model_dir), "--port", "0", "--state-dir", str(corrupt)], capsys
    )
    assert code == 2
    assert_one_line(err, "state-dir", "jobs.db is damaged")


def _serve(model_dir: Path, state: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "fpedit.cli", "serve", "--model", str(model_dir), "--port", "0", "--http-port",
            "0", "--state-dir", str(state), "--workers", "1", "--token", TOKEN]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = ""
    for _ in range(3):
        line = proc.stdout.readline()
        if "HTTP/JSON" in line:
            url = line.strip().rsplit(" ", 1)[1]
            break
    if not url:
        proc.kill()
        raise AssertionError(proc.stderr.read())
    return proc, url


def test_kill_9_mid_job_and_restart_on_the_same_state_dir(
    model_dir, jobs_engine, tmp_path, capsys, no_engine
):
    state = tmp_path / "state"
    proc, url = _serve(model_dir, state)
    try:
        with httpx.Client(base_url=url, timeout=120, headers=AUTH) as http:
            # A second server on the directory (in this process: the lock is per open file) is refused.
            argv = ["serve", "--model", str(model_dir), "--port", "0", "--state-dir", str(state)]
            code, err = run_cli(argv, capsys)
            assert code == 2
            assert_one_line(err, "state-dir", "in use by another fpedit server (pid")
            inverted = http.post(
                "/v1/jobs", json={"kind": "invert", "image": b64(png(2)), "options": {"steps": STEPS}}
            )
            finished = wait_job(http, inverted.json()["id"], headers={})
            inversion = finished["invert"]["inversionId"]
            by_id = http.post("/v1/edit", json={"inversionId": inversion, "targetPrompt": "a boat"}).json()
            long_edit = {"image": b64(png(3)), "targetPrompt": "a red car", "options": {"steps": 12}}
            interrupted = http.post("/v1/jobs", json={"kind": "edit", **long_edit}).json()["id"]
            generate = {"sourcePrompt": "a car", "targetPrompt": "a boat", "seed": 11, "height": 64, "width": 64,
                        "options": {"steps": STEPS}}  # fmt: skip
            waiting = http.post("/v1/jobs", json={"kind": "generate", **generate}).json()["id"]
            deadline = time.monotonic() + 60
            while http.get(f"/v1/jobs/{interrupted}").json().get("progress", {}).get("step", 0) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

        # The restart: in this process (one model load fewer), with an engine of the same model and settings.
        restarted = build_server(
            jobs_engine, ServerConfig(port=0, http_port=0, token=TOKEN), JobsConfig(state_dir=state)
        )
        with httpx.Client(base_url=restarted.http.url, timeout=120, headers=AUTH) as http:
            assert http.get(f"/v1/jobs/{finished['id']}").json() == finished
            again = http.post("/v1/edit", json={"inversionId": inversion, "targetPrompt": "a boat"}).json()
            assert np.array_equal(pixels(again["editedImage"]), pixels(by_id["editedImage"]))
            done = wait_job(http, interrupted, headers={})
            assert done["state"] == "succeeded" and done["attempts"] == 2
            uninterrupted = http.post("/v1/edit", json=long_edit).json()
            assert np.array_equal(pixels(done["edit"]["editedImage"]), pixels(uninterrupted["editedImage"]))
            queued = wait_job(http, waiting, headers={})
            fresh = http.post("/v1/generate", json=generate).json()
            assert np.array_equal(pixels(queued["generate"]["editedImage"]), pixels(fresh["editedImage"]))
        restarted.drain(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_client_job_commands(running, stub, tmp_path, capsys):
    from fpedit.cli import main

    request = tmp_path / "generate.json"
    body = {"sourcePrompt": "a car", "targetPrompt": "a boat", "seed": 3, "height": 64, "width": 64,
            "options": {"steps": STEPS}}  # fmt: skip
    request.write_text(json.dumps(body))
    connection = ["--target", f"127.0.0.1:{running.port}", "--token", TOKEN]

    def run(*argv: str) -> tuple[int, dict | None, str]:
        code = main(["client", "job", *argv, *connection])
        captured = capsys.readouterr()
        lines = captured.out.strip().splitlines()
        return code, json.loads(lines[-1]) if lines else None, captured.err

    code, job, _ = run("submit", "generate", "--request", str(request))
    assert code == 0 and job["state"] == "queued" and job["kind"] == "generate"
    code, watched, _ = run("watch", job["id"], "--output-dir", str(tmp_path / "out"))
    assert code == 0 and watched["state"] == "succeeded"
    sync = stub.GenerateEdit(
        pb.GenerateEditRequest(source_prompt="a car", target_prompt="a boat", seed=3, height=64, width=64,
                               options=pb.EditOptions(steps=STEPS)),
        metadata=META,
    )  # fmt: skip
    assert np.array_equal(
        pixels(Path(watched["generate"]["edited_image"]).read_bytes()), pixels(sync.edited_image)
    )
    code, listed, _ = run("list", "--limit", "1")
    assert code == 0 and [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert listed["jobs"][0]["state"] == "succeeded"
    code, listed, _ = run("list", "--state", "succeeded", "--limit", "100")
    assert code == 0 and job["id"] in [j["id"] for j in listed["jobs"]]
    assert {j["state"] for j in listed["jobs"]} == {"succeeded"}
    code, got, _ = run("get", job["id"])
    assert code == 0 and got["state"] == "succeeded"
    assert got["generate"]["edited_image"].endswith("bytes; --output-dir writes it>")
    code, _, err = run("get", "nope")
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = run("list", "--limit", "101")
    assert code == 1 and "INVALID_ARGUMENT" in err
    code, err = run_cli(
        ["client", "job", "cancel", job["id"], "--target", f"127.0.0.1:{running.port}"], capsys
    )
    assert code == 1 and "UNAUTHENTICATED" in err


def test_state_bounds_evict_results_and_inversions_and_forget_old_jobs(jobs_engine, tmp_path):
    state = tmp_path / "state"
    server = build_server(
        jobs_engine,
        ServerConfig(port=0, http_port=0),
        JobsConfig(state_dir=state, state_bytes=1, job_ttl_s=1.0),
    )
    try:
        with httpx.Client(base_url=server.http.url, timeout=120) as http:
            job_id = http.post("/v1/jobs", json={"kind": "edit", **EDIT}).json()["id"]
            job = wait_job(http, job_id, headers={})
            assert job["state"] == "succeeded" and job.get("resultEvicted") is True and "edit" not in job
            assert list((state / "inversions").glob("*.safetensors")) == []  # over the 1-byte bound: evicted
            time.sleep(1.1)
            server.jobs.sweep()
            assert http.get(f"/v1/jobs/{job_id}").status_code == 404  # past --job-ttl: forgotten
            server.servicer.begin_drain()
            draining = http.post("/v1/jobs", json={"kind": "edit", **EDIT})
            assert draining.status_code == 503 and draining.json()["error"]["status"] == "UNAVAILABLE"
    finally:
        server.drain(5)
