"""The fpedit command line: edits write files, user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest
from conftest import make_image
from helpers import assert_one_line, run_cli
from PIL import Image

from fpedit.cli import main, parse_layers


def test_parse_layers():
    assert parse_layers("4-14") == tuple(range(4, 15))
    assert parse_layers("3,5,7-9") == (3, 5, 7, 8, 9)
    assert parse_layers("resolution") == "resolution"
    for bad in ("", "a-b", "9-3", "x"):
        with pytest.raises(Exception, match="layers"):
            parse_layers(bad)


def test_edit_writes_images(tmp_path, model_dir, capsys):
    src = tmp_path / "in.png"
    make_image(100, 70).save(src)
    out, rec = tmp_path / "o" / "edit.png", tmp_path / "o" / "rec.png"
    code = main(
        [
            "edit",
            str(src),
            "-p",
            "a red car",
            "-o",
            str(out),
            "--reconstruction",
            str(rec),
            "--model",
            str(model_dir),
            "--steps",
            "3",
            "--layers",
            "resolution",
            "--stats",
            "--no-progress",
        ]
    )
    assert code == 0
    assert Image.open(out).size == (100, 70) and Image.open(rec).size == (100, 70)  # the input's size
    captured = capsys.readouterr()
    stats = json.loads(captured.out)  # stdout holds the JSON alone, so it pipes into jq
    assert stats["unet_rows"] == 2 + 2 + 6
    assert f"wrote {out}" in captured.err


def test_generate_writes_both_images(tmp_path, capsys):
    out = tmp_path / "gen.png"
    code = main(
        [
            "generate",
            "-s",
            "a cat",
            "-t",
            "a dog",
            "--seed",
            "3",
            "-o",
            str(out),
            "--steps",
            "2",
            "--no-progress",
            "--map-format",
            "probs",
        ]
    )
    assert code == 0
    assert Image.open(out).size == (64, 64)
    assert Image.open(tmp_path / "gen.source.png").size == (64, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "steps"),
        (["--guidance", "nan"], "guidance_scale"),
        (["--window", "0.9", "0.1"], "replace_window"),
        (["--layers", "1,99"], "layers"),
        (["--model", "/no/such/model"], "neither 'tiny' nor a folder"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    src = tmp_path / "in.png"
    make_image(64, 64).save(src)
    out = tmp_path / "out.png"
    code = main(["edit", str(src), "-p", "a red car", "-o", str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("fpedit: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_corrupt_image_and_empty_prompt(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert (
        main(["edit", str(bad), "-p", "x", "-o", str(tmp_path / "o.png"), "--steps", "2", "--no-progress"])
        == 2
    )
    assert "image" in capsys.readouterr().err
    good = tmp_path / "good.png"
    make_image(64, 64).save(good)
    assert (
        main(["edit", str(good), "-p", " ", "-o", str(tmp_path / "o.png"), "--steps", "2", "--no-progress"])
        == 2
    )
    assert "target_prompt" in capsys.readouterr().err


def test_console_script_info():
    exe = shutil.which("fpedit")
    cmd = [exe, "info"] if exe else [sys.executable, "-m", "fpedit.cli", "info"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["backend"] == "torch" and info["model"] == "tiny"
    assert info["defaults"]["layers"] == list(range(4, 15))


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ("out.xyz", "extension must be one of"),
        ("noext", "extension must be one of"),
        ("adir", "is a directory"),
    ],
)
def test_outputs_are_checked_before_any_work(tmp_path, capsys, no_engine, output, fragment):
    src = tmp_path / "in.png"
    make_image(64, 64).save(src)
    (tmp_path / "adir").mkdir()
    code, err = run_cli(["edit", str(src), "-p", "x", "-o", str(tmp_path / output)], capsys)
    assert code == 2
    assert_one_line(err, "-o/--output", fragment)
    code, err = run_cli(["generate", "-s", "a", "-t", "b", "-o", str(tmp_path / output)], capsys)
    assert code == 2
    assert_one_line(err, "-o/--output", fragment)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--device", "gpu"], ["--device", "cpu, cuda or cuda:N", "'gpu'"]),
        (["--window", "0.5", "0.2"], ["--window (replace_window)"]),
        (["-p", " "], ["-p/--prompt (target_prompt)"]),
        (["--steps", "x"], ["--steps"]),
    ],
)
def test_mistakes_name_the_flag_the_user_typed(tmp_path, capsys, no_engine, args, fragments):
    src = tmp_path / "in.png"
    make_image(64, 64).save(src)
    code, err = run_cli(["edit", str(src), "-p", "x", "-o", str(tmp_path / "o.png"), *args], capsys)
    assert code == 2
    assert_one_line(err, *fragments)


def test_image_that_is_a_directory_and_generate_ranges(tmp_path, capsys, no_engine):
    code, err = run_cli(["edit", str(tmp_path), "-p", "x", "-o", str(tmp_path / "o.png")], capsys)
    assert code == 2
    assert_one_line(err, "IMAGE", "is a directory")
    for flag, value, fragment in (("--seed", "-1", "0..2**63-1"), ("--height", "100", "multiple of 64")):
        code, err = run_cli(
            ["generate", "-s", "a", "-t", "b", "-o", str(tmp_path / "g.png"), flag, value], capsys
        )
        assert code == 2
        assert_one_line(err, flag, fragment)


def test_export_folders_pick_their_backend(qk_export, tmp_path, capsys):
    src = tmp_path / "in.png"
    make_image(64, 64).save(src)
    code, err = run_cli(
        [
            "edit",
            str(src),
            "-p",
            "x",
            "-o",
            str(tmp_path / "o.png"),
            "--model",
            str(qk_export),
            "--backend",
            "torch",
        ],
        capsys,
    )
    assert code == 2
    assert_one_line(err, "--backend onnxruntime")
    assert main(["info", "--model", str(qk_export)]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "onnxruntime"


def test_version_verbose_and_help_texts(capsys):
    from fpedit import __version__
    from fpedit.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"fpedit {__version__}"
    parser = build_parser()
    assert parser.parse_args(["info", "-v"]).verbose is True
    assert parser.parse_args(["-v", "info"]).verbose is True
    assert parser.parse_args(["info"]).verbose is False
    assert parser.parse_args(["client", "info", "-v"]).verbose is True

    def parsers(p, prefix="fpedit"):
        yield prefix, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from parsers(child, f"{prefix} {name}")

    # `serve` and `bench` options belong to the service and benchmark code and are checked by their tests.
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, p in parsers(parser)
        if name.split(" ")[1:2] not in (["serve"], ["bench"])
        for action in p._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []
    invert = dict(parsers(parser))["fpedit client invert"]
    assert not {"--window", "--layers", "--map-format", "--format"} & set(invert._option_string_actions)
    assert "127.0.0.1:50051" in dict(parsers(parser))["fpedit client edit"].format_help()


def test_client_and_help_import_no_torch():
    """A product backend that only calls the service must not pay for torch, diffusers or transformers."""
    heavy = ("torch", "diffusers", "transformers")
    script = (
        "import sys\n"
        "import fpedit.server.client\n"
        "from fpedit.cli import main\n"
        "for argv in (['--help'], ['client', '--help'], ['client', 'edit', '--help'], ['client', 'invert', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print('LOADED', [m for m in {heavy!r} if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout[-500:]
    assert "fpedit client" in proc.stdout


def test_client_mistakes_are_one_line_before_any_call(tmp_path, capsys):
    # Port 1 on loopback: nothing listens, so a call that got this far would fail with UNAVAILABLE instead.
    target = ["--target", "127.0.0.1:1", "--timeout", "5"]
    cases = [
        (
            ["client", "generate", "-s", "a", "-t", "b", "--seed", "-1", "-o", str(tmp_path / "g.png")],
            ["--seed"],
        ),
        (["client", "generate", "-s", "a", "-t", "b", "-o", str(tmp_path / "g.xyz")], ["extension"]),
        (
            ["client", "generate", "-s", "a", "-t", "b", "-o", str(tmp_path / "g.png"), "--format", "jpeg"],
            ["--format jpeg does not match"],
        ),
        (["client", "invert", str(tmp_path)], ["is a directory"]),
        (["client", "edit", "-p", "x", "-o", str(tmp_path / "e.png")], ["exactly one"]),
        (
            ["client", "edit", "--inversion-id", '{"id": 1}', "-p", "x", "-o", str(tmp_path / "e.png")],
            ["--inversion-id"],
        ),
    ]
    for args, fragments in cases:
        code, err = run_cli([*args, *target], capsys)
        assert code == 2, (args, err)
        assert_one_line(err, *fragments)
    code, err = run_cli(["client", "info", *target], capsys)
    assert code == 3  # unreachable: distinct from a mistake (2) and from a server's refusal (1)
    assert_one_line(err, "UNAVAILABLE", "is `fpedit serve` running at 127.0.0.1:1?")


def test_inversion_id_accepts_the_invert_json():
    from fpedit.server.cli import _inversion_id

    assert _inversion_id("abc123") == "abc123"
    assert _inversion_id('{"inversion_id": "abc123", "width": 64}\n') == "abc123"


def test_client_against_a_real_server(engine, tmp_path, capsys):
    """invert -q prints the id alone; edit takes it (or the JSON line); files hold their extension's format."""
    from fpedit.server.app import build_server
    from fpedit.server.service import ServerConfig

    server = build_server(engine, ServerConfig(port=0, workers=1, max_queue=4))
    try:
        target = ["--target", f"127.0.0.1:{server.port}", "--timeout", "120"]
        src = tmp_path / "in.png"
        make_image(64, 64).save(src)
        assert main(["client", "invert", str(src), "-q", "--steps", "2", *target]) == 0
        inversion_id = capsys.readouterr().out.strip()
        assert inversion_id and "{" not in inversion_id
        assert main(["client", "invert", str(src), "--steps", "2", *target]) == 0
        json_line = capsys.readouterr().out.strip()
        assert json.loads(json_line)["inversion_id"]

        out = tmp_path / "edit.jpg"
        assert (
            main(["client", "edit", "--inversion-id", json_line, "-p", "a car", "-o", str(out), *target]) == 0
        )
        assert out.read_bytes()[:2] == b"\xff\xd8"  # JPEG, as the extension says
        assert (
            main(["client", "edit", "--inversion-id", inversion_id, "-p", "a car", "-o", str(out), *target])
            == 0
        )

        gen = tmp_path / "gen.webp"
        argv = ["client", "generate", "-s", "a", "-t", "b", "--seed", "3", "--steps", "2", "-o", str(gen)]
        assert main([*argv, *target]) == 0
        for path in (gen, tmp_path / "gen.source.webp"):
            data = path.read_bytes()
            assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    finally:
        server.drain(5)


def test_stderr_says_each_thing_once(tmp_path):
    """Long prompts warn once each (no transformers 'indexing errors' line); no library chatter at fp16."""
    long_prompt = "a photo of a very long prompt " * 20
    exe = shutil.which("fpedit")
    cmd = [exe] if exe else [sys.executable, "-m", "fpedit.cli"]
    argv = ["generate", "-s", long_prompt, "-t", long_prompt + "x", "--steps", "1", "--no-progress"]
    argv += ["--dtype", "float16", "-o", str(tmp_path / "g.png")]
    proc = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert sum("truncated to 77" in line for line in lines) == 2, lines
    assert [line for line in lines if "truncated to 77" not in line and not line.startswith("wrote ")] == []
