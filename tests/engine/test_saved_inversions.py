"""Inversions saved to disk and edited later, and several prompts from one inversion at the command line."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from conftest import make_image, sharpen_attention
from PIL import Image
from safetensors.torch import save_file

from fpedit import EditEngine, EditOptions, InvalidInputError
from fpedit.cli import edit_outputs, main, prompt_slug
from fpedit.engine.tiny import save_tiny_model

STEPS = 3
OPTIONS = EditOptions(steps=STEPS)


@pytest.fixture(scope="module")
def second_engine(model_dir) -> EditEngine:
    """Another engine on the same checkpoint, as a later process would load it."""
    return EditEngine.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Same architecture, other weights (another seed)."""
    return sharpen_attention(save_tiny_model(tmp_path_factory.mktemp("other") / "sd1-tiny", seed=8))


def rewrite_metadata(path, **changes: str) -> None:
    """Edit a safetensors file's metadata in place, tensors untouched (what a foreign writer could produce)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("ddim", {}),
        ("negative-prompt", {"source_prompt": "a photo of a car"}),
        ("null-text", {"source_prompt": "a photo of a car", "null_text_steps": 1}),
    ],
)
def test_saved_inversion_edits_like_the_one_in_memory(engine, second_engine, tmp_path, method, extra):
    image = make_image(130, 66, seed=5)  # edited at 128x64 (ratio 2 against 1.97), returned at 130x66
    inversion = engine.invert(image, options=OPTIONS, method=method, **extra)
    path = engine.save_inversion(inversion, tmp_path / "inv.safetensors")
    loaded = second_engine.load_inversion(path)

    assert torch.equal(loaded.trajectory.cpu(), inversion.trajectory.cpu())
    assert (loaded.method, loaded.steps, loaded.source_prompt) == (
        method,
        STEPS,
        extra.get("source_prompt", ""),
    )
    assert loaded.size == (128, 64) and loaded.input_size == (130, 66)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(inversion.image))
    if method == "ddim":
        assert loaded.null_embeddings is None and loaded.guidance_scale is None
    else:
        assert torch.equal(loaded.null_embeddings.cpu(), inversion.null_embeddings.cpu())
        assert loaded.guidance_scale == OPTIONS.guidance_scale

    # Both are first edits (maps captured now): the same calls on the same numbers give the same bits.
    from_file = second_engine.edit_real(loaded, "a red car", options=OPTIONS)
    in_memory = engine.edit_real(inversion, "a red car", options=OPTIONS)
    assert np.array_equal(from_file.edited_latents, in_memory.edited_latents)
    assert np.array_equal(np.asarray(from_file.edited_image), np.asarray(in_memory.edited_image))
    assert from_file.edited_image.size == (130, 66)


def test_file_from_another_model_is_refused(engine, other_model, tmp_path):
    path = engine.save_inversion(
        engine.invert(make_image(64, 64), options=OPTIONS), tmp_path / "i.safetensors"
    )
    other = EditEngine.from_pretrained(other_model)
    with pytest.raises(InvalidInputError, match=r"^inversion_file: .*another weights") as info:
        other.load_inversion(path)
    assert info.value.field == "inversion_file"


@pytest.mark.parametrize(
    ("field", "value"),
    [("backend", "onnxruntime"), ("dtype", "float16"), ("scheduler", '{"beta_start": 0.001}')],
)
def test_file_with_another_fingerprint_field_is_refused(engine, tmp_path, field, value):
    path = engine.save_inversion(
        engine.invert(make_image(64, 64), options=OPTIONS), tmp_path / "i.safetensors"
    )
    fingerprint = dict(engine.fingerprint, **{field: value})
    rewrite_metadata(path, engine=json.dumps(fingerprint))
    with pytest.raises(InvalidInputError, match=rf"^inversion_file: .*another {field} "):
        engine.load_inversion(path)


def test_damaged_or_foreign_files_are_refused(engine, tmp_path):
    good = engine.save_inversion(
        engine.invert(make_image(64, 64), options=OPTIONS), tmp_path / "g.safetensors"
    )
    png = tmp_path / "photo.safetensors"
    make_image(64, 64).save(png, format="PNG")
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    wrong_steps = tmp_path / "s.safetensors"
    wrong_steps.write_bytes(good.read_bytes())
    rewrite_metadata(wrong_steps, steps="7")
    cases = [
        (tmp_path / "missing.safetensors", "no such file"),
        (tmp_path, "is a directory"),
        (png, "not a safetensors file"),
        (foreign, "not an fpedit inversion"),
        (truncated, "damaged"),
        (wrong_steps, "does not fit 7 steps"),
    ]
    for path, message in cases:
        with pytest.raises(InvalidInputError, match=f"^inversion_file: .*{message}"):
            engine.load_inversion(path)


def test_save_refuses_bad_paths_and_foreign_inversions(engine, second_engine, tmp_path):
    inversion = engine.invert(make_image(64, 64), options=OPTIONS)
    with pytest.raises(InvalidInputError, match=r"\.safetensors"):
        engine.save_inversion(inversion, tmp_path / "inv.pt")
    with pytest.raises(InvalidInputError, match="another engine"):
        second_engine.save_inversion(inversion, tmp_path / "inv.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_steps_must_match_the_saved_inversion(engine, tmp_path):
    path = engine.save_inversion(
        engine.invert(make_image(64, 64), options=OPTIONS), tmp_path / "i.safetensors"
    )
    with pytest.raises(InvalidInputError, match=r"^steps"):
        engine.edit_real(engine.load_inversion(path), "a red car", options=EditOptions(steps=STEPS + 1))


def test_output_templates():
    assert prompt_slug("A Red  car!") == "a-red-car" and prompt_slug("***") == "prompt"
    assert prompt_slug("Ünïcode café, Straße") == "unicode-cafe-strae"  # accents dropped, not their letters
    paths = edit_outputs(__import__("pathlib").Path("out/{i:02d}-{prompt}.png"), ["a red car", "a blue car"])
    assert [str(p) for p in paths] == ["out/00-a-red-car.png", "out/01-a-blue-car.png"]
    assert [str(p) for p in edit_outputs(__import__("pathlib").Path("x.png"), ["one"])] == ["x.png"]


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "a", "-p", "b", "-o", "{out}/x.png"], "--output (output): 2 prompts need a placeholder"),
        (["-p", "a", "-p", "b", "-o", "{out}/{j}.png"], "unknown placeholder {j}"),
        (["-p", "a car", "-p", "A car!", "-o", "{out}/{prompt}.png"], "prompts 0 and 1 would both write"),
        (
            ["-p", "a", "-p", "b", "-o", "{out}/{i}.png", "--reconstruction", "{out}/1.png"],
            "--reconstruction",
        ),
        (["-p", "a", "-o", "{out}/x.png", "--save-inversion", "{out}/inv.pt"], "--save-inversion: "),
    ],
)
def test_cli_refuses_bad_outputs_before_loading(tmp_path, capsys, argv, message):
    src = tmp_path / "in.png"
    make_image(64, 64).save(src)
    argv = [a.replace("{out}", str(tmp_path)) for a in argv]
    code, _, err = run_cli(["edit", str(src), *argv, "--model", str(tmp_path / "no-model")], capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_cli_several_prompts_one_inversion_then_edit_from_the_file(tmp_path, model_dir, capsys):
    src = tmp_path / "in.png"
    make_image(130, 66, seed=2).save(src)
    saved = tmp_path / "inv.safetensors"
    model = ["--model", str(model_dir), "--steps", str(STEPS), "--no-progress"]
    argv = ["edit", str(src), "-p", "a red car", "-p", "a blue car", "-o", str(tmp_path / "out" / "{i}.png")]
    code, out, err = run_cli([*argv, "--save-inversion", str(saved), "--stats", *model], capsys)
    assert code == 0, err
    edits = json.loads(out)["edits"]
    replaced = int(STEPS * 0.8)
    # One inversion: the first edit inverts (STEPS - 1 rows) and captures the source maps; the second runs
    # the target branch alone from the cached maps.
    assert [e["unet_rows"] for e in edits] == [(STEPS - 1) + replaced + 2 * STEPS, 2 * STEPS]
    assert [e["source_maps_cached"] for e in edits] == [0, replaced]
    assert [e["prompt"] for e in edits] == ["a red car", "a blue car"]
    assert "edit 1/2 'a red car'" in err and "edit 2/2 'a blue car'" in err
    red, blue = (np.asarray(Image.open(tmp_path / "out" / f"{i}.png"), np.int16) for i in (0, 1))
    assert red.shape == blue.shape == (66, 130, 3) and np.abs(red - blue).max() > 10
    assert saved.is_file()

    # Later, from the file: no IMAGE, steps from the file, same result as the second prompt above.
    later = tmp_path / "later.png"
    argv = ["edit", "--inversion-file", str(saved), "-p", "a blue car", "-o", str(later)]
    code, _, err = run_cli([*argv, "--model", str(model_dir), "--no-progress"], capsys)
    assert code == 0, err
    assert np.abs(np.asarray(Image.open(later), np.int16) - blue).max() <= 1

    # Inversion settings do not apply to a saved inversion, and another model's engine refuses the file.
    code, _, err = run_cli([*argv, "--source-prompt", "a car", "--model", str(model_dir)], capsys)
    assert code == 2 and "--source-prompt: inversion options do not apply" in err
    code, _, err = run_cli([*argv, str(src), "--model", str(model_dir)], capsys)
    assert code == 2 and "leave out IMAGE" in err
    code, _, err = run_cli([*argv, "--steps", "5", "--model", str(model_dir)], capsys)
    assert code == 2 and "--steps: " in err


def test_cli_refuses_a_file_from_another_model(tmp_path, model_dir, other_model, engine, capsys):
    saved = engine.save_inversion(
        engine.invert(make_image(64, 64), options=OPTIONS), tmp_path / "i.safetensors"
    )
    out = tmp_path / "o.png"
    argv = ["edit", "--inversion-file", str(saved), "-p", "x", "-o", str(out), "--model", str(other_model)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "fpedit: error: --inversion-file: " in err and "another weights" in err
    assert not out.exists()


def test_exported_engine_saves_loads_and_is_told_apart(qk_export, engine, tmp_path):
    """An ONNX Runtime engine identifies its weights by the export's source hash: the same digest the torch
    engine computes for the checkpoint it was exported from, so only the backend field tells them apart."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    exported = EditEngine.from_pretrained(qk_export, backend="onnxruntime")
    inversion = exported.invert(make_image(64, 64), options=OPTIONS)
    path = exported.save_inversion(inversion, tmp_path / "onnx.safetensors")
    assert torch.equal(exported.load_inversion(path).trajectory.cpu(), inversion.trajectory.cpu())
    assert exported.fingerprint["weights"] == engine.fingerprint["weights"]
    with pytest.raises(InvalidInputError, match=r"^inversion_file: .*another backend \(onnxruntime; "):
        engine.load_inversion(path)
