"""Local blending over gRPC and HTTP (issue 27) on a real server: the fields, the returned mask, the notes,
and every new input's refusal."""

from __future__ import annotations

import base64
import io
import json

import grpc
import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from fpedit import EditEngine
from fpedit.server.app import build_server
from fpedit.server.config import ServerConfig
from fpedit.v1 import edit_pb2 as pb

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


def test_client_cli_blend_flags_equal_the_rpc_and_save_its_mask(running, stub, tmp_path, capsys):
    """`fpedit client edit/generate` take `fpedit edit`'s blend flags: the mask file's bytes and the words go
    in EditOptions, and --save-mask writes the mask the server used."""
    from fpedit.cli import main

    target = ["--target", f"127.0.0.1:{running.port}", "--timeout", "120"]
    src, mask = tmp_path / "in.png", tmp_path / "left.png"
    src.write_bytes(IMAGE)
    mask.write_bytes(LEFT)
    out, saved = tmp_path / "out.png", tmp_path / "mask.png"
    argv = ["client", "edit", str(src), "-p", "a red car", "-o", str(out), "--steps", str(STEPS),
            "--mask", str(mask), "--mask-grow", "1", "--blend-start", "0", "--save-mask", str(saved)]  # fmt: skip
    assert main([*argv, *target]) == 0, capsys.readouterr().err
    options = pb.EditOptions(steps=STEPS, mask=LEFT, mask_grow=1, blend_start=0)
    expected = stub.Edit(pb.EditRequest(image=IMAGE, target_prompt="a red car", options=options), timeout=300)
    assert np.array_equal(pixels(out.read_bytes()), pixels(expected.edited_image))
    assert np.array_equal(pixels(saved.read_bytes()), pixels(expected.blend_mask))
    grown = pixels(saved.read_bytes())
    assert grown[:, :40].all() and not grown[:, 40:].any()  # the left half, one 8-px cell more

    gen, gen_mask = tmp_path / "gen.png", tmp_path / "gen-mask.png"
    argv = ["client", "generate", "-s", "a disc", "-t", "a car", "--seed", "1", "--height", "64", "--width", "64",
            "--steps", str(STEPS), "--blend", "car", "--blend", "disc", "--blend-threshold", "0.5",
            "-o", str(gen), "--save-mask", str(gen_mask)]  # fmt: skip
    assert main([*argv, *target]) == 0, capsys.readouterr().err
    request = pb.GenerateEditRequest(source_prompt="a disc", target_prompt="a car", seed=1, height=64, width=64,
                                     options=pb.EditOptions(steps=STEPS, blend_words=["car", "disc"],
                                                            blend_threshold=0.5))  # fmt: skip
    expected = stub.GenerateEdit(request, timeout=300)
    assert np.array_equal(pixels(gen.read_bytes()), pixels(expected.edited_image))
    assert np.array_equal(pixels(gen_mask.read_bytes()), pixels(expected.blend_mask))


def test_client_cli_blend_mistakes_are_one_line_before_any_call(tmp_path, capsys):
    from helpers import assert_one_line, run_cli

    target = ["--target", "127.0.0.1:1", "--timeout", "5"]  # nothing listens: a call would be UNAVAILABLE
    src = tmp_path / "in.png"
    src.write_bytes(IMAGE)
    out = str(tmp_path / "e.png")
    edit = ["client", "edit", str(src), "-p", "a car", "-o", out]
    cases = [
        (["--mask", str(tmp_path / "missing.png")], ("--mask", "no such file")),
        (["--mask-grow", "2"], ("--mask-grow", "give --mask")),
        (["--mask", str(src), "--mask-grow", "-1"], ("--mask-grow", "0..64")),
        (["--blend", "car", "--blend-start", "2"], ("--blend-start", "0..1")),
        (["--blend", "car", "--blend-threshold", "-1"], ("--blend-threshold", "0..1")),
        (["--save-mask", str(tmp_path / "m.png")], ("--save-mask", "give --mask")),
        (["--blend", "car", "--save-mask", str(tmp_path / "m.jpg")], ("--save-mask", ".png")),
        (["--blend", "car", "--save-mask", out], ("--save-mask", "also the -o/--output file")),
    ]
    for flags, fragments in cases:
        code, err = run_cli([*edit, *flags, *target], capsys)
        assert code == 2, (flags, err)
        assert_one_line(err, *fragments)
    generate = ["client", "generate", "-s", "a", "-t", "a car", "-o", out, "--mask-grow", "1", *target]
    code, err = run_cli(generate, capsys)
    assert code == 2 and "--mask-grow" in err, err


def test_client_blend_flags_are_fpedit_edits_own():
    """One definition: the client's blend flags and `fpedit edit`'s have the same names, defaults and help."""
    import argparse

    from fpedit.args import BLEND_FLAGS
    from fpedit.cli import build_parser

    def subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
        for name in names:
            action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = action.choices[name]
        return parser

    def blend_actions(parser: argparse.ArgumentParser) -> dict[str, tuple]:
        return {
            a.option_strings[0]: (a.default, a.help, a.type, a.metavar)
            for a in parser._actions
            if a.option_strings and a.option_strings[0] in BLEND_FLAGS.values()
        }

    root = build_parser()
    local = blend_actions(subparser(root, "edit"))
    assert len(local) == len(BLEND_FLAGS)
    for names in (("client", "edit"), ("client", "generate")):
        assert blend_actions(subparser(root, *names)) == local, names
