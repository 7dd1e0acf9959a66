"""The gRPC service against a real server on 127.0.0.1 (ephemeral ports) with a small checkpoint."""

from __future__ import annotations

import io
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import decoded_pixels as decode
from helpers import make_image, png_bytes, self_signed_cert, serving_engine
from PIL import Image

from fpedit import EditEngine, EditOptions
from fpedit.server.app import build_server
from fpedit.server.client import EditClient, edit_options
from fpedit.server.service import ServerConfig

STEPS = 6


@pytest.fixture(scope="module")
def server_engine(model_dir):
    return serving_engine(model_dir)


@pytest.fixture(scope="module")
def running(server_engine):
    server = build_server(server_engine, ServerConfig(port=0, workers=1, max_queue=8))
    yield server
    server.drain(5)


@pytest.fixture
def client(running):
    with EditClient(f"127.0.0.1:{running.port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference_engine(model_dir):
    """A separate in-process engine: the server's results must equal its results."""
    return EditEngine.from_pretrained(model_dir)


def test_edit_equals_in_process_engine(client, reference_engine):
    image = make_image(128, 96)
    response = client.edit("a red car", image=png_bytes(image), options=edit_options(steps=STEPS))
    local = reference_engine.edit_real(image, "a red car", options=EditOptions(steps=STEPS))
    assert np.abs(decode(response.edited_image) - np.asarray(local.edited_image, np.int16)).max() <= 1
    assert (
        np.abs(decode(response.reconstruction_image) - np.asarray(local.reconstruction_image, np.int16)).max()
        <= 1
    )
    assert (response.width, response.height) == local.edited_image.size
    assert response.inversion_id
    assert response.stats.unet_rows == local.stats["unet_rows"]
    # The id from an image edit serves later edits of the same image.
    again = client.edit("a red car", inversion_id=response.inversion_id, options=edit_options(steps=STEPS))
    assert np.abs(decode(again.edited_image) - decode(response.edited_image)).max() <= 1


def test_custom_options_and_formats(client, reference_engine):
    image = make_image(64, 64, seed=3)
    opts = edit_options(
        steps=5, guidance_scale=5.5, replace_window=(0.2, 0.7), layers=(3, 5, 9), map_format="probs"
    )
    response = client.edit("a blue boat", image=png_bytes(image), options=opts, output_format="webp")
    assert Image.open(io.BytesIO(response.edited_image)).format == "WEBP"
    png = client.edit("a blue boat", image=png_bytes(image), options=opts)
    local = reference_engine.edit_real(
        image,
        "a blue boat",
        options=EditOptions(
            steps=5, guidance_scale=5.5, replace_window=(0.2, 0.7), layers=(3, 5, 9), map_format="probs"
        ),
    )
    assert np.abs(decode(png.edited_image) - np.asarray(local.edited_image, np.int16)).max() <= 1
    assert list(png.stats.replaced_steps) == [1, 2]  # int(5*0.2) = 1 .. int(5*0.7) = 3
    preset = client.edit("a boat", image=png_bytes(image), options=edit_options(steps=3, layers="resolution"))
    assert list(preset.stats.layers) == list(range(1, 17))  # at 64 px every layer spans <= 32x32 tokens


def test_stream_reports_every_step_then_the_result(client):
    image = png_bytes(make_image(64, 64))
    events = list(client.edit_stream("a red car", image=image, options=edit_options(steps=STEPS)))
    progress = [e.progress for e in events[:-1]]
    assert all(e.HasField("progress") for e in events[:-1]) and events[-1].HasField("result")
    denoise = [p.step for p in progress if p.stage == "denoise"]
    assert denoise == list(range(1, STEPS + 1))
    assert [p.step for p in progress if p.stage == "inversion"] == list(range(1, STEPS))
    unary = client.edit("a red car", image=image, options=edit_options(steps=STEPS))
    assert np.abs(decode(events[-1].result.edited_image) - decode(unary.edited_image)).max() <= 1


def test_invert_then_edit_twice_equals_fresh_edits_and_runs_less(client):
    image = png_bytes(make_image(128, 128, seed=5))
    steps = 10
    inv = client.invert(image, options=edit_options(steps=steps))
    assert inv.inversion_id and inv.steps == steps and inv.expires_in_s > 0
    fresh, by_id = {}, {}
    for prompt in ("a red car", "a green tractor"):
        fresh[prompt] = client.edit(prompt, image=image, options=edit_options(steps=steps))
        by_id[prompt] = client.edit(prompt, inversion_id=inv.inversion_id)  # steps taken from the inversion
    for prompt in fresh:
        assert np.abs(decode(by_id[prompt].edited_image) - decode(fresh[prompt].edited_image)).max() <= 1
    second = by_id["a green tractor"]
    # Work, not wall time (which a shared CI machine makes noisy): the re-edit runs the target rows alone.
    assert second.stats.unet_rows == 2 * steps < fresh["a green tractor"].stats.unet_rows
    assert (
        "inversion" not in second.stats.stages_ms and "inversion" in fresh["a green tractor"].stats.stages_ms
    )


def test_generate_edit_equals_in_process(client, reference_engine):
    response = client.generate("a cat", "a dog", seed=11, options=edit_options(steps=4), height=64, width=64)
    local = reference_engine.edit_generated(
        "a cat", "a dog", seed=11, height=64, width=64, options=EditOptions(steps=4)
    )
    assert response.seed == 11
    assert np.abs(decode(response.edited_image) - np.asarray(local.edited_image, np.int16)).max() <= 1
    assert np.abs(decode(response.source_image) - np.asarray(local.source_image, np.int16)).max() <= 1


def test_get_info(client):
    info = client.info()
    assert info.backend == "torch" and info.device == "cpu" and info.precision == "float32"
    assert list(info.layers_available) == list(range(1, 17))
    assert list(info.defaults.layers) == list(range(4, 15)) and info.defaults.steps == 50
    assert info.limits.workers == 1 and info.limits.max_queue == 8 and info.limits.max_steps == 1000


def _bad_requests():
    good = png_bytes(make_image(64, 64))
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, format="PNG")
    gif = io.BytesIO()
    make_image(64, 64).save(gif, format="GIF")
    return [
        ("corrupt", {"image": b"definitely not an image", "prompt": "a car"}, "image"),
        ("neither", {"prompt": "a car"}, "image"),
        ("both", {"image": good, "inversion_id": "abc", "prompt": "a car"}, "image"),
        ("empty prompt", {"image": good, "prompt": ""}, "target_prompt"),
        ("steps 0", {"image": good, "prompt": "a car", "options": edit_options(steps=0)}, "steps"),
        ("steps 100000", {"image": good, "prompt": "a car", "options": edit_options(steps=100000)}, "steps"),
        (
            "nan guidance",
            {"image": good, "prompt": "a car", "options": edit_options(guidance_scale=math.nan)},
            "guidance_scale",
        ),
        (
            "reversed window",
            {"image": good, "prompt": "a car", "options": edit_options(replace_window=(0.8, 0.2))},
            "replace_window",
        ),
        ("layer 99", {"image": good, "prompt": "a car", "options": edit_options(layers=(4, 99))}, "layers"),
        ("gif", {"image": gif.getvalue(), "prompt": "a car"}, "image"),
        ("huge", {"image": bomb.getvalue(), "prompt": "a car"}, "image"),
    ]


@pytest.mark.parametrize(("name", "fields", "message"), _bad_requests(), ids=[b[0] for b in _bad_requests()])
def test_bad_input_gets_invalid_argument(client, name, fields, message):
    with pytest.raises(grpc.RpcError) as info:
        client.edit(
            fields["prompt"],
            image=fields.get("image"),
            inversion_id=fields.get("inversion_id", ""),
            options=fields.get("options"),
        )
    code = info.value.code()
    # An image over the pixel limit is a bad field like any other (proto comment, README and server agree).
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, info.value.details())
    assert message in info.value.details()
    if name == "huge":
        assert "9000x9000 exceeds the limit of 16777216 pixels" in info.value.details()


def test_unknown_inversion_is_not_found_and_server_stays_healthy(client):
    good = png_bytes(make_image(64, 64, seed=9))
    before = client.edit("a car", image=good, options=edit_options(steps=3))
    with pytest.raises(grpc.RpcError) as info:
        client.edit("a car", inversion_id="0" * 32)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "inversion_id" in info.value.details()
    for _name, fields, _ in _bad_requests():
        with pytest.raises(grpc.RpcError):
            client.edit(
                fields["prompt"],
                image=fields.get("image"),
                inversion_id=fields.get("inversion_id", ""),
                options=fields.get("options"),
            )
    assert client.health() == "SERVING"
    assert client.health("fpedit.v1.EditService") == "SERVING"
    after = client.edit("a car", image=good, options=edit_options(steps=3))
    assert after.edited_image == before.edited_image


def test_invert_with_steps_mismatch_and_bad_generate(client):
    inv = client.invert(png_bytes(make_image(64, 64)), options=edit_options(steps=3))
    with pytest.raises(grpc.RpcError) as info:
        client.edit("a car", inversion_id=inv.inversion_id, options=edit_options(steps=4))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "steps" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.generate("a", "", seed=1, options=edit_options(steps=2))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target_prompt" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.generate("a", "b", seed=1, options=edit_options(steps=2), height=100)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "height" in info.value.details()


def _wait_idle(running, timeout=10.0) -> float:
    t0 = time.perf_counter()
    while running.runner.pool.pending and time.perf_counter() - t0 < timeout:
        time.sleep(0.02)
    return time.perf_counter() - t0


def test_cancelled_stream_frees_the_worker(client, running):
    stream = client.edit_stream("a car", image=png_bytes(make_image(64, 64)), options=edit_options(steps=400))
    first = next(stream)
    assert first.HasField("progress")
    stream.cancel()
    waited = _wait_idle(running)
    assert running.runner.pool.pending == 0, "the cancelled edit kept its worker"
    assert waited < 5.0
    assert client.edit(
        "a car", image=png_bytes(make_image(64, 64)), options=edit_options(steps=2)
    ).edited_image


def test_deadline_stops_the_denoising_loop(client, running):
    calls_before = running.runner.engine.counters()["unet_calls"]
    with pytest.raises(grpc.RpcError) as info:
        client.edit(
            "a car", image=png_bytes(make_image(64, 64)), options=edit_options(steps=1000), timeout=1.0
        )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(running)
    assert running.runner.pool.pending == 0
    # Stopped inside the inversion: a finished request would have made 999 inversion calls and 1000 more.
    assert running.runner.engine.counters()["unet_calls"] - calls_before < 999


def test_concurrent_clients_all_succeed(running):
    image = png_bytes(make_image(64, 64, seed=2))

    def one(i: int) -> bytes:
        with EditClient(f"127.0.0.1:{running.port}", timeout=120) as c:
            return c.edit(f"a car number {i % 2}", image=image, options=edit_options(steps=3)).edited_image

    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(one, range(5)))
    assert all(results)
    assert results[0] == results[2] == results[4] and results[1] == results[3]


def test_full_queue_is_resource_exhausted(model_dir):
    engine = EditEngine.from_pretrained(model_dir)
    server = build_server(engine, ServerConfig(port=0, workers=1, max_queue=0))
    try:
        with EditClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            stream = c.edit_stream(
                "a car", image=png_bytes(make_image(64, 64)), options=edit_options(steps=400)
            )
            assert next(stream).HasField("progress")  # the only worker is busy
            with pytest.raises(grpc.RpcError) as info:
                c.edit("a car", image=png_bytes(make_image(64, 64)), options=edit_options(steps=2))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stream.cancel()
            _wait_idle(server)
            assert c.edit(
                "a car", image=png_bytes(make_image(64, 64)), options=edit_options(steps=2)
            ).edited_image
    finally:
        server.drain(2)


def test_bearer_token(model_dir):
    engine = EditEngine.from_pretrained(model_dir)
    server = build_server(engine, ServerConfig(port=0, token="s3cret"))
    target = f"127.0.0.1:{server.port}"
    try:
        for token in (None, "wrong"):
            with EditClient(target, token=token) as c:
                with pytest.raises(grpc.RpcError) as info:
                    c.info()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as info:
                    list(
                        c.edit_stream("a", image=png_bytes(make_image(64, 64)), options=edit_options(steps=2))
                    )
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert c.health() == "SERVING"  # probes need no token
        with EditClient(target, token="s3cret") as c:
            assert c.info().backend == "torch"
            assert c.edit(
                "a", image=png_bytes(make_image(64, 64)), options=edit_options(steps=2)
            ).edited_image
    finally:
        server.drain(2)


def test_tls(model_dir, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    engine = EditEngine.from_pretrained(model_dir)
    server = build_server(engine, ServerConfig(port=0, tls_cert=str(cert), tls_key=str(key)))
    try:
        with EditClient(f"localhost:{server.port}", root_certificates=cert.read_bytes()) as c:
            assert c.info().backend == "torch"
        with EditClient(f"localhost:{server.port}", timeout=3) as plain:
            with pytest.raises(grpc.RpcError) as info:
                plain.info()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.drain(2)


def test_reflection_lists_the_services(running):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"fpedit.v1.EditService", "grpc.health.v1.Health"} <= names


def test_independently_generated_stubs_work(running, tmp_path):
    """Stubs generated from protos/ by grpc_tools (as an outside client would) call the server."""
    from grpc_tools import protoc

    protos = Path(__file__).resolve().parents[2] / "protos"
    out = tmp_path / "stubs"
    out.mkdir()
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{protos}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                "fpedit/v1/edit.proto",
            ]
        )
        == 0
    )
    code = f"""
import sys, grpc
sys.path.insert(0, {str(out)!r})
from fpedit.v1 import edit_pb2, edit_pb2_grpc
stub = edit_pb2_grpc.EditServiceStub(grpc.insecure_channel("127.0.0.1:{running.port}"))
info = stub.GetInfo(edit_pb2.GetInfoRequest(), timeout=30)
assert info.backend == "torch", info
try:
    stub.Edit(edit_pb2.EditRequest(target_prompt="a"), timeout=30)
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_committed_stubs_are_current(tmp_path):
    """The stubs match the .proto; the version of grpcio-tools that wrote them may differ from the installed one."""
    from fpedit.server.protogen import generate, without_generator_versions

    repo = Path(__file__).resolve().parents[2]
    for path in generate(tmp_path):
        committed = repo / "fpedit" / "v1" / path.name
        assert without_generator_versions(committed.read_text()) == without_generator_versions(
            path.read_text()
        ), f"{committed} is stale: python -m fpedit.server.protogen"


def test_stub_comparison_blanks_only_generator_versions() -> None:
    """Another generator release compares equal; another field does not (the proto's change must show)."""
    from fpedit.server.protogen import without_generator_versions

    stub = (Path(__file__).resolve().parents[2] / "fpedit" / "v1" / "edit_pb2_grpc.py").read_text()
    newer = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '9.99.9'", stub)
    assert newer != stub and without_generator_versions(newer) == without_generator_versions(stub)
    renamed = stub.replace("/fpedit.v1.EditService/Edit", "/fpedit.v1.EditService/Redo", 1)
    assert renamed != stub and without_generator_versions(renamed) != without_generator_versions(stub)


def test_sigterm_drains_in_flight_requests(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fpedit.cli", "serve", "--port", "0", "--grace-s", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "serving on" in line, line + proc.stderr.read()
        port = int(line.strip().rsplit(":", 1)[1])
        results: dict[str, object] = {}

        def edit() -> None:
            with EditClient(f"127.0.0.1:{port}", timeout=120) as c:
                stream = c.edit_stream(
                    "a car", image=png_bytes(make_image(64, 64)), options=edit_options(steps=8)
                )
                for event in stream:
                    if event.HasField("progress") and "started" not in results:
                        results["started"] = True
                        started.set()
                    if event.HasField("result"):
                        results["result"] = event.result

        started = threading.Event()
        worker = threading.Thread(target=edit)
        worker.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        worker.join(300)
        assert "result" in results, "the in-flight edit did not complete during the drain"
        code = proc.wait(60)
        log = proc.stderr.read()
        assert code == 0, log[-3000:]
        assert "draining" in log and "status=OK" in log
        # Request lines carry a timestamp (the CLI's logging format), e.g. "2026-01-31 12:00:00,123 INFO ...".
        assert re.search(
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO fpedit.server: rpc=EditStream status=OK", log, re.M
        ), log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_options_from_the_wire_keep_the_decimals_the_client_meant():
    from fpedit.server.convert import options_from_proto, shortest_decimal

    assert shortest_decimal(float(np.float32(0.7))) == 0.7
    assert shortest_decimal(float(np.float32(7.3))) == 7.3
    opts = options_from_proto(edit_options(steps=10, replace_window=(0.0, 0.7), guidance_scale=7.3))
    assert list(opts.replaced_steps()) == list(range(7))  # float32 0.69999999 would give 6 steps
    assert opts.guidance_scale == 7.3
    assert options_from_proto(edit_options()) == EditOptions()
    both = edit_options(layers=(4, 5))
    both.layer_preset = "paper"
    with pytest.raises(ValueError, match="layers"):
        options_from_proto(both)


def test_inversion_cache_budget_age_and_oversize(server_engine):
    from fpedit.server.cache import InversionCache

    opts = EditOptions(steps=4)
    inv = server_engine.invert(make_image(64, 64), options=opts)
    server_engine.edit_real(inv, "a car", options=opts)  # caches the source's maps on the inversion
    with_maps = inv.nbytes
    without_maps = with_maps - inv.map_bytes  # trajectory, working image, reconstruction
    budget = 2 * without_maps + 1  # room for two inversions without maps, not for one with its maps
    assert with_maps > budget
    now = [0.0]
    cache = InversionCache(max_bytes=budget, ttl_s=10, clock=lambda: now[0])
    key = cache.put(inv)  # too big with its maps: kept, maps dropped
    assert cache.get(key) is inv and inv.nbytes == without_maps == cache.nbytes
    others = [cache.put(server_engine.invert(make_image(64, 64, seed=i), options=opts)) for i in (1, 2)]
    assert cache.nbytes <= cache.max_bytes and cache.get(others[-1]) is not None
    assert cache.get(key) is None  # least recently used went first
    now[0] = 11.0
    assert cache.get(others[-1]) is None and len(cache) == 0


def test_inversion_larger_than_the_whole_cache_is_not_kept(server_engine, model_dir):
    """Issue 16 item 5: an entry that exceeds the budget even without its maps is refused (nothing kept,
    nothing evicted) instead of being kept alone over the budget."""
    from fpedit.server.cache import InversionCache

    opts = EditOptions(steps=4)
    small = server_engine.invert(make_image(64, 64, seed=1), options=opts)
    big = server_engine.invert(make_image(128, 128, seed=2), options=opts)
    assert big.nbytes > 2 * small.nbytes
    cache = InversionCache(max_bytes=small.nbytes + 1, ttl_s=60)
    kept = cache.put(small)
    assert cache.put(big) == ""
    assert cache.get(kept) is small and cache.nbytes == small.nbytes and cache.evictions == 0

    # Through the server: Invert says why it cannot keep it; Edit with the image works and carries no id.
    budget_gib = (small.nbytes + 1) / 1024**3
    server = build_server(server_engine, ServerConfig(port=0, cache_bytes=int(budget_gib * 1024**3)))
    try:
        with EditClient(f"127.0.0.1:{server.port}", timeout=300) as c:
            image = png_bytes(make_image(128, 128, seed=2))
            with pytest.raises(grpc.RpcError) as caught:
                c.invert(image, options=edit_options(steps=4))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "exceeds the whole inversion cache" in caught.value.details()
            edited = c.edit("a car", image=image, options=edit_options(steps=4))
            assert edited.edited_image and edited.inversion_id == ""
            assert server.runner.cache.nbytes <= server.runner.cache.max_bytes
    finally:
        server.drain(2)
