"""Ray Serve scale-out: fpedit's gRPC front over two replicas on a real local Ray instance (tiny checkpoint).

One Ray instance and one two-replica application serve the whole module (Ray's start-up dominates the cost).
A standalone server over an in-process engine is the reference for pixels and for status codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import decoded_pixels as pixels
from helpers import json_server_log, make_image, png_bytes, run_concurrently

from fpedit import EditEngine, EditOptions
from fpedit.server.ray.install import local_ray_on_loopback
from fpedit.server.ray.store import (
    BoundedRecords,
    InversionRecord,
    RecordFileError,
    RecordFiles,
    engine_fingerprint,
    fingerprint_of,
    foreign_engine,
    inversion_from_record,
    record_from_inversion,
)

# As `fpedit serve --ray` does before it first imports Ray: the module's local instance keeps to loopback.
local_ray_on_loopback()

pytestmark = pytest.mark.ray

STEPS = 3
REPO = Path(__file__).resolve().parents[2]
TOKEN = "ray-test-token"
RAY_MISSING = "Ray Serve is not installed: pip install 'fpedit[ray]'"


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- without Ray: the store's bounds and the record round trip ----------------------------------------------


def test_bounded_records_evict_by_bytes_and_age():
    now = [0.0]
    records = BoundedRecords(max_bytes=100, ttl_s=10.0, clock=lambda: now[0])
    assert records.put("a", "A", 40) and records.put("b", "B", 40)
    assert records.get("a") == "A"  # a is now the most recently used
    assert records.put("c", "C", 40)  # 120 > 100: the least recently used (b) goes
    assert records.get("b") is None and records.get("a") == "A" and records.get("c") == "C"
    assert records.stats()["bytes"] == 80
    assert not records.put("huge", "H", 101)  # larger than the whole budget: refused, nothing evicted
    assert records.stats()["entries"] == 2
    now[0] = 10.5  # past the TTL of everything put at t = 0
    assert records.get("a") is None
    stats = records.stats()
    assert stats["entries"] == 0 and stats["bytes"] == 0 and stats["evicted"] == 3


def test_record_round_trip_gives_the_same_edit(engine, reference_engine):
    """A replica that rebuilds an inversion from the store (other engine, no maps) edits identically."""
    holder, other = engine, reference_engine
    options = EditOptions(steps=STEPS)
    with torch_threads(1):  # 64 px in a toy model: one thread is fastest, and spares a shared machine
        check_round_trip(holder, other, options)


def check_round_trip(holder: EditEngine, other: EditEngine, options: EditOptions) -> None:
    inversion = holder.invert(make_image(64, 64), options=options)
    first = holder.edit_real(inversion, "a red car", options=options)  # caches the maps on the holder
    again = holder.edit_real(inversion, "a blue car", options=options)
    fingerprint = engine_fingerprint(holder)
    assert fingerprint == engine_fingerprint(other)
    restored = inversion_from_record(other, record_from_inversion(inversion, fingerprint))
    from_store = other.edit_real(restored, "a blue car", options=options)
    assert np.array_equal(pixels(from_store.edited_image), pixels(again.edited_image))
    assert np.array_equal(pixels(from_store.reconstruction_image), pixels(first.reconstruction_image))
    # The rebuilt inversion recomputed the source maps: more UNet rows than the holder's cached re-edit.
    assert from_store.stats["unet_rows"] > again.stats["unet_rows"]


def test_a_record_of_other_weights_in_the_same_folder_is_refused_naming_them(engine, tmp_path):
    """A checkpoint replaced in place (same folder, other weights) must not edit records of the old one: the
    store's engine fields carry the weights digest, and the refusal names it."""
    from fpedit.engine.tiny import save_tiny_model
    from fpedit.server.ray.store import engine_fields

    folder = save_tiny_model(tmp_path / "sd1", seed=1)
    before = EditEngine.from_pretrained(folder)
    inversion = before.invert(make_image(64, 64), options=EditOptions(steps=2))
    old = engine_fields(before)
    record = record_from_inversion(inversion, fingerprint_of(old), old)
    save_tiny_model(folder, seed=2)  # the deploy: new weights where the old ones were
    after = EditEngine.from_pretrained(folder)
    new = engine_fields(after)
    assert new["model"] == old["model"] and new["weights"] != old["weights"]
    assert foreign_engine(record, fingerprint_of(new), new).startswith(
        "made by an engine with another weights"
    )
    assert foreign_engine(record, fingerprint_of(old), old) is None


def test_record_keeps_an_algorithm_3_inversion(engine, reference_engine):
    """A negative-prompt inversion rebuilt on another replica stays one (method, source prompt, per-step
    null embeddings) and edits identically; a record without them would silently edit as DDIM."""
    options = EditOptions(steps=STEPS)
    with torch_threads(1):
        inversion = engine.invert(
            make_image(64, 64), options=options, source_prompt="a red disc", method="negative-prompt"
        )
        holder_edit = engine.edit_real(inversion, "a blue disc", options=options)
        record = pickle.loads(pickle.dumps(record_from_inversion(inversion, "fp")))
        restored = inversion_from_record(reference_engine, record)
        assert (restored.method, restored.source_prompt) == ("negative-prompt", "a red disc")
        assert restored.null_embeddings is not None
        assert np.array_equal(restored.null_embeddings.cpu().numpy(), inversion.null_embeddings.cpu().numpy())
        other_edit = reference_engine.edit_real(restored, "a blue disc", options=options)
    assert np.array_equal(pixels(other_edit.edited_image), pixels(holder_edit.edited_image))
    assert np.array_equal(pixels(other_edit.reconstruction_image), pixels(holder_edit.reconstruction_image))


ENGINE = {"model": "/models/sd15", "backend": "torch", "dtype": "float32", "device": "cpu"}


def a_record(seed: int, algorithm_3: bool) -> InversionRecord:
    """A record as a replica makes one (float32 trajectory, uint8 image), with every optional field set."""
    rng = np.random.default_rng(seed)
    return InversionRecord(
        trajectory=rng.standard_normal((4, 4, 8, 8), dtype=np.float32),
        steps=3,
        image=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        fingerprint=fingerprint_of(ENGINE),
        method="null-text" if algorithm_3 else "ddim",
        source_prompt="a red disc" if algorithm_3 else "",
        null_embeddings=rng.standard_normal((3, 7, 16), dtype=np.float32) if algorithm_3 else None,
        guidance_scale=7.5 if algorithm_3 else None,
        original_size=(70, 65),
        adapters=(("ink", 0.7),) if algorithm_3 else (),
        engine=dict(ENGINE),
    )


def assert_same_record(found: InversionRecord, kept: InversionRecord) -> None:
    for name in ("trajectory", "image", "null_embeddings"):
        ours, theirs = getattr(found, name), getattr(kept, name)
        assert (ours is None) == (theirs is None), name
        if ours is not None:
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), name
    scalars = ("steps", "fingerprint", "method", "source_prompt", "guidance_scale", "original_size",
               "adapters", "engine")  # fmt: skip
    assert {n: getattr(found, n) for n in scalars} == {n: getattr(kept, n) for n in scalars}


def test_store_files_give_back_the_record_exactly_while_younger_than_the_ttl(tmp_path):
    """What the store keeps in a state directory: every field back bit for bit (both methods); an old file
    is a miss and is deleted; an id that is not a safe file name never touches the disk; a file that is not
    a record is refused, without the server's path in the reason."""
    from safetensors.numpy import save as safetensors_save

    now = [time.time()]
    files = RecordFiles(tmp_path, ttl_s=60.0, clock=lambda: now[0])
    for seed, algorithm_3 in ((1, False), (2, True)):
        kept = a_record(seed, algorithm_3)
        files.save(f"id{seed}", kept)
        assert_same_record(files.load(f"id{seed}")[0], kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id1.safetensors", "id2.safetensors"]
    assert files.load("id3") is None
    files.save("../escape", a_record(3, False))
    assert files.load("../escape") is None and not (tmp_path.parent / "escape.safetensors").exists()
    now[0] += 61
    assert files.load("id1") is None and not (tmp_path / "id1.safetensors").exists()
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RecordFileError, match="damaged") as damaged:
        RecordFiles(tmp_path, ttl_s=60.0).load("bad")
    assert str(tmp_path) not in str(damaged.value)
    # A standalone server's saved inversion (same container and suffix) is not taken for a record.
    saved = safetensors_save(
        {"trajectory": np.zeros((2, 4, 8, 8), np.float32)}, {"format": "fpedit-inversion"}
    )
    (tmp_path / "standalone.safetensors").write_bytes(saved)
    with pytest.raises(RecordFileError, match="not a record of the Ray store"):
        RecordFiles(tmp_path, ttl_s=60.0).load("standalone")


def test_the_store_drops_a_damaged_file_and_keeps_a_read_back_record_for_what_is_left_of_its_life(tmp_path):
    """A damaged record file is a miss (NOT_FOUND at the replica: send the image again) and is deleted, not
    refused as the client's mistake on every later read; another server's file is still named. A record read
    back from its file lives in memory only for what its file's age leaves of the TTL."""
    from fpedit.server.ray.store import InversionStore

    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    store = InversionStore(folder=str(tmp_path))
    assert store.get("bad") is None and not (tmp_path / "bad.safetensors").exists()
    files = RecordFiles(tmp_path, ttl_s=60.0)
    files.save("old", a_record(1, False))
    past = time.time() - 50
    os.utime(tmp_path / "old.safetensors", (past, past))
    record, age = files.load("old")
    assert 49 < age < 55
    records = BoundedRecords(10**9, 60.0)
    records.put("old", record, record.nbytes, age)
    assert 5 < records.expires_in("old") <= 11


def test_a_record_of_another_engine_is_refused_naming_the_field():
    kept = a_record(1, False)
    assert foreign_engine(kept, fingerprint_of(ENGINE), ENGINE) is None
    here = {**ENGINE, "dtype": "float16"}
    assert foreign_engine(kept, fingerprint_of(here), here) == (
        "made by an engine with another dtype (float32; this engine: float16)"
    )
    unnamed = dataclasses.replace(kept, engine={})  # no fields to compare: the hash alone says it
    assert foreign_engine(unnamed, fingerprint_of(here), here) == "made by a different model or precision"


def test_serve_ray_without_the_extra_says_how_to_install(monkeypatch, capsys):
    from fpedit.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "--ray", "--replicas", "2", "--port", "0"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"fpedit: error: --ray: {RAY_MISSING}"]


def test_serve_refuses_ray_flags_without_ray(capsys):
    from fpedit.cli import main

    assert main(["serve", "--replicas", "2", "--port", "0"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "fpedit: error: --replicas: --replicas and --ray-address need --ray"
    )


class _FlakyRay:
    """A stand-in for the ``ray`` module whose first ``init`` fails as Ray's does when its GCS misses its wait."""

    def __init__(self, error: str) -> None:
        self.error = error
        self.calls: list[str] = []

    def init(self, address=None, **_init) -> None:
        self.calls.append(f"init {address}")
        if self.calls.count(f"init {address}") == 1:
            raise RuntimeError(self.error)

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def test_a_local_ray_start_that_times_out_is_tried_once_more(monkeypatch, caplog):
    from fpedit.server.ray.deployment import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    timeout = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_ab"
    local = _FlakyRay(timeout)
    init_ray(local, None, {"num_cpus": 1})
    assert local.calls == ["init local", "shutdown", "init local"]
    assert any(
        "did not start" in r.getMessage() and "gcs_server_port" in r.getMessage() for r in caplog.records
    )
    joined = _FlakyRay(timeout)  # a cluster that cannot be reached is not retried
    with pytest.raises(RuntimeError, match="Timed out"):
        init_ray(joined, "10.0.0.5:6379", {})
    assert joined.calls == ["init 10.0.0.5:6379"]
    other = _FlakyRay("some other failure")  # nor is any other start-up error
    with pytest.raises(RuntimeError, match="other failure"):
        init_ray(other, None, {})
    assert other.calls == ["init local"]


def test_serve_on_ray_gives_the_store_the_state_dirs_inversions(monkeypatch, tmp_path):
    """The front claims ``--state-dir`` before Ray starts and opens the store on its inversions folder."""
    from fpedit.engine.config import EngineConfig
    from fpedit.server.config import ServerConfig
    from fpedit.server.jobs.config import JobsConfig
    from fpedit.server.ray import ReplicaSettings, deployment

    started = {}

    def start(settings, **kw):
        started.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(deployment, "require_ray", lambda local: None)
    monkeypatch.setattr(deployment.RayService, "start", start)
    settings = ReplicaSettings(engine=EngineConfig(model="unused"))
    with pytest.raises(RuntimeError, match="stop here"):
        deployment.serve_on_ray(settings, ServerConfig(), jobs=JobsConfig(state_dir=tmp_path / "state"))
    assert started["inversions_dir"] == (tmp_path / "state" / "inversions").resolve()


def test_replica_errors_come_back_as_the_runners_errors():
    """What a replica answers or Ray raises maps to the errors a LocalRunner raises (so: the same codes)."""
    pytest.importorskip("ray.serve", reason=RAY_MISSING)
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from fpedit.engine.errors import (
        DeadlineExceededError,
        InvalidInputError,
        NotFoundError,
    )
    from fpedit.server.errors import OverloadedError, UnavailableError
    from fpedit.server.ray.errors import ReplicaError, translate

    for original in (
        InvalidInputError("steps", "must be in 1..1000"),
        NotFoundError("inversion_id 'x' is unknown"),
        OverloadedError("busy"),
        DeadlineExceededError("deadline passed"),
        MemoryError("out of memory"),
    ):
        carried = pickle.loads(pickle.dumps(ReplicaError.wrap(original)))  # as Ray carries it
        back = carried.unwrap()
        assert type(back) is type(original)
        assert str(back).endswith(str(original).split(": ", 1)[-1])
    assert ReplicaError.wrap(InvalidInputError("steps", "bad")).unwrap().field == "steps"
    bug = KeyError("a bug")
    assert ReplicaError.wrap(bug) is bug  # not an answer: it stays an error (INTERNAL)
    assert isinstance(translate(BackPressureError(64, 64)), OverloadedError)
    assert isinstance(translate(ActorDiedError()), UnavailableError)


# --- on a real local Ray instance ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def ray_service(model_dir, ray_metrics_port):
    pytest.importorskip("ray.serve", reason=RAY_MISSING)
    from fpedit.engine.config import EngineConfig
    from fpedit.server.config import ServerConfig
    from fpedit.server.ray import RayService, ReplicaSettings, replica_server_config

    settings = ReplicaSettings(
        engine=EngineConfig(model=str(model_dir), backend="torch", batching=True),
        server=replica_server_config(ServerConfig(), max_ongoing_requests=4, batching=True),
    )
    service = RayService.start(
        settings,
        replicas=2,
        max_ongoing_requests=4,
        # Logical CPUs for scheduling (one per replica): two replicas, a replacement, a config-file replica.
        ray_init={
            "num_cpus": 4,
            "log_to_driver": False,
            # Ray's per-node metrics export, reported every second (default 10 s) so the scrape test is quick.
            "_metrics_export_port": ray_metrics_port,
            "_system_config": {"metrics_report_interval_ms": 1000},
        },
    )
    yield service
    service.close()


@pytest.fixture(scope="module")
def fronts(ray_service, model_dir):
    """The Ray front and a standalone server, both with a token, on ephemeral loopback ports."""
    from fpedit.server.app import build_server
    from fpedit.server.config import ServerConfig

    ray_front = build_server(ray_service.runner, ServerConfig(port=0, token=TOKEN))
    standalone = build_server(EditEngine.from_pretrained(model_dir), ServerConfig(port=0, token=TOKEN))
    yield {"ray": ray_front, "standalone": standalone}
    ray_front.drain(2)
    standalone.drain(2)


@pytest.fixture
def client(fronts):
    from fpedit.server.client import EditClient

    with EditClient(f"127.0.0.1:{fronts['ray'].port}", token=TOKEN, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference_engine(model_dir):
    return EditEngine.from_pretrained(model_dir)


def wait_for_routing() -> None:
    """Serve learns which replica holds a new id from the replica's report (every 0.1 s) via its controller;
    give that a generous moment so that the next call can be routed by it."""
    time.sleep(1.5)


def threads_like_the_replicas(ray_service) -> contextlib.AbstractContextManager[None]:
    """Run the in-process reference on the replicas' torch thread count: float reductions then add up in the
    same order, so pixels are equal, not merely close."""
    (threads,) = {s["torch_threads"] for s in ray_service.runner.replica_stats()}
    return torch_threads(threads)


def test_results_through_grpc_equal_the_engine(client, reference_engine, ray_service):
    from fpedit.server.client import edit_options

    image = make_image(64, 64)
    options = EditOptions(steps=STEPS)
    response = client.edit("a red car", image=png_bytes(image), options=edit_options(steps=STEPS))
    with threads_like_the_replicas(ray_service):
        local = reference_engine.edit_real(image, "a red car", options=options)
        local_gen = reference_engine.edit_generated("a cat", "a dog", seed=5, options=options)
    assert np.array_equal(pixels(response.edited_image), pixels(local.edited_image))
    assert np.array_equal(pixels(response.reconstruction_image), pixels(local.reconstruction_image))
    assert response.stats.unet_rows == local.stats["unet_rows"]
    assert response.inversion_id

    generated = client.generate("a cat", "a dog", seed=5, options=edit_options(steps=STEPS))
    assert np.array_equal(pixels(generated.edited_image), pixels(local_gen.edited_image))
    assert np.array_equal(pixels(generated.source_image), pixels(local_gen.source_image))

    events = list(client.edit_stream("a red car", image=png_bytes(image), options=edit_options(steps=STEPS)))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress if p.stage == "denoise"] == list(range(1, STEPS + 1))
    assert events[-1].HasField("result")
    assert np.array_equal(pixels(events[-1].result.edited_image), pixels(local.edited_image))

    info = client.info()
    assert info.backend == "torch" and client.health() == "SERVING"


def test_edits_by_id_land_on_the_holder_and_survive_its_death(client, ray_service):
    import ray

    from fpedit.server.client import edit_options

    image = png_bytes(make_image(64, 64, seed=3))
    inverted = client.invert(image, options=edit_options(steps=STEPS))
    holder = inverted.stats.replica
    assert holder.startswith("SERVE_REPLICA::")
    wait_for_routing()
    edits = [client.edit("a blue car", inversion_id=inverted.inversion_id) for _ in range(3)]
    assert [e.stats.replica for e in edits] == [holder] * 3
    assert all(e.inversion_id == inverted.inversion_id for e in edits)
    # The holder kept the source maps after the first edit: later edits run the target branch only.
    assert edits[1].stats.unet_rows < edits[0].stats.unet_rows
    assert np.array_equal(pixels(edits[0].edited_image), pixels(edits[2].edited_image))

    restores_before = sum(s["restores"] for s in ray_service.runner.replica_stats())
    ray.kill(ray.get_actor(holder, namespace="serve"), no_restart=True)
    after = client.edit("a blue car", inversion_id=inverted.inversion_id)
    assert after.stats.replica != holder
    assert np.array_equal(pixels(after.edited_image), pixels(edits[0].edited_image))
    assert np.array_equal(pixels(after.reconstruction_image), pixels(edits[0].reconstruction_image))
    # It was rebuilt from the shared store: maps recomputed (as many rows as the holder's first edit).
    assert after.stats.unet_rows == edits[0].stats.unet_rows
    assert sum(s["restores"] for s in ray_service.runner.replica_stats()) == restores_before + 1


def bad_calls(stub, image: bytes, token: str | None):
    """(case, call) pairs of requests the service must refuse."""
    from fpedit.v1 import edit_pb2 as pb

    md = (("authorization", f"Bearer {token}"),) if token else ()
    opts = {"metadata": md, "timeout": 60}
    return [
        ("empty prompt", lambda: stub.Edit(pb.EditRequest(image=image, target_prompt=""), **opts)),
        (
            "image and id",
            lambda: stub.Edit(pb.EditRequest(image=image, inversion_id="x", target_prompt="a"), **opts),
        ),
        (
            "corrupt image",
            lambda: stub.Edit(pb.EditRequest(image=b"not an image", target_prompt="a"), **opts),
        ),
        (
            "steps 0",
            lambda: stub.Invert(pb.InvertRequest(image=image, options=pb.EditOptions(steps=0)), **opts),
        ),
        (
            "unknown id",
            lambda: stub.Edit(pb.EditRequest(inversion_id="0" * 32, target_prompt="a"), **opts),
        ),
        (
            "unknown id, stream",
            lambda: list(stub.EditStream(pb.EditRequest(inversion_id="0" * 32, target_prompt="a"), **opts)),
        ),
    ]


EXPECTED_CODES = {
    "empty prompt": grpc.StatusCode.INVALID_ARGUMENT,
    "image and id": grpc.StatusCode.INVALID_ARGUMENT,
    "corrupt image": grpc.StatusCode.INVALID_ARGUMENT,
    "steps 0": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown id": grpc.StatusCode.NOT_FOUND,
    "unknown id, stream": grpc.StatusCode.NOT_FOUND,
    "missing token": grpc.StatusCode.UNAUTHENTICATED,
}


def codes_of(port: int) -> dict[str, grpc.StatusCode]:
    from fpedit.v1 import edit_pb2 as pb
    from fpedit.v1 import edit_pb2_grpc

    image = png_bytes(make_image(64, 64))
    codes = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = edit_pb2_grpc.EditServiceStub(channel)
        calls = [*bad_calls(stub, image, TOKEN)]
        calls.append(("missing token", lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=30)))
        for case, call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            codes[case] = caught.value.code()
    return codes


def test_errors_have_the_standalone_servers_codes(fronts):
    ray_codes = codes_of(fronts["ray"].port)
    assert ray_codes == EXPECTED_CODES
    assert codes_of(fronts["standalone"].port) == ray_codes


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
def test_deadline_stops_the_replicas_work(client, ray_service, streamed):
    from fpedit.server.client import edit_options

    def cancelled() -> int:
        return sum(s["cancelled"] for s in ray_service.runner.replica_stats())

    before = cancelled()
    image = png_bytes(make_image(64, 64, seed=9))
    with pytest.raises(grpc.RpcError) as caught:
        if streamed:  # the front cancels Serve's stream; the replica's generator stops the engine
            list(
                client.edit_stream("a green car", image=image, options=edit_options(steps=1000), timeout=1.0)
            )
        else:
            client.edit("a green car", image=image, options=edit_options(steps=1000), timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The replica's engine stopped at a cancel check (a finished edit would not count as cancelled).
    deadline = time.monotonic() + 60
    while cancelled() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled() == before + 1
    assert client.edit("a green car", image=image, options=edit_options(steps=STEPS)).edited_image


def wait_until_running(app_name: str, limit_s: float = 240) -> None:
    """`serve run --non-blocking` only submits the config; the application builds and starts afterwards."""
    from ray import serve

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            pytest.fail(f"{app_name} failed to deploy: {status.message}")
        time.sleep(0.5)
    pytest.fail(f"{app_name} not running after {limit_s} s: {serve.status().applications.get(app_name)}")


def test_config_file_runs_with_rays_tooling(ray_service, model_dir, tmp_path):
    """deploy/ray-serve.yaml through `serve run`: the gRPC front deployment serves edits, health and auth.

    Only what depends on this machine changes: the app's name (the module's app is "fpedit"), the model,
    an ephemeral port and a token. The deployments section (autoscaling, max_ongoing_requests) is the file's.
    """
    import ray
    import yaml
    from ray import serve

    from fpedit.server.client import EditClient, edit_options

    config = yaml.safe_load((REPO / "deploy" / "ray-serve.yaml").read_text())
    (app,) = config["applications"]
    app["name"] = "fpedit-config"
    app["args"].update(model=str(model_dir), backend="torch", host="127.0.0.1", port=0)
    app["runtime_env"]["env_vars"]["FPEDIT_TOKEN"] = TOKEN
    path = tmp_path / "ray-serve.yaml"
    path.write_text(yaml.safe_dump(config))
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-m", "ray.serve.scripts", "run", "--non-blocking", "--address", address, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        wait_until_running("fpedit-config")
        port = serve.get_app_handle("fpedit-config").port.remote().result(timeout_s=60)
        with EditClient(f"127.0.0.1:{port}", token=TOKEN, timeout=120) as client:
            # The front learns that its replicas run from its own probe (every second), after Serve does.
            deadline = time.monotonic() + 15
            while client.health() != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.health() == "SERVING"
            response = client.edit(
                "a red car", image=png_bytes(make_image(64, 64)), options=edit_options(steps=2)
            )
            assert response.stats.replica.startswith("SERVE_REPLICA::fpedit-config#EditReplica#")
        with EditClient(f"127.0.0.1:{port}", timeout=30) as anonymous, pytest.raises(grpc.RpcError) as caught:
            anonymous.info()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        serve.delete("fpedit-config")


def test_per_replica_metrics_reach_rays_export(client, ray_metrics_port):
    """The replica's own counters, tagged with its replica id, on a real HTTP scrape of Ray's metrics export."""
    from prometheus_client.parser import text_string_to_metric_families

    from fpedit.server.client import edit_options

    inverted = client.invert(png_bytes(make_image(64, 64, seed=11)), options=edit_options(steps=2))
    replica_tag = inverted.stats.replica.rsplit("#", 1)[-1]

    def inverts_counted() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=10).read()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text.decode())
            for sample in family.samples
            if sample.name == "ray_fpedit_replica_requests_total"
            and sample.labels.get("replica") == replica_tag
            and sample.labels.get("method") == "invert"
            and sample.labels.get("outcome") == "ok"
        )

    deadline = time.monotonic() + 60  # exported every second; allow for a loaded machine
    while inverts_counted() < 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert inverts_counted() >= 1


def test_concurrent_edits_by_id_batch_on_the_holder(client, ray_service):
    """Affinity and batching together: concurrent re-edits of one inversion all run on its holder, whose
    batching engine merges their UNet calls (max_ongoing_requests lets them run at once)."""
    import inspect

    from fpedit.server.client import edit_options

    if "batching" not in inspect.signature(EditEngine.__init__).parameters:
        pytest.skip("this engine has no batching executor")
    inverted = client.invert(png_bytes(make_image(64, 64, seed=21)), options=edit_options(steps=20))
    holder = inverted.stats.replica

    def holder_batches() -> dict[int, int]:
        (stats,) = [s for s in ray_service.runner.replica_stats() if s["name"] == holder]
        return {int(rows): calls for rows, calls in stats["engine"]["batch_rows"].items()}

    wait_for_routing()
    # A first edit captures the source maps (capture calls hold many rows by themselves) and caches them.
    assert client.edit("a car", inversion_id=inverted.inversion_id).stats.replica == holder
    before = holder_batches()
    prompts = ["a red car", "a blue car", "a green car"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        edits = list(pool.map(lambda p: client.edit(p, inversion_id=inverted.inversion_id), prompts))
    assert {e.stats.replica for e in edits} == {holder}
    after = holder_batches()
    merged = {rows: after[rows] - before.get(rows, 0) for rows in after if rows > 2}
    # A re-edit with cached maps calls the UNet with 2 rows (unconditional + conditional target) per step:
    # a call with more rows ran several requests at once.
    assert sum(merged.values()) > 0, (before, after)


# --- issue 16: the Ray front's metrics, health under a burst, admission, unknown ids -------------------------


def test_front_metrics_scrape_after_real_work(ray_service):
    """Item 1: the Ray front's /metrics answered HTTP 500 (batch sizes summed as integers); now it answers
    before any work and after it, with the counters moved by the calls made."""
    from helpers import scrape, value

    from fpedit.server.app import build_server
    from fpedit.server.client import EditClient, edit_options
    from fpedit.server.config import ServerConfig

    front = build_server(ray_service.runner, ServerConfig(port=0, metrics_port=0))
    try:
        before = scrape(front.metrics_port)  # asserts HTTP 200
        with EditClient(f"127.0.0.1:{front.port}", timeout=120) as c:
            inverted = c.invert(png_bytes(make_image(64, 64, seed=31)), options=edit_options(steps=2))
            edited = c.edit(
                "a red car", image=png_bytes(make_image(64, 64, seed=32)), options=edit_options(steps=2)
            )
        after = scrape(front.metrics_port)
    finally:
        front.drain(2)
    assert inverted.inversion_id and edited.edited_image
    for method in ("Invert", "Edit"):
        assert value(after, "fpedit_requests_total", method=method, code="OK", transport="grpc") == 1
    calls = value(after, "fpedit_backend_unet_calls_total") - value(before, "fpedit_backend_unet_calls_total")
    assert calls >= edited.stats.unet_calls + inverted.stats.unet_calls > 0
    # The batch-size histogram counts every backend call once, summed over the replicas.
    assert value(after, "fpedit_backend_batch_rows_count") == value(after, "fpedit_backend_unet_calls_total")
    assert value(after, "fpedit_backend_batch_rows_sum") == value(after, "fpedit_backend_unet_rows_total")


def test_health_answers_within_200_ms_during_a_48_client_burst(ray_service):
    """Item 2: 48 clients at once against a Ray front admitting 8 running + 4 queued calls; health is polled
    with a 200 ms deadline throughout and never misses; the calls beyond admission are refused at once
    (RESOURCE_EXHAUSTED), and GetInfo reports the admission the front applies."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fpedit.server.app import build_server
    from fpedit.server.config import ServerConfig
    from fpedit.server.ray import RayRunner
    from fpedit.v1 import edit_pb2 as pb
    from fpedit.v1 import edit_pb2_grpc

    shared = ray_service.runner
    runner = RayRunner(shared.handle, shared.store, max_running=8, max_queue=4)
    front = build_server(runner, ServerConfig(port=0, max_queue=4))
    image = png_bytes(make_image(64, 64, seed=41))
    stop = threading.Event()
    checks: list[str] = []

    def poll_health() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=0.2).status
                    checks.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
                except grpc.RpcError as exc:
                    checks.append(exc.code().name)
                time.sleep(0.05)

    def one_edit(i: int) -> grpc.StatusCode:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            stub = edit_pb2_grpc.EditServiceStub(channel)
            request = pb.EditRequest(
                image=image,
                target_prompt=f"car {i}",
                options=pb.EditOptions(steps=2),
                skip_reconstruction=True,
            )
            try:
                stub.Edit(request, timeout=300)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

    poller = threading.Thread(target=poll_health, daemon=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            limits = edit_pb2_grpc.EditServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=60).limits
        assert (limits.workers, limits.max_queue) == (8, 4)
        poller.start()
        with ThreadPoolExecutor(48) as pool:
            codes = list(pool.map(one_edit, range(48)))
    finally:
        stop.set()
        poller.join(10)
        front.drain(5)
    assert len(checks) >= 5
    assert checks == ["SERVING"] * len(checks), checks
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) >= 8 and grpc.StatusCode.RESOURCE_EXHAUSTED in codes


def test_unknown_inversion_id_is_a_client_error_in_the_replica_logs(client):
    """Item 10: an unknown id was raised from Serve's multiplexed loader, which logs it at ERROR as a model
    that failed to load; now it is a NOT_FOUND answer and no replica logs it as a failure."""
    import uuid

    import ray

    unknown = uuid.uuid4().hex
    with pytest.raises(grpc.RpcError) as caught:
        client.edit("a car", inversion_id=unknown)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    time.sleep(1.0)  # replica log lines are flushed to their files asynchronously
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    mentions = [
        line
        for path in logs.rglob("*.log")
        for line in path.read_text(errors="replace").splitlines()
        if unknown in line and ("ERROR" in line or "Failed to load" in line)
    ]
    assert mentions == []


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_a_local_ray_listens_on_loopback_but_for_serves_replica_servers(ray_service):
    """Issue 16 item 6: a local Ray instance listened on every interface (GCS, raylet, workers) and on the
    machine's outside address (agents). Now fpedit's own ports and every Ray process of this instance listen on
    loopback, except what Ray 2.60 hard-codes: each Serve replica's internal gRPC server on ``[::]:0``."""
    import psutil

    from fpedit.server.app import build_server
    from fpedit.server.config import ServerConfig

    front = build_server(ray_service.runner, ServerConfig(port=0, metrics_port=0, http_port=0))
    try:
        me = psutil.Process()
        tree = {me.pid} | {child.pid for child in me.children(recursive=True)}  # this test's Ray instance
        listening = [
            c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in tree
        ]
        ours = {c.laddr.port: c.laddr.ip for c in listening if c.pid == me.pid}
        for port in (front.port, front.metrics_port, front.http.port):
            assert is_loopback(ours[port]), f"fpedit's port {port} listens on {ours[port]}"
        outside = []
        for c in listening:
            if is_loopback(c.laddr.ip):
                continue
            command = "?"
            with contextlib.suppress(psutil.Error):
                command = " ".join(psutil.Process(c.pid).cmdline())
            outside.append((c.laddr.ip, c.laddr.port, command[:80]))
        assert len({c.pid for c in listening}) >= 4  # the driver, GCS, raylet, workers: the scan saw them
        hard_coded = [
            o for o in outside if ipaddress.ip_address(o[0]).is_unspecified and "ServeReplica" in o[2]
        ]
        assert outside == hard_coded, f"listening outside loopback: {sorted(set(outside) - set(hard_coded))}"
    finally:
        front.drain(2)


@pytest.mark.parametrize(
    ("host", "node"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),  # a wildcard front: Ray still keeps to loopback
        ("::", "127.0.0.1"),
        ("localhost", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),  # a front on one outside address: Ray's node address is that one
    ],
)
def test_a_local_ray_takes_its_node_address_from_the_fronts_host(host, node):
    from fpedit.server.ray.deployment import local_node_address

    assert local_node_address(host) == node


def test_http_front_serves_the_ray_runner_like_grpc(ray_service):
    """Issue 20: `--http-port` with `--ray`: the HTTP/JSON front sits on the same (Ray) runner as gRPC, so an
    edit by JSON equals the same edit over gRPC, and the maps route (local runner only) answers 501."""
    import base64
    import io

    import httpx
    from PIL import Image

    from fpedit.server.app import build_server
    from fpedit.server.client import EditClient, edit_options
    from fpedit.server.config import ServerConfig

    image = png_bytes(make_image(64, 64, seed=41))
    front = build_server(ray_service.runner, ServerConfig(port=0, http_port=0))
    try:
        with EditClient(f"127.0.0.1:{front.port}", timeout=120) as grpc_client:
            over_grpc = grpc_client.edit("a red car", image=image, options=edit_options(steps=2))
        with httpx.Client(base_url=front.http.url, timeout=120) as http:
            body = {
                "image": base64.b64encode(image).decode(),
                "targetPrompt": "a red car",
                "options": {"steps": 2},
            }
            response = http.post("/v1/edit", json=body)
            maps = http.post("/v1/maps", json={"prompt": "a red car"})
    finally:
        front.drain(2)
    assert response.status_code == 200, response.text

    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    assert np.array_equal(
        pixels(base64.b64decode(response.json()["editedImage"])), pixels(over_grpc.edited_image)
    )
    assert response.json()["stats"].get("replica")
    assert maps.status_code == 501 and maps.json()["error"]["status"] == "UNIMPLEMENTED"


# --- issue 26 item 5: a stream refused for load ------------------------------------------------------------


def test_a_stream_refused_by_serves_queue_is_resource_exhausted_with_one_log_line(ray_service):
    """A burst of EditStream calls beyond a deployment's ``max_queued_requests``: Serve refuses the excess
    (BackPressureError), and each refused stream ends RESOURCE_EXHAUSTED with one request log line and no
    traceback, as unary Edit does. Before, cancelling the failed Serve stream raised the BackPressureError
    again over the mapped error: INTERNAL and two tracebacks per call."""
    from ray import serve

    from fpedit.server.app import build_server
    from fpedit.server.config import ServerConfig
    from fpedit.server.ray import RayRunner, replica_deployment
    from fpedit.v1 import edit_pb2 as pb
    from fpedit.v1 import edit_pb2_grpc

    # One replica running one request with one waiting: Serve itself refuses the rest. The front admits
    # everything (a large capacity), so the refusals come from Serve, not from the front's admission.
    app = replica_deployment(ray_service.settings, replicas=1, max_ongoing_requests=1, max_queued_requests=1)
    handle = serve.run(app, name="fpedit-burst", route_prefix=None)
    front = build_server(RayRunner(handle, max_running=100, max_queue=100), ServerConfig(port=0))
    image = png_bytes(make_image(64, 64, seed=51))

    def one_stream(i: int, steps: int = 2, started: threading.Event | None = None) -> grpc.StatusCode:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            request = pb.EditRequest(
                image=image, target_prompt=f"car {i}", options=pb.EditOptions(steps=steps)
            )
            try:
                for _ in edit_pb2_grpc.EditServiceStub(channel).EditStream(request, timeout=120):
                    if started is not None:
                        started.set()
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

    try:
        with json_server_log() as entries:
            # A long stream holds the one replica (its first message says it runs), then a burst arrives:
            # one of it may wait in Serve's queue, the rest are refused.
            running = threading.Event()
            pool = ThreadPoolExecutor(1)
            holder = pool.submit(one_stream, 0, 30, running)
            assert running.wait(60), "the holding stream never started"
            codes = run_concurrently([lambda i=i: one_stream(i) for i in range(1, 7)], timeout_s=120)
            codes.append(holder.result(timeout=120))
            pool.shutdown()
    finally:
        front.drain(5)
        serve.delete("fpedit-burst")
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused >= 1 and codes.count(grpc.StatusCode.OK) >= 1, codes
    stream_lines = [e for e in entries if e.get("method") == "EditStream"]
    assert sorted(e["status"] for e in stream_lines) == sorted(c.name for c in codes)
    assert [e for e in entries if "exception" in e or e["level"] == "ERROR"] == []


# --- issue 28 item 4: jobs on Ray (the front owns the table and the state directory) -----------------------


def test_a_job_through_the_ray_front_equals_the_synchronous_edit_and_outlives_a_front_restart(
    ray_service, tmp_path
):
    """A job submitted over HTTP to a Ray front with ``--state-dir`` runs on a replica (as a synchronous call
    does) and its result equals the synchronous edit's; a new front on the same DIR serves the finished job."""
    import base64

    import httpx

    from fpedit.server.app import build_server
    from fpedit.server.client import EditClient, edit_options
    from fpedit.server.config import ServerConfig
    from fpedit.server.jobs.config import JobsConfig

    image = png_bytes(make_image(64, 64, seed=61))
    jobs = JobsConfig(state_dir=tmp_path / "state")
    body = {"kind": "edit", "image": base64.b64encode(image).decode(), "targetPrompt": "a red car",
            "options": {"steps": 2}}  # fmt: skip

    def wait_job(http: httpx.Client, job_id: str) -> dict:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish: {job}")

    front = build_server(ray_service.runner, ServerConfig(port=0, http_port=0), jobs)
    try:
        with EditClient(f"127.0.0.1:{front.port}", timeout=120) as grpc_client:
            sync = grpc_client.edit("a red car", image=image, options=edit_options(steps=2))
        with httpx.Client(base_url=front.http.url, timeout=120) as http:
            submitted = http.post("/v1/jobs", json=body)
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            job = wait_job(http, job_id)
    finally:
        front.drain(5)
    assert job["state"] == "succeeded", job
    assert np.array_equal(pixels(base64.b64decode(job["edit"]["editedImage"])), pixels(sync.edited_image))
    assert np.array_equal(
        pixels(base64.b64decode(job["edit"]["reconstructionImage"])), pixels(sync.reconstruction_image)
    )

    restarted = build_server(ray_service.runner, ServerConfig(port=0, http_port=0), jobs)
    try:
        with httpx.Client(base_url=restarted.http.url, timeout=30) as http:
            again = http.get(f"/v1/jobs/{job_id}").json()
    finally:
        restarted.drain(2)
    assert again["state"] == "succeeded"
    assert again["edit"]["editedImage"] == job["edit"]["editedImage"]


class _CheckAnswer:
    """What ``handle.check.remote`` gives back: a timeout, an exception, or a value (Serve's response API)."""

    def __init__(self, outcome) -> None:
        self.outcome, self.cancelled = outcome, False

    def result(self, timeout_s=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class _CheckHandle:
    def __init__(self, outcome) -> None:
        self.answer = _CheckAnswer(outcome)
        self.routed_by: list[str] = []
        self.check = self
        self.sent = 0

    def remote(self, call):
        self.sent += 1
        return self.answer

    def options(self, multiplexed_model_id: str = ""):
        self.routed_by.append(multiplexed_model_id)
        return self


def test_the_front_lets_a_job_through_unjudged_only_when_no_replica_answers():
    """The front's policy around a replica's check (no Ray needed): a refusal is raised as its own type, a
    timeout (every replica busy), a full queue or a lost replica let the job through to be judged as it runs,
    and an edit by id is routed by its id."""
    from ray.serve.exceptions import BackPressureError

    from fpedit.engine.errors import InvalidInputError
    from fpedit.server.ray import front
    from fpedit.server.ray.errors import ReplicaError
    from fpedit.server.ray.front import RayRunner
    from fpedit.server.runner import EditCall, GenerateCall

    generate = GenerateCall("a cat", "a dog", EditOptions(steps=2))
    by_id = EditCall("a dog", EditOptions(steps=2), steps_given=False, inversion_id="abc")
    refused = _CheckHandle(ReplicaError("InvalidInputError", "must be at most 1024, got 8192", "height"))
    with pytest.raises(InvalidInputError, match="8192") as info:
        RayRunner(refused).check(generate)
    assert info.value.field == "height"
    assert RayRunner(_CheckHandle(None)).check(generate) is None
    busy = _CheckHandle(TimeoutError())
    assert RayRunner(busy).check(by_id) is None and busy.answer.cancelled
    assert busy.routed_by == ["abc"]
    back_pressure = BackPressureError(num_queued_requests=4, max_queued_requests=4)
    assert RayRunner(_CheckHandle(back_pressure)).check(generate) is None
    # Every replica slot taken by calls this front admitted, or MAX_CHECKS checks out already: let through at
    # once, nothing sent (a refusal would have been raised had the check gone out).
    full = RayRunner(refused, max_running=2, max_queue=1)
    full._in_flight = 2
    assert full.check(generate) is None
    crowded = RayRunner(refused)
    for _ in range(front.MAX_CHECKS):
        crowded._checks.acquire()
    assert crowded.check(generate) is None
    assert refused.sent == 1  # only the first check above went out


def test_the_ray_front_refuses_bad_jobs_at_submit(ray_service):
    """The front has no engine: a replica judges each job as it is submitted (an edit by id on the replica
    holding it), so a bad image, an unknown inversion id and a size the engine refuses are answered at once
    with the synchronous call's status, and nothing is queued."""
    import base64

    import httpx

    from fpedit.server.app import build_server
    from fpedit.server.config import ServerConfig

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    refusals = [
        ({"kind": "edit", "image": b64(b"not an image"), "targetPrompt": "a car"}, 400, "image"),
        ({"kind": "edit", "inversionId": "f" * 32, "targetPrompt": "a car"}, 404, "unknown"),
        ({"kind": "generate", "sourcePrompt": "a cat", "targetPrompt": "a dog", "height": 8192}, 400, "height"),
        ({"kind": "invert", "image": b64(png_bytes(make_image(64, 64))), "options": {"steps": 2,
          "mask": b64(b"junk"), "adapters": [{"name": "ink"}]}}, 400, "adapters"),
    ]  # fmt: skip
    front = build_server(ray_service.runner, ServerConfig(port=0, http_port=0))
    try:
        with httpx.Client(base_url=front.http.url, timeout=60) as http:
            for body, status, fragment in refusals:
                response = http.post("/v1/jobs", json=body)
                assert response.status_code == status, (body["kind"], response.text)
                assert fragment in response.json()["error"]["message"], response.text
            assert http.get("/v1/jobs").json().get("jobs", []) == []  # nothing was accepted
    finally:
        front.drain(2)


def test_inversion_ids_outlive_a_restart_of_a_ray_front_with_a_state_dir(ray_service, tmp_path):
    """``--ray --state-dir DIR``: the store keeps each inversion as a file in DIR, so an id issued before a
    restart edits after it and gives the same image. The restart: the front stops (DIR released), the store
    is killed (its memory gone) and a new one opened on DIR, the replica holding the inversion is killed, and
    a new front claims DIR; only the other replica, which never saw the id, is left to serve it (a second
    application start would cost ~10 s; the module's Ray instance is shared). A record of another engine is
    refused naming the field, as a standalone server refuses one; DIR's byte bound sweeps the store's files
    as it sweeps saved inversions."""
    import ray

    from fpedit.server.app import build_server
    from fpedit.server.client import EditClient, edit_options
    from fpedit.server.config import ServerConfig
    from fpedit.server.jobs.config import JobsConfig
    from fpedit.server.jobs.state import open_state
    from fpedit.server.ray import RayService
    from fpedit.server.ray.store import close_store, open_store

    state_dir = tmp_path / "state"
    settings = dataclasses.replace(ray_service.settings, store_name="fpedit-restart-store")
    state = open_state(state_dir)
    service = RayService.start(
        settings,
        replicas=2,
        max_ongoing_requests=4,
        app_name="fpedit-restart",
        inversions_dir=state.inversions,
    )
    try:
        front = build_server(service.runner, ServerConfig(port=0), JobsConfig(state_dir=state_dir), state)
        try:
            with EditClient(f"127.0.0.1:{front.port}", timeout=120) as client:
                inverted = client.invert(
                    png_bytes(make_image(64, 64, seed=71)), options=edit_options(steps=STEPS)
                )
                wait_for_routing()
                before = client.edit("a blue car", inversion_id=inverted.inversion_id)
        finally:
            front.drain(2)  # releases DIR
        holder = inverted.stats.replica
        assert before.stats.replica == holder  # the other replica never held the id
        close_store(settings.store_name, settings.store_namespace)
        ray.kill(ray.get_actor(holder, namespace="serve"), no_restart=True)
        state = open_state(state_dir)
        open_store(
            settings.store_name, settings.store_namespace, ttl_s=settings.store_ttl_s, folder=state.inversions
        )
        files = RecordFiles(state.inversions, settings.store_ttl_s)
        found = files.load(inverted.inversion_id)
        assert found is not None
        record = found[0]
        assert record.engine
        foreign = {**record.engine, "dtype": "float16"}
        files.save("f" * 32, dataclasses.replace(record, engine=foreign, fingerprint=fingerprint_of(foreign)))
        front = build_server(service.runner, ServerConfig(port=0), JobsConfig(state_dir=state_dir), state)
        try:
            with EditClient(f"127.0.0.1:{front.port}", timeout=120) as client:
                after = client.edit("a blue car", inversion_id=inverted.inversion_id)
                with pytest.raises(grpc.RpcError) as refused:
                    client.edit("a blue car", inversion_id="f" * 32)
            front.jobs.config = dataclasses.replace(front.jobs.config, state_bytes=1)
            front.jobs.sweep()
            left = list(state.inversions.iterdir())
        finally:
            front.drain(2)
    finally:
        service.close()  # deletes the application and the store
    assert after.stats.replica != holder
    assert np.array_equal(pixels(after.edited_image), pixels(before.edited_image))
    assert np.array_equal(pixels(after.reconstruction_image), pixels(before.reconstruction_image))
    assert after.stats.unet_rows == before.stats.unet_rows  # rebuilt from DIR: the maps recomputed
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    assert f"another dtype (float16; this engine: {record.engine['dtype']})" in details, details
    assert left == []


# --- issue 29 item 5: adapters on Ray (every replica loads the same --lora-dir) -----------------------------


def test_adapters_travel_with_the_request_to_replicas_of_one_lora_dir(
    ray_service, model_dir, raw_modules, tmp_path
):
    """A deployment whose replicas load ``lora_dir``: GetInfo lists its adapter, an edit with ``adapters``
    through the Ray front equals the same edit on a local engine of that folder, and an unknown adapter is
    INVALID_ARGUMENT."""
    import dataclasses

    from lora_files import random_factors, unet_targets, write_peft_lora
    from ray import serve

    from fpedit.server.app import build_server
    from fpedit.server.config import ServerConfig
    from fpedit.server.ray import RayRunner, replica_deployment
    from fpedit.v1 import edit_pb2 as pb
    from fpedit.v1 import edit_pb2_grpc

    folder = tmp_path / "loras"
    folder.mkdir()
    write_peft_lora(folder / "ink.safetensors", random_factors(unet_targets(raw_modules["unet"]), 21), 2.0)
    engine = dataclasses.replace(ray_service.settings.engine, lora_dir=str(folder))
    settings = dataclasses.replace(ray_service.settings, engine=engine)
    handle = serve.run(
        replica_deployment(settings, replicas=1, max_ongoing_requests=4),
        name="fpedit-adapters",
        route_prefix=None,
    )
    runner = RayRunner(handle)
    front = build_server(runner, ServerConfig(port=0))
    chosen = (("ink", 0.7),)
    request = pb.GenerateEditRequest(
        source_prompt="a cat", target_prompt="a dog", seed=11, width=64, height=64,
        options=pb.EditOptions(steps=STEPS, adapters=[pb.Adapter(name="ink", scale=0.7)]),
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            stub = edit_pb2_grpc.EditServiceStub(channel)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=60)
            over_ray = stub.GenerateEdit(request, timeout=120)
            del request.options.adapters[:]
            request.options.adapters.append(pb.Adapter(name="watercolor"))
            with pytest.raises(grpc.RpcError) as unknown:
                stub.GenerateEdit(request, timeout=120)
        (threads,) = {s["torch_threads"] for s in runner.replica_stats()}
    finally:
        front.drain(2)
        serve.delete("fpedit-adapters")
    local_engine = EditEngine.from_pretrained(model_dir, lora_dir=folder)
    with torch_threads(threads):
        local = local_engine.edit_generated(
            "a cat", "a dog", seed=11, height=64, width=64, options=EditOptions(steps=STEPS, adapters=chosen)
        )
        plain = local_engine.edit_generated(
            "a cat", "a dog", seed=11, height=64, width=64, options=EditOptions(steps=STEPS)
        )
    assert [(a.name, a.rank) for a in info.adapters] == [("ink", 4)]
    assert np.array_equal(pixels(over_ray.edited_image), pixels(local.edited_image))
    assert not np.array_equal(pixels(over_ray.edited_image), pixels(plain.edited_image))
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown adapter 'watercolor'" in unknown.value.details(), unknown.value.details()
