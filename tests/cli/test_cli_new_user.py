"""What a new user met in the first hour (issue 22 items 4-10, issue 16 item 8): each mistake is one
``fpedit: error:`` line naming the flag as typed, found before any model loads or any call is made."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from helpers import assert_one_line, run_cli, self_signed_cert
from PIL import Image

from fpedit.cli import build_parser, main

#: Nothing listens on port 1 of loopback: a client command that got as far as a call would exit 3 there.
NO_SERVER = ["--target", "127.0.0.1:1", "--timeout", "5"]


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "in.png"
    make_image(64, 64).save(path)
    return path


# --- item 4: no tracebacks ----------------------------------------------------------------------------------

#: A client-only install: `pip install 'fpedit[client]'` has grpcio and protobuf, no engine, no server parts.
CLIENT_ONLY = (
    "import importlib.abc, sys\n"
    "BLOCKED = {'torch', 'diffusers', 'transformers', 'tqdm', 'safetensors', 'grpc_reflection',\n"
    "           'prometheus_client', 'matplotlib', 'onnx', 'onnxruntime', 'ray'}\n"
    "class NotInstalled(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in BLOCKED:\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, NotInstalled())\n"
    "from fpedit.cli import main\n"
)


def test_bench_in_a_client_only_install_names_the_extras():
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY + "sys.exit(main(['bench', '--quick']))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, "torch", "tqdm", "pip install 'fpedit[engine,server]'")


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["client", "edit", "{img}", "-p", "x", "-o", "{tmp}/e.png", "--steps", "-3"], ["--steps", "-3"]),
        (["client", "edit", "{img}", "-p", "x", "-o", "{tmp}/e.png", "--steps", "99999999999"], ["--steps"]),
        (
            [
                "client",
                "edit",
                "{img}",
                "-p",
                "x",
                "-o",
                "{tmp}/e.png",
                "--inversion",
                "null-text",
                "--source-prompt",
                "a car",
                "--null-text-steps",
                "-1",
            ],
            ["--null-text-steps"],
        ),
        (["client", "invert", "{img}", "--steps", "-1"], ["--steps"]),
        (["client", "generate", "-s", "a", "-t", "b", "-o", "{tmp}/g.png", "--steps", "-2"], ["--steps"]),
        (["client", "edit", "{img}", "-p", "x", "-o", "{tmp}/e.png", "--guidance", "100"], ["--guidance"]),
        (["client", "edit", "{img}", "-p", "x", "-o", "{tmp}/e.png", "--window", "0.9", "0.1"], ["--window"]),
        (["client", "info", "--timeout", "-1"], ["--timeout", "positive"]),
    ],
)
def test_client_flags_are_judged_before_any_call(tmp_path, image_file, capsys, argv, fragments):
    argv = [a.format(img=image_file, tmp=tmp_path) for a in argv]
    target = ["--target", "127.0.0.1:1"] if "--timeout" in argv else NO_SERVER
    code, err = run_cli([*argv, *target], capsys)
    assert code == 2, err  # 3 would mean a call was made
    assert_one_line(err, *fragments)


# --- item 5: outputs that collide ---------------------------------------------------------------------------


def test_colliding_outputs_are_refused_before_any_work(tmp_path, image_file, capsys, no_engine):
    same = tmp_path / "e" / "same.png"
    edit = ["edit", str(image_file), "-p", "x", "-o", str(same), "--reconstruction"]
    generate = ["generate", "-s", "a", "-t", "b", "-o", str(same), "--source-output", str(same)]
    cases = [
        ([*edit, str(same)], "--reconstruction"),
        ([*edit, str(tmp_path / "e/../e/same.png")], "--reconstruction"),
        (generate, "--source-output"),
        (["client", *edit, str(same), *NO_SERVER], "--reconstruction"),
        (["client", *generate, *NO_SERVER], "--source-output"),
    ]
    for argv, fragment in cases:
        code, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert_one_line(err, fragment)
    assert not same.parent.exists()


# --- item 6: options that would be ignored ------------------------------------------------------------------


def test_source_prompt_without_an_inversion_method_is_refused(tmp_path, image_file, capsys, no_engine):
    out = str(tmp_path / "o.png")
    for argv in (
        ["edit", str(image_file), "-p", "x", "-o", out, "--source-prompt", "a car"],
        ["edit", str(image_file), "-p", "x", "-o", out, "--source-prompt", "a car", "--inversion", "ddim"],
        ["client", "edit", str(image_file), "-p", "x", "-o", out, "--source-prompt", "a car", *NO_SERVER],
        ["client", "invert", str(image_file), "--source-prompt", "a car", *NO_SERVER],
    ):
        code, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert_one_line(err, "--source-prompt", "DDIM", "null-text or negative-prompt")


def test_null_text_settings_without_null_text_are_refused(tmp_path, image_file, capsys, no_engine):
    out = str(tmp_path / "o.png")
    for argv, flag in (
        (["edit", str(image_file), "-p", "x", "-o", out, "--null-text-steps", "3"], "--null-text-steps"),
        (
            [
                "edit",
                str(image_file),
                "-p",
                "x",
                "-o",
                out,
                "--inversion",
                "negative-prompt",
                "--source-prompt",
                "a car",
                "--null-text-epsilon",
                "1e-4",
            ],
            "--null-text-epsilon",
        ),
        (
            ["client", "edit", str(image_file), "-p", "x", "-o", out, "--null-text-steps", "3", *NO_SERVER],
            "--null-text-steps",
        ),
    ):
        code, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)  # 3 would mean the client made a call
        assert_one_line(err, flag, "method null-text")


def test_inversion_options_with_an_id_say_they_do_not_apply(tmp_path, capsys):
    out = str(tmp_path / "o.png")
    code, err = run_cli(
        [
            "client",
            "edit",
            "--inversion-id",
            "abc",
            "--inversion",
            "null-text",
            "-p",
            "x",
            "-o",
            out,
            *NO_SERVER,
        ],
        capsys,
    )
    assert code == 2
    assert_one_line(err, "--inversion (method):", "do not apply to an inversion already made")

    # The server says the same to any client, before judging the options (a null-text method wants a prompt).
    from fpedit.engine.errors import InvalidInputError
    from fpedit.server.service import parse_edit
    from fpedit.v1 import edit_pb2 as pb

    request = pb.EditRequest(
        inversion_id="abc", target_prompt="x", inversion_method=pb.INVERSION_METHOD_NULL_TEXT
    )
    with pytest.raises(InvalidInputError) as info:
        parse_edit(request, 4096)
    assert info.value.field == "inversion_method"
    assert "do not apply to an inversion already made" in str(info.value)


def test_layers_an_export_lacks_are_refused_before_inverting(
    qk_export, tmp_path, image_file, capsys, monkeypatch
):
    from fpedit.engine.pipeline import EditEngine

    def refuse(*args, **kwargs):
        raise AssertionError("the image was inverted before the layers were checked")

    monkeypatch.setattr(EditEngine, "invert", refuse)
    argv = ["edit", str(image_file), "-p", "x", "-o", str(tmp_path / "o.png"), "--model", str(qk_export)]
    code, err = run_cli([*argv, "--layers", "2-3", "--steps", "2", "--no-progress"], capsys)
    assert code == 2, err
    assert_one_line(err, "--layers", "[2, 3]", "re-export")


# --- item 7: path mistakes before torch ---------------------------------------------------------------------


def test_path_mistakes_are_reported_before_torch_is_imported(tmp_path, image_file):
    (tmp_path / "adir").mkdir()
    cases = [
        [str(tmp_path / "missing.png"), "-p", "x", "-o", str(tmp_path / "o.png")],
        [str(image_file), "-p", "x", "-o", str(tmp_path / "o.xyz")],
        [str(image_file), "-p", "x", "-o", str(tmp_path / "adir")],
    ]
    script = (
        "import sys, time\n"
        "from fpedit.cli import main\n"
        f"for argv in {cases!r}:\n"
        "    started = time.perf_counter()\n"
        "    code = main(['edit', *argv])\n"
        "    print(code, 'torch' in sys.modules, round(time.perf_counter() - started, 3))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    results = [line.split() for line in proc.stdout.splitlines()]
    assert [r[:2] for r in results] == [["2", "False"]] * 3, (proc.stdout, proc.stderr)
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("fpedit: error:") for line in errors), errors
    assert "no such file" in errors[0] and "extension" in errors[1] and "is a directory" in errors[2]


# --- item 8 and issue 16 item 8: serve start-up -------------------------------------------------------------


def test_serve_start_up_errors_name_the_flag_before_the_model_loads(tmp_path, capsys, no_engine):
    model = ["--model", "/nonexistent-model-dir"]
    code, err = run_cli(["serve", *model, "--workers", "0"], capsys)
    assert code == 2
    assert err.strip() == "fpedit: error: --workers: must be at least 1"
    code, err = run_cli(["serve", *model, "--host", "no-such-host.invalid", "--port", "0"], capsys)
    assert code == 2
    assert_one_line(err, "--host", "does not resolve")
    assert "in use" not in err

    cert, key = self_signed_cert(tmp_path / "a")
    _, other_key = self_signed_cert(tmp_path / "b")
    cases = [
        (
            ["--tls-cert", str(cert), "--tls-key", str(other_key)],
            ["--tls-key", "is not the private key", "cert.pem"],
        ),
        (["--tls-cert", str(key), "--tls-key", str(cert)], ["--tls-cert", "swapped"]),
        (["--tls-cert", str(cert)], ["--tls-key"]),
    ]
    for flags, fragments in cases:
        code, err = run_cli(["serve", *model, "--port", "0", *flags], capsys)
        assert code == 2, err
        assert_one_line(err, *fragments)
        assert "cannot bind" not in err


def test_serve_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    """A subprocess, because gRPC's own bind failure is written by its C core straight to stderr."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    script = (
        "import sys\n"
        "import fpedit.engine.flags, fpedit.cli\n"
        "def refuse(*a, **k):\n"
        "    raise SystemExit('MODEL LOADED')\n"
        "fpedit.engine.flags.engine_from_config = refuse\n"
        f"sys.exit(fpedit.cli.main(['serve', '--port', '{port}', '--metrics-port', '0']))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"fpedit: error: --port: cannot bind 127.0.0.1:{port}: the port is in use by another process"
    ), proc.stderr


@pytest.mark.parametrize("flag", ["--metrics-port", "--http-port"])
def test_serve_side_port_in_use_is_one_line_naming_its_flag_before_the_model_loads(flag, monkeypatch, capsys):
    """The metrics and HTTP ports are judged with the gRPC one, not found taken after the model loaded.
    In-process: these checks come before gRPC binds, so its C core writes nothing to stderr."""
    import fpedit.engine.flags

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the ports were checked")

    monkeypatch.setattr(fpedit.engine.flags, "engine_from_config", refuse)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_cli(["serve", "--port", "0", flag, str(port)], capsys)
    assert code == 2, err
    assert (
        err.strip()
        == f"fpedit: error: {flag}: cannot bind 127.0.0.1:{port}: the port is in use by another process"
    )


# --- item 9: consistency ------------------------------------------------------------------------------------


def test_client_exit_codes_and_info_keys_against_a_real_server(engine, tmp_path, capsys):
    from fpedit.server.app import build_server
    from fpedit.server.service import ServerConfig

    server = build_server(engine, ServerConfig(port=0, workers=1, max_queue=2))
    try:
        target = ["--target", f"127.0.0.1:{server.port}", "--timeout", "60"]
        code, err = run_cli(
            ["client", "edit", "--inversion-id", "nosuch", "-p", "x", "-o", str(tmp_path / "e.png"), *target],
            capsys,
        )
        assert code == 1  # the server answered with an error status
        assert_one_line(err, "NOT_FOUND")
        assert main(["client", "info", *target]) == 0
        remote = json.loads(capsys.readouterr().out)
    finally:
        server.drain(5)
    local = engine.info()
    assert remote["health"] == "SERVING"
    for key in (
        "model",
        "backend",
        "device",
        "dtype",
        "map_layers",
        "map_formats",
        "default_image_size",
        "max_side",
    ):
        assert remote[key] == local[key], key
    assert remote["defaults"] == local["defaults"]
    assert remote["map_formats"] == ["qk", "probs"]
    code, err = run_cli(["client", "info", *NO_SERVER], capsys)
    assert code == 3  # nobody answered
    assert_one_line(err, "UNAVAILABLE")


def test_client_against_a_tls_server_with_and_without_ca_cert(engine, tmp_path, capsys):
    from fpedit.server.app import build_server
    from fpedit.server.service import ServerConfig

    cert, key = self_signed_cert(tmp_path)
    server = build_server(engine, ServerConfig(port=0, workers=1, tls_cert=str(cert), tls_key=str(key)))
    try:
        target = ["--target", f"127.0.0.1:{server.port}", "--timeout", "30"]
        assert main(["client", "info", *target, "--ca-cert", str(cert)]) == 0
        assert json.loads(capsys.readouterr().out)["health"] == "SERVING"
        code, err = run_cli(["client", "info", *target], capsys)
    finally:
        server.drain(2)
    assert code == 3  # UNAVAILABLE, as for no server, but the line says what to add
    assert_one_line(err, "UNAVAILABLE", "--ca-cert")


def test_generate_and_client_generate_share_the_seed_default():
    parser = build_parser()
    local = parser.parse_args(["generate", "-s", "a", "-t", "b", "-o", "g.png"])
    remote = parser.parse_args(["client", "generate", "-s", "a", "-t", "b", "-o", "g.png"])
    assert local.seed == remote.seed == 0


def test_model_loads_print_no_library_chatter_without_verbose(model_dir, tmp_path):
    """A subprocess, because pytest captures warnings: without -v, stderr stays empty for a folder load
    (transformers' "Loading weights" bar), a single file with --model-config (diffusers' deprecation
    notes on the folder's scheduler config, which asks for steps_offset and clip_sample) and an export."""
    from fpedit.engine.conversion import convert

    single = convert(model_dir, tmp_path / "tiny.safetensors")
    folder_load = ["info", "--model", str(model_dir)]
    single_file_load = ["info", "--model", str(single), "--model-config", str(model_dir)]
    export = ["export", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--graphs", "text_encoder"]
    script = (  # the loads in one process (torch and diffusers import once), the export first: once a
        # command has quieted the libraries they stay quiet in that process
        "import sys\n"
        "from fpedit.cli import main\n"
        f"sys.exit(main({export!r}) or main({folder_load!r}) or main({single_file_load!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.count('"backend": "torch"') == 2


def test_verbose_logs_model_load_backend_and_stage_timings(model_dir, tmp_path, image_file, capsys, caplog):
    caplog.set_level(logging.INFO, logger="fpedit")
    assert main(["-v", "info", "--model", str(model_dir)]) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("model loaded in ") and "backend torch on cpu" in m for m in messages), messages
    caplog.clear()
    out = tmp_path / "o.png"
    argv = ["edit", str(image_file), "-p", "x", "-o", str(out), "--model", str(model_dir), "--steps", "2"]
    assert main([*argv, "--no-progress", "-v"]) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    done = [m for m in messages if m.startswith("edit done in ")]
    assert len(done) == 1 and "inversion" in done[0] and "vae_decode" in done[0] and "UNet rows" in done[0]
    assert any("loading model" in m for m in messages)


def test_export_folders_take_the_umask_permissions(tmp_path):
    from fpedit.export.onnx_export import staging_dir

    out = tmp_path / "export"
    with staging_dir(out) as stage:
        (stage / "manifest.json").write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert out.stat().st_mode & 0o777 != 0o700 or umask == 0o077


def test_client_json_names_the_replica_that_served():
    from fpedit.server.cli import _with_replica
    from fpedit.v1 import edit_pb2 as pb

    assert _with_replica({"seed": 1}, pb.Stats(replica="EditReplica#abc")) == {
        "seed": 1,
        "replica": "EditReplica#abc",
    }
    assert _with_replica({"seed": 1}, pb.Stats()) == {"seed": 1}


# --- item 10: help shows every default ----------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, prefix: str = "fpedit"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{prefix} {name}")


def test_every_option_help_shows_its_default():
    flags_without = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction)
            ):
                continue
            if action.default is argparse.SUPPRESS or action.required:
                continue
            if (
                isinstance(action, (argparse._StoreTrueAction, argparse._AppendAction))
                or action.default is None
            ):
                # Flags and unset options: a default is still named where one applies (the named ones below).
                continue
            if "default" not in (action.help or ""):
                flags_without.append(f"{name} {action.option_strings[-1]}")
    assert flags_without == []
    named = {
        "fpedit serve": ["--max-queue", "--max-image-pixels", "--grace-s", "--vae-dtype", "--dtype"],
        "fpedit edit": ["--vae-dtype", "--dtype", "--no-progress", "--stats", "--reconstruction"],
        "fpedit bench": ["--requests", "--device"],
        "fpedit client edit": ["--timeout", "--source-prompt", "--null-text-steps"],
    }
    parsers = dict(_parsers(build_parser()))
    for name, options in named.items():
        for option in options:
            action = parsers[name]._option_string_actions[option]
            assert "default" in action.help, (name, option, action.help)


def test_client_says_plainly_that_an_image_is_over_the_servers_message_limit(engine, tmp_path, capsys):
    """Over --max-message-mb: the servicer's own message (counted); far over it (past gRPC's backstop at twice
    the flag): gRPC's wording, which names a limit nobody set, is said plainly instead."""
    from fpedit.server.app import build_server
    from fpedit.server.service import ServerConfig

    rng = np.random.default_rng(0)
    over, far_over = tmp_path / "over.png", tmp_path / "far.png"
    Image.fromarray(rng.integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(over)  # ~1.9 MB
    Image.fromarray(rng.integers(0, 256, (1100, 1100, 3), dtype=np.uint8)).save(far_over)  # ~3.6 MB
    assert 1 << 20 < over.stat().st_size < 2 << 20 < far_over.stat().st_size
    server = build_server(engine, ServerConfig(port=0, max_message_bytes=1 << 20))
    try:
        target = ["--target", f"127.0.0.1:{server.port}", "--timeout", "60"]
        for image, fragment in (
            (over, "takes at most 1048576 (--max-message-mb)"),
            (far_over, "far over the server's limit (its --max-message-mb)"),
        ):
            code, err = run_cli(
                ["client", "edit", str(image), "-p", "x", "-o", str(tmp_path / "e.png"), *target], capsys
            )
            assert code == 1
            assert_one_line(err, "RESOURCE_EXHAUSTED")
            assert fragment in err and "2097152" not in err, err
    finally:
        server.drain(5)
