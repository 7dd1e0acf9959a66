"""Local blending over gRPC and HTTP (issue 27) on a real server: the fields, the returned mask, the notes,
and every new input's refusal."""

from __future__ import annotations

import base64
import io
import json

import grpc
import httpx
import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from fpedit import EditEngine
from fpedit.server.app import build_server
from fpedit.server.config import ServerConfig
from fpedit.v1 import edit_pb2 as pb
from fpedit.v1 import edit_pb2_grpc

STEPS = 2


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)))


IMAGE = png(make_image(64, 64))
LEFT = png(Image.fromarray(np.tile((np.arange(40) < 20).astype(np.uint8) * 255, (30, 1))))  # left half, 40x30
BLACK, WHITE = png(Image.new("L", (64, 64), 0)), png(Image.new("L", (64, 64), 255))


@pytest.fixture(scope="module")
def running(model_dir):
    engine = EditEngine.from_pretrained(model_dir)
    config = ServerConfig(port=0, http_port=0, metrics_port=0, max_queue=8, max_message_bytes=1 << 20)
    server = build_server(engine, config)
    yield server
    server.drain(5)


@pytest.fixture(scope="module")
def http(running):
    with httpx.Client(base_url=running.http.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def stub(running):
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield edit_pb2_grpc.EditServiceStub(channel)
    channel.close()


def test_grpc_json_and_multipart_masks_agree_and_return_the_mask(http, stub):
    request = pb.EditRequest(
        image=IMAGE, target_prompt="a red car", options=pb.EditOptions(steps=STEPS, mask=LEFT, blend_start=0)
    )
    over_grpc = stub.Edit(request, timeout=300)
    mask = pixels(over_grpc.blend_mask)
    assert mask.shape == (64, 64) and mask[:, :32].all() and not mask[:, 32:].any()
    assert list(over_grpc.notes) == []
    body = {
        "image": b64(IMAGE),
        "targetPrompt": "a red car",
        "options": {"steps": STEPS, "mask": b64(LEFT), "blendStart": 0},
    }
    as_json = http.post("/v1/edit", json=body)
    assert as_json.status_code == 200, as_json.text
    assert np.array_equal(pixels(as_json.json()["editedImage"]), pixels(over_grpc.edited_image))
    assert np.array_equal(pixels(as_json.json()["blendMask"]), mask)
    del body["image"], body["options"]["mask"]
    multipart = http.post(
        "/v1/edit",
        files={"image": ("in.png", IMAGE, "image/png"), "mask": ("m.png", LEFT, "image/png")},
        data={"request": json.dumps(body)},
    )
    assert multipart.status_code == 200, multipart.text
    assert np.array_equal(pixels(multipart.json()["editedImage"]), pixels(over_grpc.edited_image))
    # A re-edit by id takes another mask: an empty one returns the reconstruction itself, and says so.
    empty = stub.Edit(
        pb.EditRequest(inversion_id=over_grpc.inversion_id, target_prompt="a red car",
                       options=pb.EditOptions(steps=STEPS, mask=BLACK, blend_start=0)),
        timeout=300,
    )  # fmt: skip
    assert "selects nothing" in " ".join(empty.notes)
    assert np.array_equal(pixels(empty.edited_image), pixels(empty.reconstruction_image))
    full = http.post("/v1/edit", json={"inversionId": over_grpc.inversion_id, "targetPrompt": "a red car",
                                       "options": {"steps": STEPS, "mask": b64(WHITE)}})  # fmt: skip
    assert "selects everything" in " ".join(full.json()["notes"])
    plain = stub.Edit(pb.EditRequest(inversion_id=over_grpc.inversion_id, target_prompt="a red car",
                                     options=pb.EditOptions(steps=STEPS)), timeout=300)  # fmt: skip
    assert plain.blend_mask == b"" and list(plain.notes) == []


def test_generate_with_words_over_http(http):
    body = {"sourcePrompt": "a disc", "targetPrompt": "a car", "seed": 1, "height": 64, "width": 64,
            "options": {"steps": STEPS, "blendWords": ["car", "disc"], "blendThreshold": 0.5}}  # fmt: skip
    response = http.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    assert pixels(response.json()["blendMask"]).shape == (64, 64)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mask": b64(b"not an image")}, "mask: "),
        ({"mask": "!!!"}, "options.mask: is not valid base64"),
        ({"mask": b64(LEFT), "maskGrow": -1}, "options.mask_grow: must be an integer in 0..64, got -1"),
        ({"mask": b64(LEFT), "maskGrow": 65}, "options.mask_grow: must be an integer in 0..64, got 65"),
        ({"maskGrow": 2}, "options.mask_grow: grows a mask image; none was given"),
        ({"blendWords": ["car"], "blendStart": 2}, "options.blend_start: must be a number in 0..1, got 2"),
        ({"blendWords": ["car"], "blendStart": "soon"}, "options.blend_start: must be a number in 0..1"),
        ({"blendWords": ["car"], "blendThreshold": -0.5}, "options.blend_threshold: must be a number in 0..1"),
        ({"blendWords": [""]}, "options.blend_words: each word must be a non-empty string"),
        ({"blendWords": "car"}, "options.blend_words"),
        ({"blendWords": ["boat"]}, "blend_words: 'boat' is not a word of the target prompt"),
        ({"blendStart": 0.5}, "options.mask: a blend needs a mask image or blend words"),
    ],
)  # fmt: skip
def test_every_blend_input_error_is_invalid_argument(http, options, message):
    body = {"image": b64(IMAGE), "targetPrompt": "a red car", "options": {"steps": STEPS, **options}}
    response = http.post("/v1/edit", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and error["message"].startswith(message), error["message"]


def test_multipart_mask_errors(http):
    both = http.post(
        "/v1/edit",
        files={"image": ("in.png", IMAGE, "image/png"), "mask": ("m.png", LEFT, "image/png")},
        data={"request": json.dumps({"targetPrompt": "a", "options": {"mask": b64(LEFT)}})},
    )
    assert both.status_code == 400
    assert both.json()["error"]["message"].startswith("mask: give the mask as the file part or in the JSON")
    bad = http.post(
        "/v1/edit",
        files={"image": ("in.png", IMAGE, "image/png"), "mask": ("m.png", b"junk", "image/png")},
        data={"request": json.dumps({"targetPrompt": "a", "options": {"steps": STEPS}})},
    )
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("mask: ")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (pb.EditOptions(steps=STEPS, mask=b"junk"), "mask: "),
        (pb.EditOptions(steps=STEPS, mask=LEFT, mask_grow=100), "options.mask_grow: must be an integer"),
        (pb.EditOptions(steps=STEPS, blend_words=["car"], blend_start=1.5), "options.blend_start"),
        (pb.EditOptions(steps=STEPS, blend_words=["car"], blend_threshold=2), "options.blend_threshold"),
        (pb.EditOptions(steps=STEPS, blend_words=["boat"]), "blend_words: 'boat'"),
    ],
)
def test_grpc_blend_errors_are_invalid_argument(stub, options, fragment):
    for call, request in (
        (stub.Edit, pb.EditRequest(image=IMAGE, target_prompt="a red car", options=options)),
        (stub.GenerateEdit, pb.GenerateEditRequest(source_prompt="a", target_prompt="a red car", options=options,
                                                   height=64, width=64)),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(fragment), info.value.details()
