"""The fpedit command line: edits write files, user errors print one line and exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import make_image
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
    assert Image.open(out).size == (128, 64) and Image.open(rec).size == (128, 64)
    stats = json.loads(capsys.readouterr().out.split("\n", 2)[2])
    assert stats["unet_rows"] == 2 + 2 + 6


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
