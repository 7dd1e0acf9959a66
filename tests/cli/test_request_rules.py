"""One verdict per request, whichever door it comes in by: the request rules (engine/options.py) judged through
the CLI (``fpedit edit``), gRPC and HTTP (real servers on 127.0.0.1) and the Python API (``EditEngine``).

Each rule is a request in the API's terms; each entry point translates it into its own spelling, sends it, and
reports ``None`` (accepted) or the refused field in the API's terms and the message. Every door must refuse
the same field with the rule's reason, or accept.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from helpers import make_image, png_bytes, run_cli

from fpedit.args import COMMON_FLAGS, EDIT_FLAGS
from fpedit.engine import EditOptions, InvalidInputError
from fpedit.server.app import build_server
from fpedit.server.config import ServerConfig
from fpedit.v1 import edit_pb2 as pb
from fpedit.v1 import edit_pb2_grpc

STEPS = 2


@dataclass(frozen=True)
class Rule:
    """A request (inversion fields in the API's names, ``steps``, and whether it edits an inversion already
    made) and the verdict: the refused field and a fragment of the reason, or ``None`` (accepted)."""

    name: str
    inversion: dict[str, Any] = field(default_factory=dict)
    steps: int = STEPS
    kept: bool = False
    refused: str | None = None
    reason: str = ""


RULES = [
    Rule("ddim-refuses-a-source-prompt", {"source_prompt": "a disc"}, refused="source_prompt", reason="DDIM"),
    Rule(
        "ddim-named-refuses-a-source-prompt",
        {"method": "ddim", "source_prompt": "a disc"},
        refused="source_prompt",
        reason="does not use a source prompt",
    ),
    Rule(
        "null-text-needs-a-source-prompt",
        {"method": "null-text"},
        refused="source_prompt",
        reason="needs one",
    ),
    Rule(
        "null-text-settings-need-null-text",
        {"method": "negative-prompt", "source_prompt": "a disc", "null_text_steps": 3},
        refused="null_text_steps",
        reason="only null-text",
    ),
    Rule(
        "an-inversion-made-takes-no-inversion-options",
        {"source_prompt": "a disc"},
        kept=True,
        refused="source_prompt",
        reason="do not apply to an inversion already made",
    ),
    Rule("steps-in-range", steps=0, refused="steps", reason="1..1000"),
    Rule(
        "negative-prompt-with-a-source-prompt-runs", {"method": "negative-prompt", "source_prompt": "a disc"}
    ),
]
#: The API's field names as the servers spell them.
SERVER_FIELDS = {"inversion_method": "method", "options.steps": "steps"}
GRPC_METHODS = {
    "ddim": pb.INVERSION_METHOD_DDIM,
    "null-text": pb.INVERSION_METHOD_NULL_TEXT,
    "negative-prompt": pb.INVERSION_METHOD_NEGATIVE_PROMPT,
}


class Accepted(Exception):
    """The CLI got past every rule: it went on to load a model."""


@pytest.fixture(scope="module")
def running(engine):
    server = build_server(engine, ServerConfig(port=0, http_port=0, workers=1, max_queue=8))
    yield server
    server.drain(5)


@pytest.fixture(scope="module")
def made(engine):
    """An inversion already made, for the Python API's door (the servers and the CLI refuse before a lookup)."""
    return engine.invert(make_image(64, 64), options=EditOptions(steps=STEPS))


def verdict_of_server(message: str) -> tuple[str, str]:
    name, _, reason = message.partition(": ")
    return SERVER_FIELDS.get(name, name), reason


def via_cli(rule: Rule, tmp_path, capsys, monkeypatch) -> tuple[str, str] | None:
    import fpedit.engine.flags

    def loaded(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(fpedit.engine.flags, "engine_from_config", loaded)
    image = tmp_path / "in.png"
    make_image(64, 64).save(image)
    source = ["--inversion-file", str(tmp_path / "made.safetensors")] if rule.kept else [str(image)]
    argv = ["edit", *source, "-p", "a red disc", "-o", str(tmp_path / "out.png"), "--steps", str(rule.steps)]
    for name, value in rule.inversion.items():
        argv += [EDIT_FLAGS[name], str(value)]
    try:
        code, err = run_cli(argv, capsys)
    except Accepted:
        return None
    assert code == 2, err
    flags = {**COMMON_FLAGS, **EDIT_FLAGS}
    line = err.removeprefix("fpedit: error: ")
    refused = next(
        name for name, flag in flags.items() if line.startswith(f"{flag}:") or line.startswith(f"{flag} (")
    )
    return refused, line


def grpc_request(rule: Rule) -> pb.EditRequest:
    request = pb.EditRequest(target_prompt="a red disc", options=pb.EditOptions(steps=rule.steps))
    if rule.kept:
        request.inversion_id = "0" * 32
    else:
        request.image = png_bytes()
    for name, value in rule.inversion.items():
        if name == "method":
            request.inversion_method = GRPC_METHODS[value]
        else:
            setattr(request, name, value)
    return request


def via_grpc(rule: Rule, running) -> tuple[str, str] | None:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        try:
            edit_pb2_grpc.EditServiceStub(channel).Edit(grpc_request(rule), timeout=300)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
            return verdict_of_server(exc.details())
    return None


def via_http(rule: Rule, running) -> tuple[str, str] | None:
    body: dict[str, Any] = {"targetPrompt": "a red disc", "options": {"steps": rule.steps}}
    if rule.kept:
        body["inversionId"] = "0" * 32
    else:
        body["image"] = base64.b64encode(png_bytes()).decode()
    names = {"method": "inversionMethod", "source_prompt": "sourcePrompt", "null_text_steps": "nullTextSteps"}
    for name, value in rule.inversion.items():
        body[names[name]] = pb.InversionMethod.Name(GRPC_METHODS[value]) if name == "method" else value
    response = httpx.post(running.http.url.rstrip("/") + "/v1/edit", json=body, timeout=300)
    if response.status_code == 200:
        return None
    assert response.status_code == 400, response.text
    return verdict_of_server(response.json()["error"]["message"])


def via_python(rule: Rule, engine, made) -> tuple[str, str] | None:
    try:
        engine.edit_real(
            made if rule.kept else make_image(64, 64),
            "a red disc",
            options=EditOptions(steps=rule.steps),
            **rule.inversion,
        )
    except InvalidInputError as exc:
        return exc.field, exc.reason
    return None


@pytest.mark.parametrize("door", ["cli", "grpc", "http", "python"])
@pytest.mark.parametrize("rule", RULES, ids=[rule.name for rule in RULES])
def test_every_entry_point_gives_the_rules_verdict(
    rule, door, engine, made, running, tmp_path, capsys, monkeypatch
):
    if door == "cli":
        verdict = via_cli(rule, tmp_path, capsys, monkeypatch)
    elif door == "grpc":
        verdict = via_grpc(rule, running)
    elif door == "http":
        verdict = via_http(rule, running)
    else:
        verdict = via_python(rule, engine, made)
    if rule.refused is None:
        assert verdict is None
    else:
        assert verdict is not None, f"{door} accepted {rule.name}"
        refused, reason = verdict
        assert (refused, rule.reason in reason) == (rule.refused, True), verdict
