"""Prometheus metrics: scraped over HTTP from real servers before and after requests."""

from __future__ import annotations

import dataclasses
import urllib.request

import grpc
import pytest
from helpers import make_image, png_bytes, scrape, value

from fpedit import EditEngine
from fpedit.server.app import build_server
from fpedit.server.config import ServerConfig
from fpedit.server.runner import LocalRunner
from fpedit.v1 import edit_pb2 as pb
from fpedit.v1 import edit_pb2_grpc


def png(seed: int = 0) -> bytes:
    return png_bytes(make_image(64, 64, seed=seed))


def test_counters_move_by_the_requests_made(engine):
    server = build_server(engine, ServerConfig(port=0, metrics_port=0))
    assert server.metrics_port
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = edit_pb2_grpc.EditServiceStub(channel)
    options = pb.EditOptions(steps=3)
    try:
        before = scrape(server.metrics_port)
        first = stub.Edit(pb.EditRequest(image=png(1), target_prompt="a car", options=options), timeout=300)
        inverted = stub.Invert(pb.InvertRequest(image=png(2), options=options), timeout=300)
        by_id = stub.Edit(
            pb.EditRequest(inversion_id=inverted.inversion_id, target_prompt="a boat"), timeout=300
        )
        for bad in (
            pb.EditRequest(target_prompt="a car"),
            pb.EditRequest(inversion_id="0" * 32, target_prompt="a"),
        ):
            with pytest.raises(grpc.RpcError):
                stub.Edit(bad, timeout=60)
        after = scrape(server.metrics_port)
    finally:
        channel.close()
        server.drain(2)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("fpedit_requests_total", method="Edit", code="OK", transport="grpc") == 2
    assert delta("fpedit_requests_total", method="Invert", code="OK", transport="grpc") == 1
    assert delta("fpedit_requests_total", method="Edit", code="INVALID_ARGUMENT", transport="grpc") == 1
    assert delta("fpedit_requests_total", method="Edit", code="NOT_FOUND", transport="grpc") == 1
    assert delta("fpedit_request_duration_seconds_count", method="Edit", transport="grpc") == 4
    # Queue and engine time: one observation per successful request, sums equal to the responses' stats.
    assert delta("fpedit_queue_wait_seconds_count", method="Edit") == 2
    assert delta("fpedit_engine_seconds_count", method="Invert") == 1
    engine_s = (first.stats.engine_ms + by_id.stats.engine_ms) / 1e3
    assert delta("fpedit_engine_seconds_sum", method="Edit") == pytest.approx(engine_s, rel=1e-3, abs=1e-3)
    rows = first.stats.unet_rows + by_id.stats.unet_rows
    assert delta("fpedit_unet_rows_total", method="Edit") == rows > 0
    assert delta("fpedit_unet_rows_total", method="Invert") == inverted.stats.unet_rows
    assert delta("fpedit_unet_calls_total", method="Edit") == first.stats.unet_calls + by_id.stats.unet_calls
    # Every stage a response reported was observed once for it.
    stages = list(first.stats.stages_ms) + list(by_id.stats.stages_ms) + list(inverted.stats.stages_ms)
    for stage in set(stages):
        assert delta("fpedit_stage_seconds_count", stage=stage) == stages.count(stage), stage
    # The cache: two entries (the image edit's and the inversion), one hit (edit by id), one miss.
    assert value(after, "fpedit_inversion_cache_entries") == 2
    assert value(after, "fpedit_inversion_cache_bytes") > 0
    assert delta("fpedit_inversion_cache_hits_total") == 1
    assert delta("fpedit_inversion_cache_misses_total") == 1
    assert value(after, "fpedit_requests_in_flight") == 0
    assert value(after, "fpedit_requests_running") == 0 and value(after, "fpedit_requests_queued") == 0
    assert not any(name == "fpedit_gpu_memory_allocated_bytes" for name, _ in after)  # CPU engine


def test_servers_in_one_process_keep_their_own_metrics(engine, model_dir):
    other_engine = EditEngine.from_pretrained(model_dir)
    a = build_server(engine, ServerConfig(port=0, metrics_port=0))
    b = build_server(other_engine, ServerConfig(port=0, metrics_port=0))
    try:
        assert a.metrics_port != b.metrics_port
        with grpc.insecure_channel(f"127.0.0.1:{a.port}") as channel:
            edit_pb2_grpc.EditServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30)
        assert (
            value(
                scrape(a.metrics_port), "fpedit_requests_total", method="GetInfo", code="OK", transport="grpc"
            )
            == 1
        )
        assert (
            value(
                scrape(b.metrics_port), "fpedit_requests_total", method="GetInfo", code="OK", transport="grpc"
            )
            == 0
        )
    finally:
        a.drain(2)
        b.drain(2)
    with pytest.raises(OSError):  # the endpoint closed with its server
        urllib.request.urlopen(f"http://127.0.0.1:{a.metrics_port}/metrics", timeout=2)


def test_metrics_port_in_use_is_a_clear_error(engine):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match="cannot serve metrics"):
            build_server(engine, ServerConfig(port=0, metrics_port=taken.getsockname()[1]))
    finally:
        taken.close()


def test_batching_server_merges_concurrent_requests_and_exposes_batch_sizes(model_dir):
    """Four concurrent edits on a batching engine: the backend makes fewer UNet calls than the requests
    report between them, evaluates exactly their rows, and the batch-size histogram shows merged calls."""
    from concurrent.futures import ThreadPoolExecutor

    engine = EditEngine.from_pretrained(model_dir, batching=True)
    server = build_server(engine, ServerConfig(port=0, metrics_port=0, workers=4, max_queue=4))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = edit_pb2_grpc.EditServiceStub(channel)
    options = pb.EditOptions(steps=4)
    try:
        inverted = stub.Invert(pb.InvertRequest(image=png(3), options=options), timeout=300)
        before = scrape(server.metrics_port)
        prompts = ["a car", "a boat", "a red bus", "a bike"]
        with ThreadPoolExecutor(len(prompts)) as pool:
            responses = list(
                pool.map(
                    lambda p: stub.Edit(
                        pb.EditRequest(inversion_id=inverted.inversion_id, target_prompt=p), timeout=300
                    ),
                    prompts,
                )
            )
        after = scrape(server.metrics_port)
    finally:
        channel.close()
        server.drain(2)
        engine.close()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    request_calls = sum(r.stats.unet_calls for r in responses)
    request_rows = sum(r.stats.unet_rows for r in responses)
    assert delta("fpedit_backend_unet_rows_total") == request_rows
    assert 0 < delta("fpedit_backend_unet_calls_total") < request_calls
    merged = delta("fpedit_backend_batch_rows_count") - delta("fpedit_backend_batch_rows_bucket", le="2.0")
    assert merged >= 1  # at least one backend call carried more than one request's two target rows
    assert delta("fpedit_backend_batch_rows_sum") == request_rows


def test_engine_time_of_an_image_edit_counts_the_inversion_once(engine):
    """Issue 16 item 3: an Edit with an image reported its inversion twice in engine_ms and
    fpedit_engine_seconds (engine_ms exceeded the client's own wall time). The engine runs inside the RPC,
    so its time can never exceed the wall time the client measures around the call."""
    import time

    server = build_server(engine, ServerConfig(port=0, metrics_port=0))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = edit_pb2_grpc.EditServiceStub(channel)
    try:
        request = pb.EditRequest(image=png(5), target_prompt="a car", options=pb.EditOptions(steps=4))
        started = time.perf_counter()
        response = stub.Edit(request, timeout=300)
        wall_ms = (time.perf_counter() - started) * 1e3
        assert "vae_encode" in response.stats.stages_ms  # the image was encoded and inverted in this call
        assert response.stats.engine_ms <= wall_ms, (response.stats.engine_ms, wall_ms)
        assert sum(response.stats.stages_ms.values()) <= response.stats.engine_ms
        samples = scrape(server.metrics_port)
        assert value(samples, "fpedit_engine_seconds_count", method="Edit") == 1
        assert value(samples, "fpedit_engine_seconds_sum", method="Edit") * 1e3 <= wall_ms
    finally:
        channel.close()
        server.drain(2)


def test_token_refusals_are_counted(engine):
    """Issue 16 item 4: calls denied by the token check reach fpedit_requests_total."""
    server = build_server(engine, ServerConfig(port=0, metrics_port=0, token="s3cret"))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = edit_pb2_grpc.EditServiceStub(channel)
    try:
        for metadata in ((), (("authorization", "Bearer guess"),), (("authorization", "Bearer s3cre"),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetInfo(pb.GetInfoRequest(), timeout=30, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError):
            stub.Edit(pb.EditRequest(target_prompt="a"), timeout=30)
        samples = scrape(server.metrics_port)
        assert (
            value(
                samples, "fpedit_requests_total", method="GetInfo", code="UNAUTHENTICATED", transport="grpc"
            )
            == 3
        )
        assert (
            value(samples, "fpedit_requests_total", method="Edit", code="UNAUTHENTICATED", transport="grpc")
            == 1
        )
    finally:
        channel.close()
        server.drain(2)


class _OversizeRunner(LocalRunner):
    """Runs the real edit, then returns an edited image over the message limit (the servicer must refuse it)."""

    def edit(self, call, cancel_check=None):
        outcome = super().edit(call, cancel_check=cancel_check)
        return dataclasses.replace(outcome, edited_image=b"\0" * (2 << 20))


def test_messages_over_the_size_limit_are_refused_by_the_servicer_and_counted(engine):
    """Issue 16 item 4: a request over --max-message-mb (up to gRPC's backstop at twice it) and a response over
    it are RESOURCE_EXHAUSTED with a message naming the flag, in the log and in fpedit_requests_total."""
    config = ServerConfig(port=0, metrics_port=0, max_message_bytes=1 << 20)
    server = build_server(_OversizeRunner(engine, config), config)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{server.port}",
        options=[("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)],
    )
    stub = edit_pb2_grpc.EditServiceStub(channel)
    try:
        oversize = pb.EditRequest(image=b"\x89PNG" + bytes(3 << 19), target_prompt="a car")  # 1.5 MiB
        with pytest.raises(grpc.RpcError) as caught:
            stub.Edit(oversize, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            "--max-message-mb" in caught.value.details()
            and str(oversize.ByteSize()) in caught.value.details()
        )
        with pytest.raises(grpc.RpcError) as caught:  # 2 MiB of edited image in the response
            stub.Edit(
                pb.EditRequest(image=png(3), target_prompt="a car", options=pb.EditOptions(steps=2)),
                timeout=300,
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        detail = caught.value.details()
        assert "response" in detail and "--max-message-mb" in detail
        kept = detail.rsplit("the inversion is kept as ", 1)[1]
        with pytest.raises(grpc.RpcError) as caught:  # the id is known (not NOT_FOUND): the work is not lost
            stub.Edit(pb.EditRequest(inversion_id=kept, target_prompt="a boat"), timeout=300)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        samples = scrape(server.metrics_port)
        assert (
            value(
                samples, "fpedit_requests_total", method="Edit", code="RESOURCE_EXHAUSTED", transport="grpc"
            )
            == 3
        )
        assert value(samples, "fpedit_requests_total", method="Edit", code="OK", transport="grpc") == 0
    finally:
        channel.close()
        server.drain(2)
