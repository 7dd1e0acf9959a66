"""``fpedit eval`` on PIE-Bench- and FPE-format datasets, ``fpedit score --json``, resume and interruption."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from eval_models import block_network, save_tiny_clip

from fpedit.cli import main

PIE = {
    "000000000000": {
        "image_path": "0_random/a.png",
        "original_prompt": "a [red] disc",
        "editing_prompt": "a [blue] disc",
        "editing_type_id": "0",
        "mask": [512 * 100, 512 * 200],
    },
    "000000000001": {
        "image_path": "1_change/b.png",
        "original_prompt": "a bar",
        "editing_prompt": "a [green] bar",
        "editing_type_id": "1",
        "mask": [512 * 256, 512 * 100],
    },
    "000000000002": {
        "image_path": "1_change/c.png",
        "original_prompt": "a scene",
        "editing_prompt": "a [night] scene",
        "editing_type_id": "1",
        "mask": [0, 0],
    },
}


@pytest.fixture
def pie(tmp_path):
    images = tmp_path / "annotation_images"
    for i, entry in enumerate(PIE.values()):
        path = images / entry["image_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(64, 64, seed=i).save(path)
    mapping = tmp_path / "mapping_file.json"
    mapping.write_text(json.dumps(PIE))
    return mapping, images


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("metric-models") / "clip")


def rows_of(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def check_summary_is_row_means(folder):
    rows = rows_of(folder / "results.csv")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["items"] == len(rows)
    for name, mean in summary["means"].items():
        values = [float(r[name]) for r in rows if r[name] and not math.isnan(float(r[name]))]
        assert mean == pytest.approx(np.mean(values), rel=1e-9), name
    return rows, summary


def test_eval_pie_format_scores_resumes_and_reports_missing_models(
    pie, model_dir, clip_dir, tmp_path, capsys, monkeypatch
):
    block_network(monkeypatch)
    mapping, images = pie
    out = tmp_path / "run"
    argv = [
        "eval",
        str(mapping),
        "-o",
        str(out),
        "--images",
        str(images),
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--clip",
        str(clip_dir),
        "--no-progress",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "left out structure_distance: needs --dino DIR" in captured.err
    rows, summary = check_summary_is_row_means(out)
    assert [r["id"] for r in rows] == list(PIE)
    assert [r["edit_type"] for r in rows] == ["0", "1", "1"]
    assert all(r["clip_similarity_target_image"] and r["psnr_unedit_part"] for r in rows)
    assert not any(r["structure_distance"] or r["psnr"] for r in rows)
    type1 = [float(r["mse_unedit_part"]) for r in rows if r["edit_type"] == "1"]
    assert summary["per_edit_type"]["1"]["means"]["mse_unedit_part"] == pytest.approx(np.mean(type1))
    assert summary["settings"]["steps"] == 2 and summary["settings"]["format"] == "pie"
    assert "| all | 3 |" in (out / "summary.md").read_text() and "| all | 3 |" in captured.out
    assert len(list((out / "images").glob("*.png"))) == 3

    # Resume: drop the last row and leave a torn line; only that item is edited again.
    kept = (out / "results.csv").read_text().splitlines()[:-1]
    (out / "results.csv").write_text("\n".join(kept) + "\n000000000002,1,0.5")
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert main(argv) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert after["000000000000.png"] == stamps["000000000000.png"]
    assert after["000000000001.png"] == stamps["000000000001.png"]
    assert after["000000000002.png"] != stamps["000000000002.png"]
    rows2, _ = check_summary_is_row_means(out)
    assert [r["id"] for r in rows2] == list(PIE)


def test_eval_fpe_format_generated_edits_and_interrupt(model_dir, tmp_path, capsys, monkeypatch):
    import fpedit.eval.runner as runner

    pairs = [
        {"soure_prompt": "a red car", "edit_prompt": "a blue car"},
        {"soure_prompt": "a cat", "edit_prompt": "a dog"},
    ]
    dataset = tmp_path / "pairs.json"
    dataset.write_text(json.dumps(pairs))
    out = tmp_path / "fpe"
    argv = ["eval", str(dataset), "-o", str(out), "--model", str(model_dir), "--steps", "1", "--no-progress"]
    real = runner._edit_and_score
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_edit_and_score", interrupt_second)
    assert main(argv) == 130
    rows, _ = check_summary_is_row_means(out)  # a valid file and summary with the finished item
    assert [r["id"] for r in rows] == ["0000"]
    monkeypatch.setattr(runner, "_edit_and_score", real)
    assert main(argv) == 0
    assert "left out clip_similarity_source_image" in capsys.readouterr().err
    rows, summary = check_summary_is_row_means(out)
    assert [r["id"] for r in rows] == ["0000", "0001"]
    assert summary["settings"]["format"] == "fpe" and "mse" in summary["means"]
    assert (out / "images" / "0001.source.png").is_file()


def test_eval_sweep_writes_a_row_per_setting_and_a_contact_sheet(model_dir, tmp_path):
    dataset = tmp_path / "pairs.json"
    dataset.write_text(json.dumps([{"source_prompt": "a red car", "target_prompt": "a blue car"}]))
    out = tmp_path / "sweep"
    argv = [
        "eval",
        str(dataset),
        "-o",
        str(out),
        "--model",
        str(model_dir),
        "--steps",
        "1",
        "--no-progress",
        "--sweep",
        "--sweep-layers",
        "4-14",
        "--sweep-windows",
        "0-0.5,0-1",
    ]
    assert main(argv) == 0
    table = (out / "sweep.md").read_text()
    assert "layers_4-14__window_0-0.5" in table and "__window_0-1 |" in table
    assert len(json.loads((out / "sweep.json").read_text())) == 2
    from PIL import Image

    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 200 and sheet.height > 100


def test_score_json_has_only_the_computed_metrics(tmp_path, clip_dir, capsys, monkeypatch):
    block_network(monkeypatch)
    make_image(64, 64, seed=0).save(tmp_path / "src.png")
    make_image(64, 64, seed=1).save(tmp_path / "out.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 255
    from PIL import Image

    Image.fromarray(mask).save(tmp_path / "mask.png")
    argv = [
        "score",
        "--source",
        str(tmp_path / "src.png"),
        "--edited",
        str(tmp_path / "out.png"),
        "--source-prompt",
        "a disc",
        "--target-prompt",
        "a blue disc",
        "--clip",
        str(clip_dir),
        "--json",
    ]
    assert main([*argv, "--mask", str(tmp_path / "mask.png")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {
        "psnr_unedit_part",
        "mse_unedit_part",
        "ssim_unedit_part",
        "clip_similarity_source_image",
        "clip_similarity_target_image",
        "clip_similarity_target_image_edit_part",
        "clip_directional_similarity",
    }
    assert (
        main(
            [
                "score",
                "--source",
                str(tmp_path / "nope.png"),
                "--edited",
                str(tmp_path / "out.png"),
                "--source-prompt",
                "a",
                "--target-prompt",
                "b",
            ]
        )
        == 2
    )
    assert "fpedit: error: --source: no such file" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope.json"), "-o", str(tmp_path / "o")]) == 2
    assert "fpedit: error: DATASET: no such file" in capsys.readouterr().err
    (tmp_path / "map.json").write_text(json.dumps({"1": {**PIE["000000000000"]}}))
    assert (
        main(["eval", str(tmp_path / "map.json"), "-o", str(tmp_path / "o"), "--images", str(tmp_path)]) == 2
    )
    assert "fpedit: error: --images: 1 image(s) not found" in capsys.readouterr().err


def test_eval_failed_items_are_recorded_skipped_in_means_and_retried(pie, model_dir, tmp_path, capsys):
    mapping, images = pie
    entries = dict(PIE)
    ids = list(PIE)
    # Between valid items: one whose image is missing, one whose image is corrupt.
    data = {ids[0]: entries[ids[0]], "000000000009": {**entries[ids[1]], "image_path": "1_change/gone.png"},
            ids[1]: entries[ids[1]], ids[2]: entries[ids[2]]}  # fmt: skip
    mapping.write_text(json.dumps(data))
    corrupt = images / entries[ids[1]]["image_path"]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "failing"
    argv = ["eval", str(mapping), "-o", str(out), "--images", str(images), "--model", str(model_dir),
            "--steps", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 1  # the run went on; the status says some items failed
    err = capsys.readouterr().err
    assert "1 image(s) not found" in err and "2 edit(s) failed" in err
    assert f"item {ids[1]} failed" in err and "item 000000000009 failed" in err
    rows = rows_of(out / "results.csv")
    assert [r["id"] for r in rows] == list(data)  # every item has its row, in order
    errors = {r["id"]: r["error"] for r in rows}
    assert errors[ids[0]] == errors[ids[2]] == ""
    assert errors["000000000009"] and errors[ids[1]]
    assert "gone.png" in errors["000000000009"]
    failed = [r for r in rows if r["error"]]
    assert all(r["psnr_unedit_part"] == "" and r["edit_seconds"] == "" for r in failed)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["items"], summary["failed"]) == (2, 2)
    assert sorted(summary["failed_ids"]) == sorted(["000000000009", ids[1]])
    good = [r for r in rows if not r["error"]]
    for name, mean in summary["means"].items():
        values = [float(r[name]) for r in good if r[name] and not math.isnan(float(r[name]))]
        assert mean == pytest.approx(np.mean(values), rel=1e-9), name
    assert summary["per_edit_type"]["1"] == {**summary["per_edit_type"]["1"], "items": 1, "failed": 2}
    assert "| all | 2 | 2 |" in (out / "summary.md").read_text()
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{ids[0]}.png", f"{ids[2]}.png"]

    # Resume: the done items are kept, the failed ones retried; the repaired image now scores.
    make_image(64, 64, seed=1).save(corrupt)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert main(argv) == 1  # the missing image still fails
    assert "1 edit(s) failed" in capsys.readouterr().err
    rows = rows_of(out / "results.csv")
    assert sorted(r["id"] for r in rows) == sorted(data) and len(rows) == 4
    assert {r["id"] for r in rows if r["error"]} == {"000000000009"}
    assert next(r for r in rows if r["id"] == ids[1])["psnr_unedit_part"] != ""
    after = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert (
        after[f"{ids[0]}.png"] == stamps[f"{ids[0]}.png"]
        and after[f"{ids[2]}.png"] == stamps[f"{ids[2]}.png"]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["items"], summary["failed"], summary["failed_ids"]) == (3, 1, ["000000000009"])


def test_eval_sweep_compares_blend_modes_with_pie_bench_masks_and_words(model_dir, engine, tmp_path):
    """--sweep-blends none,mask,words: one folder each; mask edits with PIE-Bench's mask, words with the
    item's blended_word that the prompts contain (DDIM: the target's alone), and the mask keeps the
    background closer to the source than no blend."""
    from PIL import Image

    from fpedit.engine.blend import Blend
    from fpedit.engine.options import EditOptions

    images = tmp_path / "annotation_images"
    (images / "0").mkdir(parents=True)
    make_image(128, 128, seed=3).save(images / "0" / "a.png")  # word maps of 4x4
    entry = {"image_path": "0/a.png", "original_prompt": "a [red] disc", "editing_prompt": "a [blue] disc",
             "editing_type_id": "0", "blended_word": "red blue", "mask": [512 * 100, 512 * 200]}  # fmt: skip
    mapping = tmp_path / "mapping_file.json"
    mapping.write_text(json.dumps({"000000000000": entry}))
    out = tmp_path / "sweep"
    argv = ["eval", str(mapping), "-o", str(out), "--images", str(images), "--model", str(model_dir),
            "--steps", "2", "--no-progress", "--sweep", "--sweep-layers", "paper", "--sweep-windows", "0-0.8",
            "--sweep-blends", "none,mask,words", "--blend-threshold", "0.99"]  # fmt: skip
    assert main(argv) == 0
    names = {"none": "layers_paper__window_0-0.8", "mask": "layers_paper__window_0-0.8__blend_mask",
             "words": "layers_paper__window_0-0.8__blend_words"}  # fmt: skip
    assert set(json.loads((out / "sweep.json").read_text())) == set(names.values())

    def edited(mode: str) -> np.ndarray:
        return np.asarray(Image.open(out / names[mode] / "images" / "000000000000.png").convert("RGB"))

    # The same edits through the engine, the mask decoded here: rows 100..299 of 512 (PIE-Bench's RLE).
    mask = np.zeros((512, 512), np.uint8)
    mask[100:300] = 255
    source = Image.open(images / "0" / "a.png")
    inversion = engine.invert(source, options=EditOptions(steps=2))
    expected = {}
    for mode, blend in (("none", None), ("mask", Blend(mask=Image.fromarray(mask))),
                        ("words", Blend(words=("blue",), threshold=0.99))):  # fmt: skip
        result = engine.edit_real(inversion, "a blue disc", options=EditOptions(steps=2, blend=blend))
        expected[mode] = result
        assert np.array_equal(edited(mode), np.asarray(result.edited_image.convert("RGB"))), mode
    for mode in ("mask", "words"):
        cells = expected[mode].blend_mask
        assert 0 < cells.sum() < cells.size, mode  # a real blend, neither nothing nor everything
        assert not np.array_equal(edited(mode), edited("none")), mode

    def summary(mode: str) -> dict:
        return json.loads((out / names[mode] / "summary.json").read_text())

    assert summary("mask")["means"]["mse_unedit_part"] < summary("none")["means"]["mse_unedit_part"]
    assert summary("words")["settings"]["blend"] == "words"
    assert summary("words")["settings"]["blend_threshold"] == 0.99
    assert "blend_threshold" not in summary("none")["settings"]


def test_eval_blend_mistakes_are_one_line_before_the_model_loads(pie, tmp_path, capsys):
    from helpers import assert_one_line, run_cli

    mapping, images = pie
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"source_prompt": "a red car", "target_prompt": "a blue car"}]))
    model = ["--model", str(tmp_path / "no-model-needed")]
    cases = [
        ([str(pairs), "--blend", "mask"], ("--blend", "PIE-Bench")),
        ([str(pairs), "--sweep", "--sweep-blends", "none,words"], ("--blend", "PIE-Bench")),
        ([str(mapping), "--images", str(images), "--sweep-blends", "mask"], ("--sweep-blends", "--sweep")),
        ([str(mapping), "--images", str(images), "--blend", "words", "--blend-threshold", "2"],
         ("--blend-threshold", "0..1")),
        ([str(mapping), "--images", str(images), "--blend", "mask", "--blend-start", "-1"],
         ("--blend-start", "0..1")),
        ([str(mapping), "--sweep", "--sweep-blends", "mask,everything"], ("--sweep-blends", "everything")),
    ]  # fmt: skip
    for args, fragments in cases:
        code, err = run_cli(["eval", *args, "-o", str(tmp_path / "out"), *model], capsys)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 or "usage:" in err, err
        if "usage:" not in err:
            assert_one_line(err, *fragments)
        else:
            assert all(f in err for f in fragments), err
