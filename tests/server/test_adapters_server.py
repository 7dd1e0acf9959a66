"""Per-request adapters over the wire (issue 29): GetInfo, /v1/info and `fpedit client info` list what
``--lora-dir`` offers; a request's adapters (gRPC and JSON) give the engine's own edit under that set; every
bad adapter input is INVALID_ARGUMENT (HTTP 400) naming it; an inversion id is refused under another set."""

from __future__ import annotations

import base64
import io
import json

import grpc
import httpx
import numpy as np
import pytest
from conftest import make_image
from lora_files import write_peft_and_kohya
from PIL import Image

from fpedit import EditEngine, EditOptions
from fpedit.cli import main
from fpedit.server.app import build_server
from fpedit.server.config import ServerConfig
from fpedit.v1 import edit_pb2 as pb
from fpedit.v1 import edit_pb2_grpc

pytest.importorskip("peft")

STEPS = 2


def pixels(data: bytes | str | Image.Image) -> np.ndarray:
    if isinstance(data, Image.Image):
        return np.asarray(data.convert("RGB"))
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(64, 64, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def lora_dir(raw_modules, tmp_path_factory):
    return write_peft_and_kohya(tmp_path_factory.mktemp("served-adapters"), raw_modules, ("ink", "oil"), 21)


@pytest.fixture(scope="module")
def served(model_dir, lora_dir):
    engine = EditEngine.from_pretrained(model_dir, lora_dir=lora_dir, max_adapters=2)
    server = build_server(engine, ServerConfig(port=0, http_port=0))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    with httpx.Client(base_url=server.http.url, timeout=300) as http:
        yield engine, server, edit_pb2_grpc.EditServiceStub(channel), http
    channel.close()
    server.drain(1)


def adapters_pb(*pairs: tuple[str, float]) -> list[pb.Adapter]:
    return [pb.Adapter(name=name, scale=scale) for name, scale in pairs]


def test_info_lists_adapters_on_grpc_http_and_client(served, capsys):
    engine, server, stub, http = served
    want = [{"name": a["name"], "rank": a["rank"], "layers": a["layers"]} for a in engine.info()["adapters"]]
    assert [a["name"] for a in want] == ["ink", "oil"] and all(a["rank"] == 4 for a in want)
    assert all(layer.startswith("unet.") for layer in want[0]["layers"])
    assert any(layer.startswith("text_encoder.") for layer in want[1]["layers"])
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    assert [{"name": a.name, "rank": a.rank, "layers": list(a.layers)} for a in info.adapters] == want
    assert info.max_adapters == 2
    body = http.get("/v1/info").json()
    assert body["adapters"] == want and body["maxAdapters"] == 2
    assert main(["client", "info", "--target", f"127.0.0.1:{server.port}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["adapters"] == want and printed["max_adapters"] == 2


def test_request_adapters_give_the_engines_edit_over_grpc_and_json(served):
    engine, _, stub, http = served
    chosen = (("ink", 0.7), ("oil", -1.3))
    local = engine.edit_generated(
        "a cat", "a dog", seed=11, height=64, width=64, options=EditOptions(steps=STEPS, adapters=chosen)
    )
    request = pb.GenerateEditRequest(
        source_prompt="a cat", target_prompt="a dog", seed=11, width=64, height=64,
        options=pb.EditOptions(steps=STEPS, adapters=adapters_pb(*chosen)),
    )  # fmt: skip
    over_grpc = stub.GenerateEdit(request, timeout=300)
    plain = stub.GenerateEdit(
        pb.GenerateEditRequest(source_prompt="a cat", target_prompt="a dog", seed=11, width=64, height=64,
                               options=pb.EditOptions(steps=STEPS)), timeout=300,
    )  # fmt: skip
    assert np.array_equal(pixels(over_grpc.edited_image), pixels(local.edited_image))
    assert not np.array_equal(pixels(over_grpc.edited_image), pixels(plain.edited_image))
    body = {"sourcePrompt": "a cat", "targetPrompt": "a dog", "seed": "11", "width": 64, "height": 64,
            "options": {"steps": STEPS, "adapters": [{"name": "ink", "scale": 0.7}, {"name": "oil", "scale": -1.3}]}}  # fmt: skip
    response = http.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    assert np.array_equal(pixels(response.json()["editedImage"]), pixels(local.edited_image))


@pytest.mark.parametrize(
    ("adapters", "fragment"),
    [
        ([{"name": "watercolor"}], "unknown adapter 'watercolor'"),
        ([{"name": "ink", "scale": 4.5}], "adapter 'ink': scale 4.5 is outside [-4, 4]"),
        ([{"name": "ink", "scale": -4.25}], "adapter 'ink': scale -4.25 is outside [-4, 4]"),
        (
            [{"name": "ink"}, {"name": "oil"}, {"name": "x"}],
            "3 adapters requested; this server allows at most 2",
        ),
        ([{"name": "ink"}, {"name": "ink", "scale": 2}], "adapter 'ink' is given more than once"),
    ],
)
def test_bad_adapters_are_invalid_argument_naming_them(served, adapters, fragment):
    _, _, stub, http = served
    options = pb.EditOptions(steps=STEPS, adapters=[pb.Adapter(**a) for a in adapters])
    with pytest.raises(grpc.RpcError) as info:
        stub.GenerateEdit(pb.GenerateEditRequest(source_prompt="a", target_prompt="b", width=64, height=64,
                                                 options=options), timeout=60)  # fmt: skip
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "adapters" in info.value.details() and fragment in info.value.details(), info.value.details()
    body = {"image": base64.b64encode(png()).decode(), "targetPrompt": "b",
            "options": {"steps": STEPS, "adapters": adapters}}  # fmt: skip
    response = http.post("/v1/edit", json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["status"] == "INVALID_ARGUMENT"
    assert fragment in error["message"], error["message"]


def test_an_inversion_id_is_refused_under_another_set(served):
    _, _, stub, http = served
    inverted = stub.Invert(
        pb.InvertRequest(
            image=png(3), options=pb.EditOptions(steps=STEPS, adapters=adapters_pb(("ink", 1.0)))
        ),
        timeout=300,
    )
    same = pb.EditOptions(steps=STEPS, adapters=adapters_pb(("ink", 1.0)))
    assert stub.Edit(
        pb.EditRequest(inversion_id=inverted.inversion_id, target_prompt="x", options=same)
    ).width
    with pytest.raises(grpc.RpcError) as info:
        other = pb.EditOptions(steps=STEPS, adapters=adapters_pb(("oil", 0.5)))
        stub.Edit(pb.EditRequest(inversion_id=inverted.inversion_id, target_prompt="x", options=other))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ink:1" in info.value.details() and "oil:0.5" in info.value.details(), info.value.details()
    body = {"inversionId": inverted.inversion_id, "targetPrompt": "x", "options": {"steps": STEPS}}
    error = http.post("/v1/edit", json=body).json()["error"]
    assert (
        error["status"] == "INVALID_ARGUMENT" and "ink:1" in error["message"] and "none" in error["message"]
    )


def test_cli_lora_dir_and_adapter_flags(model_dir, lora_dir, tmp_path, capsys):
    assert main(["info", "--model", str(model_dir), "--lora-dir", str(lora_dir)]) == 0
    assert [a["name"] for a in json.loads(capsys.readouterr().out)["adapters"]] == ["ink", "oil"]
    out = tmp_path / "out.png"
    common = ["generate", "--model", str(model_dir), "-s", "a cat", "-t", "a dog", "--steps", "2",
              "--height", "64", "--width", "64", "--seed", "11", "--no-progress", "-o", str(out)]  # fmt: skip
    assert main([*common, "--lora-dir", str(lora_dir), "--adapter", "nope"]) == 2
    assert "unknown adapter 'nope'" in capsys.readouterr().err
    assert main([*common, "--adapter", "ink:9"]) == 2
    assert "scale 9.0 is outside" in capsys.readouterr().err
    assert main([*common, "--lora-dir", str(lora_dir), "--adapter", "ink:0.7"]) == 0
    engine = EditEngine.from_pretrained(model_dir, lora_dir=lora_dir)
    want = engine.edit_generated(
        "a cat", "a dog", seed=11, height=64, width=64, options=EditOptions(steps=2, adapters=["ink:0.7"])
    )
    assert np.array_equal(pixels(Image.open(out)), pixels(want.edited_image))


def test_client_generate_sends_its_adapters(served, tmp_path):
    engine, server, _, _ = served
    out = tmp_path / "dog.png"
    argv = ["client", "generate", "--target", f"127.0.0.1:{server.port}", "-s", "a cat", "-t", "a dog",
            "--seed", "11", "--height", "64", "--width", "64", "--steps", str(STEPS), "-o", str(out),
            "--adapter", "oil:0.6", "--adapter", "ink"]  # fmt: skip
    assert main(argv) == 0
    want = engine.edit_generated(
        "a cat", "a dog", seed=11, height=64, width=64,
        options=EditOptions(steps=STEPS, adapters=[("ink", 1.0), ("oil", 0.6)]),
    )  # fmt: skip
    assert np.array_equal(pixels(Image.open(out)), pixels(want.edited_image))


def test_client_invert_records_its_adapters(served, tmp_path, capsys):
    _, server, stub, _ = served
    image = tmp_path / "in.png"
    image.write_bytes(png(5))
    argv = ["client", "invert", str(image), "--target", f"127.0.0.1:{server.port}", "--steps", str(STEPS),
            "--adapter", "ink:0.5", "-q"]  # fmt: skip
    assert main(argv) == 0
    inversion_id = capsys.readouterr().out.strip()
    same = pb.EditOptions(steps=STEPS, adapters=adapters_pb(("ink", 0.5)))
    assert stub.Edit(pb.EditRequest(inversion_id=inversion_id, target_prompt="x", options=same)).width == 64
    with pytest.raises(grpc.RpcError, match=r"ink:0\.5"):
        stub.Edit(
            pb.EditRequest(inversion_id=inversion_id, target_prompt="x", options=pb.EditOptions(steps=STEPS))
        )


def test_multipart_edit_carries_adapters_in_its_request_part(served):
    _, _, stub, http = served
    chosen = adapters_pb(("oil", 1.5))
    over_grpc = stub.Edit(
        pb.EditRequest(image=png(7), target_prompt="x", options=pb.EditOptions(steps=STEPS, adapters=chosen))
    )
    plain = stub.Edit(pb.EditRequest(image=png(7), target_prompt="x", options=pb.EditOptions(steps=STEPS)))
    request = {"targetPrompt": "x", "options": {"steps": STEPS, "adapters": [{"name": "oil", "scale": 1.5}]}}
    response = http.post(
        "/v1/edit", files={"image": ("in.png", png(7), "image/png")}, data={"request": json.dumps(request)}
    )
    assert response.status_code == 200, response.text
    assert np.array_equal(pixels(response.json()["editedImage"]), pixels(over_grpc.edited_image))
    assert not np.array_equal(pixels(over_grpc.edited_image), pixels(plain.edited_image))


def test_the_page_lists_adapters_and_sends_the_picked_ones(served, tmp_path):
    """The editor page offers the server's adapters as a list; an edit with two picked at one scale shows
    what the API gives for that request."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    from test_http_page import CHROMIUM

    if CHROMIUM is None:
        pytest.skip("no chromium binary")
    _, server, _, http = served
    path = tmp_path / "photo.png"
    path.write_bytes(png(8))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.http.url)
            page.wait_for_function("document.querySelectorAll('#adapters option').length === 2")
            listed = page.eval_on_selector_all("#adapters option", "els => els.map((e) => e.textContent)")
            assert [text.split(" (rank 4, ")[0] for text in listed] == ["ink", "oil"], listed
            page.set_input_files("#file", str(path))
            page.fill("#prompt", "a red car")
            page.click("summary")
            page.fill("#steps", str(STEPS))
            page.select_option("#adapters", ["ink", "oil"])
            page.fill("#adapter-scale", "0.5")
            page.click("#run")
            page.wait_for_selector("#f-edited img", timeout=120_000)
            shown = page.get_attribute("#f-edited img", "src").split(",", 1)[1]
        finally:
            browser.close()
    body = {"image": base64.b64encode(png(8)).decode(), "targetPrompt": "a red car",
            "options": {"steps": STEPS, "adapters": [{"name": "ink", "scale": 0.5}, {"name": "oil", "scale": 0.5}]}}  # fmt: skip
    assert np.array_equal(pixels(shown), pixels(http.post("/v1/edit", json=body).json()["editedImage"]))
    body["options"].pop("adapters")
    assert not np.array_equal(pixels(shown), pixels(http.post("/v1/edit", json=body).json()["editedImage"]))
