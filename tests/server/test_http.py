"""The HTTP/JSON front against real servers on 127.0.0.1 (httpx), compared with the gRPC service beside it."""

from __future__ import annotations

import io
import json
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from conftest import make_image
from helpers import b64, json_server_log, scrape, self_signed_cert, serving_engine
from helpers import decoded_pixels as pixels

from fpedit.engine.errors import InvalidInputError
from fpedit.server.app import build_server
from fpedit.server.config import ServerConfig
from fpedit.server.runner import LocalRunner
from fpedit.v1 import edit_pb2 as pb
from fpedit.v1 import edit_pb2_grpc

STEPS = 2


def png(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(width, height, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def http_engine(model_dir):
    return serving_engine(model_dir)


@pytest.fixture(scope="module")
def running(http_engine):
    config = ServerConfig(port=0, http_port=0, metrics_port=0, max_queue=8, max_message_bytes=1 << 20)
    server = build_server(http_engine, config)
    yield server
    server.drain(5)


@pytest.fixture(scope="module")
def grpc_edit(stub):
    """The gRPC result of the edit the HTTP tests repeat."""
    request = pb.EditRequest(image=png(), target_prompt="a red car", options=pb.EditOptions(steps=STEPS))
    return stub.Edit(request, timeout=300)


EDIT_JSON = {"image": b64(png()), "targetPrompt": "a red car", "options": {"steps": STEPS}}


def test_edit_json_and_multipart_equal_grpc_then_edit_by_id(http, stub, grpc_edit):
    response = http.post("/v1/edit", json=EDIT_JSON)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"editedImage", "reconstructionImage", "inversionId", "width", "height", "stats"}
    assert np.array_equal(pixels(body["editedImage"]), pixels(grpc_edit.edited_image))
    assert np.array_equal(pixels(body["reconstructionImage"]), pixels(grpc_edit.reconstruction_image))
    assert (body["width"], body["height"]) == (64, 64) and body["stats"]["steps"] == STEPS
    assert body["inversionId"] != grpc_edit.inversion_id  # a new inversion in the shared cache

    # curl -F: the image as a file part, the rest as JSON.
    request = json.dumps({"targetPrompt": "a red car", "options": {"steps": STEPS}})
    multipart = http.post(
        "/v1/edit", files={"image": ("in.png", png(), "image/png")}, data={"request": request}
    )
    assert multipart.status_code == 200, multipart.text
    assert np.array_equal(pixels(multipart.json()["editedImage"]), pixels(grpc_edit.edited_image))

    # An id from HTTP serves a gRPC edit and the other way round: one cache behind both.
    by_id = http.post("/v1/edit", json={"inversionId": grpc_edit.inversion_id, "targetPrompt": "a boat"})
    assert by_id.status_code == 200, by_id.text
    assert (
        "reconstructionImage" in by_id.json()
        and by_id.json()["stats"]["unetRows"] < body["stats"]["unetRows"]
    )
    over_grpc = stub.Edit(
        pb.EditRequest(inversion_id=body["inversionId"], target_prompt="a boat"), timeout=300
    )
    assert np.array_equal(pixels(by_id.json()["editedImage"]), pixels(over_grpc.edited_image))


def test_stream_sends_progress_in_order_then_the_result(http, grpc_edit):
    with http.stream("POST", "/v1/edit:stream", json=EDIT_JSON) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[len("data: ") :]) for line in lines]
    assert all(set(e) == {"progress"} for e in events[:-1]) and set(events[-1]) == {"result"}
    stages = [(e["progress"]["stage"], e["progress"]["step"]) for e in events[:-1]]
    # DDIM inversion of N steps runs N-1 UNet steps (the last latent is x_T), then the edit's N steps.
    assert [s for s in stages if s[0] == "inversion"] == [("inversion", i) for i in range(1, STEPS)]
    assert [s for s in stages if s[0] == "denoise"] == [("denoise", i) for i in range(1, STEPS + 1)]
    assert stages.index(("denoise", 1)) > stages.index(("inversion", STEPS - 1))
    assert np.array_equal(pixels(events[-1]["result"]["editedImage"]), pixels(grpc_edit.edited_image))


def test_generate_and_invert_equal_grpc(http, stub):
    request = {"sourcePrompt": "a cat", "targetPrompt": "a dog", "seed": "11", "width": 64, "height": 64,
               "options": {"steps": STEPS}}  # fmt: skip
    response = http.post("/v1/generate", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seed"] == "11"  # uint64 travels as a string in proto3 JSON
    over_grpc = stub.GenerateEdit(
        pb.GenerateEditRequest(source_prompt="a cat", target_prompt="a dog", seed=11, width=64, height=64,
                               options=pb.EditOptions(steps=STEPS)), timeout=300,
    )  # fmt: skip
    assert np.array_equal(pixels(body["sourceImage"]), pixels(over_grpc.source_image))
    assert np.array_equal(pixels(body["editedImage"]), pixels(over_grpc.edited_image))

    inverted = http.post(
        "/v1/invert", files={"image": ("in.png", png(seed=4), "image/png")},
        data={"request": json.dumps({"options": {"steps": STEPS}})},
    )  # fmt: skip
    assert inverted.status_code == 200, inverted.text
    assert inverted.json()["steps"] == STEPS and inverted.json()["expiresInS"] > 0
    edited = stub.Edit(
        pb.EditRequest(inversion_id=inverted.json()["inversionId"], target_prompt="x"), timeout=300
    )
    assert edited.width == 64


def test_info_health_and_openapi(http, running):
    info = http.get("/v1/info").json()
    assert info["backend"] == "torch" and info["defaults"]["steps"] == 50 and info["limits"]["maxQueue"] == 8
    assert http.get("/healthz").status_code == 200 and http.get("/readyz").json() == {"status": "SERVING"}
    document = http.get("/openapi.json").json()
    expected = {
        "/v1/edit": "post", "/v1/edit:stream": "post", "/v1/generate": "post", "/v1/invert": "post",
        "/v1/info": "get", "/v1/maps": "post", "/healthz": "get", "/readyz": "get", "/": "get",
    }  # fmt: skip
    assert {path: next(iter(ops)) for path, ops in document["paths"].items()} == expected
    edit_request = document["components"]["schemas"]["EditRequest"]["properties"]
    assert edit_request["targetPrompt"] == {"type": "string"}
    assert edit_request["image"] == {"type": "string", "format": "byte"}
    assert edit_request["inversionMethod"] == {"$ref": "#/components/schemas/InversionMethod"}
    assert document["components"]["schemas"]["GenerateEditRequest"]["properties"]["seed"]["type"] == "string"
    assert "multipart/form-data" in document["paths"]["/v1/edit"]["post"]["requestBody"]["content"]
    assert document["components"]["schemas"]["MapsRequest"]["required"] == ["prompt"]
    job_state = document["components"]["schemas"]["JobState"]  # as a job's JSON names it, not the enum
    assert job_state["enum"] == ["queued", "running", "succeeded", "failed", "cancelled"]
    assert document["components"]["schemas"]["Job"]["properties"]["state"]["$ref"].endswith("/JobState")
    assert "501" in document["paths"]["/v1/maps"]["post"]["responses"]
    docs = http.get("/docs")
    assert docs.status_code == 200 and "<script" not in docs.text and "http://" not in docs.text.lower()
    for path in expected:
        assert f"<code>{path}</code>" in docs.text
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="http' not in page.text and 'href="http' not in page.text  # nothing from another host


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ('{"targetPrompt": "a", "bogus": 1}', 400, 'request: Message type "fpedit.v1.EditRequest" has no field named "bogus"'),
        ("{not json", 400, "request: is not JSON"),
        ("[1, 2]", 400, "request: must be a JSON object"),
        ('{"targetPrompt": 5}', 400, "target_prompt: must be a string, got 5"),
        ('{"options": {"steps": "many"}}', 400, "options.steps: must be an integer in 1..1000, got 'many'"),
        ('{"image": "aGk=", "targetPrompt": "a", "options": {"steps": -3}}', 400, "options.steps: must be an integer in 1..1000, got -3"),
        ('{"targetPrompt": "a", "options": {"guidanceScale": "lots"}}', 400, "options.guidance_scale: must be a number in 0..50, got 'lots'"),
        ('{"targetPrompt": "a", "outputFormat": "GIF"}', 400, "output_format: must be one of IMAGE_FORMAT_UNSPECIFIED"),
        ('{"targetPrompt": "a", "nullTextSteps": -1}', 400, "null_text_steps: must be an integer in 1..100, got -1"),
        ('{"image": "!!!", "targetPrompt": "a"}', 400, "image: is not valid base64"),
        (b'{"targetPrompt": "\xff"}', 400, "request: is not JSON"),
        ('{"targetPrompt": "a"}', 400, "image: give exactly one of image or inversion_id"),
        ('{"inversionId": "' + "0" * 32 + '", "targetPrompt": "a"}', 404, "inversion_id '" + "0" * 32 + "' is unknown"),
        ('{"inversionId": "abc", "targetPrompt": "a", "options": {"steps": 5000}}', 400, "options.steps: must be an integer in 1..1000, got 5000"),
    ],
)  # fmt: skip
def test_errors_map_to_http_statuses(http, body, status, message):
    response = http.post("/v1/edit", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    names = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}
    assert error["code"] == status and error["status"] == names[status]
    assert error["message"].startswith(message), error["message"]


def test_json_value_the_proto_cannot_hold_is_judged_by_the_grpc_rule(http, stub):
    """steps -3 cannot travel in gRPC's uint32; over HTTP it is refused by the rule gRPC applies to steps 0."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Edit(pb.EditRequest(image=png(), target_prompt="a", options=pb.EditOptions(steps=0)), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    body = {"image": b64(png()), "targetPrompt": "a", "options": {"steps": -3}}
    refused = http.post("/v1/edit", json=body).json()["error"]
    assert info.value.details().endswith("got 0") and refused["status"] == "INVALID_ARGUMENT"
    assert refused["message"] == info.value.details().removesuffix("got 0") + "got -3"


def test_transport_errors_deadline_and_size(http, running):
    before = scrape(running.metrics_port)
    assert http.get("/nope").json()["error"] == {
        "code": 404, "status": "NOT_FOUND", "message": "no route GET /nope; see /docs"
    }  # fmt: skip
    assert http.get("/v1/edit").status_code == 405
    late = http.post("/v1/edit", json=EDIT_JSON, headers={"X-Server-Timeout": "0"})
    assert late.status_code == 504 and late.json()["error"]["status"] == "DEADLINE_EXCEEDED"
    bad_header = http.post("/v1/edit", json=EDIT_JSON, headers={"X-Server-Timeout": "soon"})
    assert bad_header.status_code == 400 and "x-server-timeout" in bad_header.json()["error"]["message"]
    wrong_part = http.post("/v1/edit", files={"picture": ("a.png", png(), "image/png")})
    assert wrong_part.status_code == 400 and "'picture'" in wrong_part.json()["error"]["message"]
    # Larger than --max-message-mb (1 MiB here; 4/3 of it for base64): refused from Content-Length, unread.
    limit = running.servicer.config.max_message_bytes * 4 // 3 + 64 * 1024
    big = b'{"image": "' + b"A" * limit + b'"}'
    too_big = http.post("/v1/edit", content=big, headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["status"] == "RESOURCE_EXHAUSTED"

    def chunks():  # no Content-Length: counted while read
        yield b'{"image": "'
        for _ in range(limit // (1 << 16) + 1):
            yield b"A" * (1 << 16)

    chunked = http.post("/v1/edit", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    # Refused before the servicer, yet counted like any request (issue 16 item 4), with the HTTP transport.
    after = scrape(running.metrics_port)
    key = (
        "fpedit_requests_total",
        frozenset({"method": "Edit", "code": "RESOURCE_EXHAUSTED", "transport": "http"}.items()),
    )
    assert after.get(key, 0) - before.get(key, 0) == 2
    key = (
        "fpedit_requests_total",
        frozenset({"method": "Edit", "code": "INVALID_ARGUMENT", "transport": "http"}.items()),
    )
    assert after.get(key, 0) - before.get(key, 0) == 2  # the bad X-Server-Timeout and the wrong form part


class _BrokenRunner(LocalRunner):
    """A runner with a bug in GetInfo: the answer must be a bare 500 without the exception's text."""

    def info(self) -> pb.GetInfoResponse:
        raise KeyError("secret internal detail /srv/keys")


def test_internal_error_is_500_without_internals(http_engine):
    config = ServerConfig(port=0, http_port=0)
    server = build_server(_BrokenRunner(http_engine, config), config)
    try:
        response = httpx.get(server.http.url + "v1/info", timeout=30)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["status"] == "INTERNAL" and "secret" not in response.text and "/srv" not in response.text
    finally:
        server.drain(2)


def test_metrics_count_http_requests_with_their_transport(running, http, stub):
    before = scrape(running.metrics_port)
    assert http.post("/v1/edit", json=EDIT_JSON).status_code == 200
    assert http.post("/v1/edit", json={"targetPrompt": "a"}).status_code == 400
    assert http.post("/v1/edit", content="{oops").status_code == 400
    assert http.get("/v1/info").status_code == 200
    stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    after = scrape(running.metrics_port)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("fpedit_requests_total", method="Edit", code="OK", transport="http") == 1
    assert delta("fpedit_requests_total", method="Edit", code="INVALID_ARGUMENT", transport="http") == 2
    assert delta("fpedit_requests_total", method="GetInfo", code="OK", transport="http") == 1
    assert delta("fpedit_requests_total", method="GetInfo", code="OK", transport="grpc") == 1
    assert delta("fpedit_request_duration_seconds_count", method="Edit", transport="http") == 3
    assert delta("fpedit_unet_rows_total", method="Edit") > 0  # the engine work of the HTTP edit


def test_log_line_names_the_transport(http, caplog):
    with caplog.at_level("INFO", logger="fpedit.server"):
        http.post("/v1/edit", json={"targetPrompt": "a"})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rpc=Edit ")]
    assert lines and "status=INVALID_ARGUMENT" in lines[-1] and "transport=http" in lines[-1]
    assert "peer=ipv4:127.0.0.1:" in lines[-1]


def test_token_and_tls_are_the_grpc_settings(http_engine, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    config = ServerConfig(
        port=0, http_port=0, metrics_port=0, token="s3cret", tls_cert=str(cert), tls_key=str(key)
    )
    server = build_server(http_engine, config)
    try:
        assert server.http.url.startswith("https://")
        with httpx.Client(base_url=server.http.url, verify=str(cert), timeout=60) as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                denied = client.post(
                    "/v1/edit", content="{garbage", headers=headers
                )  # checked before parsing
                assert denied.status_code == 401
                assert denied.json()["error"]["status"] == "UNAUTHENTICATED"
                assert client.get("/v1/info", headers=headers).status_code == 401
            for path in ("/healthz", "/readyz", "/", "/docs", "/openapi.json"):
                assert client.get(path).status_code == 200, path  # probes, the page and the docs are open
            ok = client.get("/v1/info", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json()["backend"] == "torch"
        # Every refusal is in fpedit_requests_total with its code and transport (token guessing shows).
        counted = scrape(server.metrics_port)
        for method, n in (("Edit", 3), ("GetInfo", 3)):
            labels = {"method": method, "code": "UNAUTHENTICATED", "transport": "http"}
            assert counted.get(("fpedit_requests_total", frozenset(labels.items()))) == n
        with pytest.raises(httpx.TransportError):  # TLS only: a plaintext client gets no answer
            httpx.get(server.http.url.replace("https", "http"), timeout=10).raise_for_status()
            pytest.fail("plaintext HTTP was answered")
    finally:
        server.drain(2)


def test_token_refusals_are_json_log_objects_over_both_transports(http_engine):
    """``--log-format json`` writes every RPC as an object with its fields; refusals before the servicer too."""
    with json_server_log() as entries:
        server = build_server(http_engine, ServerConfig(port=0, http_port=0, token="s3cret"))
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            with channel, pytest.raises(grpc.RpcError) as denied:
                edit_pb2_grpc.EditServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert httpx.get(server.http.url.rstrip("/") + "/v1/info", timeout=30).status_code == 401
        finally:
            server.drain(2)
    refused = [e for e in entries if e.get("status") == "UNAUTHENTICATED"]
    assert sorted(e["transport"] for e in refused) == ["grpc", "http"], entries
    for entry in refused:
        assert entry["method"] == "GetInfo" and entry["peer"].startswith("ipv4:127.0.0.1:"), entry
        assert "message" not in entry, entry


def _first_progress(lines) -> dict:
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("the stream ended without an event")


def test_queue_full_drain_and_readyz(http_engine):
    """One worker, no queue: a second edit while one streams is 429; draining is 503 with /readyz 503."""
    server = build_server(http_engine, ServerConfig(port=0, http_port=0, workers=1, max_queue=0))
    url = server.http.url
    drained = threading.Thread(target=server.drain, args=(60,))
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            body = {**EDIT_JSON, "options": {"steps": 6}}
            with client.stream("POST", "/v1/edit:stream", json=body) as stream:
                lines = stream.iter_lines()
                assert "progress" in _first_progress(lines)  # the only worker is busy now
                busy = client.post("/v1/edit", json=EDIT_JSON)
                assert busy.status_code == 429 and busy.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
                drained.start()
                deadline = time.monotonic() + 30
                while not server.servicer.draining and time.monotonic() < deadline:
                    time.sleep(0.01)
                ready = client.get("/readyz")
                assert ready.status_code == 503 and ready.json()["status"] == "NOT_SERVING"
                assert client.get("/healthz").status_code == 200
                refused = client.post("/v1/edit", json=EDIT_JSON)
                assert refused.status_code == 503 and refused.json()["error"]["status"] == "UNAVAILABLE"
                rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
            assert "result" in rest[-1]  # the in-flight stream finished during the drain
    finally:
        if drained.is_alive() or not drained.ident:
            if not drained.ident:
                drained.start()
            drained.join(90)
    assert not drained.is_alive()
    with pytest.raises(httpx.ConnectError):  # the drain closed the HTTP port
        httpx.get(url + "healthz", timeout=5)


def test_client_disconnect_cancels_the_work(http_engine, caplog):
    server = build_server(http_engine, ServerConfig(port=0, http_port=0, metrics_port=0, workers=1))
    body = {**EDIT_JSON, "options": {"steps": 200}}  # long enough to be running when the client leaves
    try:
        with caplog.at_level("INFO", logger="fpedit.server"):
            with httpx.Client(base_url=server.http.url, timeout=300) as client:
                with client.stream("POST", "/v1/edit:stream", json=body) as stream:
                    assert "progress" in _first_progress(stream.iter_lines())
                # The stream is closed: the work stops at its next step.
                with pytest.raises(httpx.ReadTimeout):
                    client.post("/v1/edit", json=body, timeout=httpx.Timeout(300, read=1.5))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                samples = scrape(server.metrics_port)
                cancelled = samples.get(
                    ("fpedit_requests_total", frozenset({"method": "Edit", "code": "CANCELLED", "transport": "http"}.items())), 0
                )  # fmt: skip
                streams = samples.get(
                    ("fpedit_requests_total",
                     frozenset({"method": "EditStream", "code": "CANCELLED", "transport": "http"}.items())), 0,
                )  # fmt: skip
                if cancelled == 1 and streams == 1 and server.servicer.in_flight == 0:
                    break
                time.sleep(0.1)
            assert (cancelled, streams, server.servicer.in_flight) == (1, 1, 0)
            assert samples.get(("fpedit_requests_running", frozenset()), 0) == 0
    finally:
        server.drain(5)
    steps = [r.getMessage() for r in caplog.records if "status=CANCELLED" in r.getMessage()]
    assert len(steps) == 2 and all("transport=http" in line for line in steps)


def test_http_port_in_use_is_one_clear_error(http_engine):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            build_server(http_engine, ServerConfig(port=0, http_port=port))
    finally:
        taken.close()


def test_serve_flag_errors_name_the_flag():
    from fpedit.server.cli import server_config_from_args

    class Args:
        host, port, workers, batching, max_queue, max_message_mb = "127.0.0.1", 0, 1, False, 1, 32
        cache_gib, cache_ttl_s, max_image_pixels, max_prompt_chars = 1.0, 10.0, 1 << 20, 100
        token = tls_cert = tls_key = metrics_port = metrics_host = threads_per_worker = None
        grace_s, log_format, http_port, http_host = 1.0, "text", 70000, None

    with pytest.raises(InvalidInputError, match="http-port"):
        server_config_from_args(Args())
    Args.http_port = 8080
    assert server_config_from_args(Args()).http_port == 8080


# --- POST /v1/maps: cross-attention heatmaps per token ---------------------------------------------------------

MAPS_JSON = {"prompt": "a red car", "image": b64(png()), "resolution": 4, "options": {"steps": STEPS}}


def test_maps_of_an_image_match_the_engine_with_one_heatmap_per_token(http, http_engine, running):
    before = scrape(running.metrics_port)
    response = http.post("/v1/maps", json=MAPS_JSON)
    assert response.status_code == 200, response.text
    body = response.json()
    ids = http_engine.tokenizer("a red car").input_ids[1:-1]
    tokens = [t.replace("</w>", "") for t in http_engine.tokenizer.convert_ids_to_tokens(ids)]
    assert body["tokens"] == tokens and len(tokens) >= 3
    assert len(body["heatmaps"]) == len(body["crossAttention"]) == len(tokens)
    assert (body["mapWidth"], body["mapHeight"], body["width"], body["height"]) == (4, 4, 64, 64)
    maps = np.array(body["crossAttention"])
    assert maps.shape == (len(tokens), 4, 4)
    # The engine's own maps of the same image and prompt.
    direct = http_engine.attention_maps("a red car", image=png(), steps=STEPS, resolution=4)
    np.testing.assert_allclose(maps, direct.cross_attention, rtol=1e-5, atol=1e-9)
    assert body["layers"] == direct.layers and body["steps"] == direct.steps
    assert np.abs(maps[0] - maps[2]).max() > 1e-3 * np.abs(maps[0]).max()  # tokens attend differently
    shown = [pixels(h).astype(int) for h in body["heatmaps"]]
    assert not np.array_equal(shown[0], shown[2])
    for heat, values in zip(shown, maps, strict=True):
        assert heat.shape == (4, 4, 3)  # one pixel per map cell; the page scales it over the image
        hot = np.unravel_index(values.argmax(), values.shape)
        cold = np.unravel_index(values.argmin(), values.shape)
        red, blue = heat[..., 0], heat[..., 2]
        assert red[hot] > blue[hot] + 100 and blue[cold] > red[cold] + 50  # high is red, low is blue
        assert red[hot] == red.max() and blue[cold] == blue.max()
    assert np.array_equal(pixels(body["image"]), direct_image := np.asarray(direct.image.convert("RGB")))
    assert direct_image.shape == (64, 64, 3)
    after = scrape(running.metrics_port)
    key = (
        "fpedit_requests_total",
        frozenset({"method": "AttentionMaps", "code": "OK", "transport": "http"}.items()),
    )
    assert after.get(key, 0) - before.get(key, 0) == 1


def test_maps_by_inversion_id_and_of_a_generation(http):
    inverted = http.post("/v1/invert", json={"image": b64(png()), "options": {"steps": STEPS}}).json()
    by_image = http.post("/v1/maps", json=MAPS_JSON).json()
    by_id = http.post(
        "/v1/maps", json={"prompt": "a red car", "inversionId": inverted["inversionId"], "resolution": 4}
    )
    assert by_id.status_code == 200, by_id.text  # the inversion's own step count
    np.testing.assert_allclose(by_id.json()["crossAttention"], by_image["crossAttention"], rtol=1e-5)
    generated = http.post("/v1/maps", json={"prompt": "a cat", "seed": "5", "width": 64, "height": 64,
                                            "resolution": 4, "options": {"steps": STEPS}})  # fmt: skip
    assert generated.status_code == 200, generated.text
    source = http.post("/v1/generate", json={"sourcePrompt": "a cat", "targetPrompt": "a dog", "seed": "5",
                                             "width": 64, "height": 64, "options": {"steps": STEPS}}).json()  # fmt: skip
    # The same source generation; rows batched with a target branch round a little differently on CPU.
    difference = np.abs(pixels(generated.json()["image"]).astype(int) - pixels(source["sourceImage"]))
    assert difference.max() <= 4 and difference.mean() < 0.5, (difference.max(), difference.mean())


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": "a", "bogus": 1}, 400, "request: unknown field 'bogus'"),
        ({"image": b64(png())}, 400, "prompt: "),
        ({"prompt": "a", "image": b64(png()), "inversionId": "abc"}, 400, "image: give image or inversionId"),
        ({"prompt": "a", "image": "not base64!"}, 400, "image: is not valid base64"),
        ({"prompt": "a", "image": b64(b"not an image")}, 400, "image: "),
        ({"prompt": "a", "inversionId": "0" * 32}, 404, "inversion_id '" + "0" * 32 + "' is unknown"),
        ({"prompt": "a", "image": b64(png()), "seed": 3}, 400, "seed: applies to a generation"),
        ({"prompt": "a", "options": {"layers": [4]}}, 400, "layers: does not apply"),
        (
            {"prompt": "a", "options": {"steps": 5000}},
            400,
            "options.steps: must be an integer in 1..1000, got 5000",
        ),
        (
            {"prompt": "a", "options": {"steps": -3}},
            400,
            "options.steps: must be an integer in 1..1000, got -3",
        ),
        ({"prompt": "a", "resolution": 5, "options": {"steps": 2}}, 400, "resolution: must be one of"),
        ({"prompt": "a", "width": "wide"}, 400, "width: must be an integer"),
    ],
)
def test_maps_errors(http, body, status, message):
    response = http.post("/v1/maps", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"].startswith(message), response.json()["error"]["message"]


class _RunnerWithoutMaps:
    """A local runner whose maps are refused as the Ray front's are (``RayRunner.attention_maps``): the route
    answers 501 through the servicer's error mapping, not a probe of the runner's methods."""

    def __init__(self, inner: LocalRunner) -> None:
        self._inner = inner

    def attention_maps(self, prompt: str, **options):
        from fpedit.server.ray.front import RayRunner

        return RayRunner(handle=None).attention_maps(prompt, **options)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def test_maps_on_a_runner_without_maps_is_501(http_engine):
    config = ServerConfig(port=0, http_port=0, metrics_port=0)
    server = build_server(_RunnerWithoutMaps(LocalRunner(http_engine, config)), config)
    try:
        response = httpx.post(server.http.url + "v1/maps", json=MAPS_JSON, timeout=60)
        assert response.status_code == 501
        error = response.json()["error"]
        assert (
            error["status"] == "UNIMPLEMENTED"
            and "--ray" in error["message"]
            and "fpedit maps" in error["message"]
        )
        labels = {"method": "AttentionMaps", "code": "UNIMPLEMENTED", "transport": "http"}
        assert scrape(server.metrics_port).get(("fpedit_requests_total", frozenset(labels.items()))) == 1
    finally:
        server.drain(2)


def test_every_runner_declares_what_the_fronts_call():
    """The servicer and the HTTP front call only what :class:`Runner` declares (no ``hasattr`` probes), and
    both runners have all of it, attention maps included."""
    from fpedit.server.ray.front import RayRunner
    from fpedit.server.runner import Runner

    declared = {name for name in vars(Runner) if not name.startswith("_")}
    assert "attention_maps" in declared
    for runner in (LocalRunner, RayRunner):
        assert declared <= set(dir(runner)), runner
