"""The benchmark entry points run and write what they promise (figures themselves are not asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fpedit.benchmarks.bench import BenchConfig, run_bench, write_outputs

REPO = Path(__file__).resolve().parents[2]


def test_bench_writes_the_documented_json(model_dir, qk_export, tmp_path, monkeypatch):
    # The ONNX Runtime figures run on the session's export of the same model (its sizes 64..128 px include
    # the bench's 64 px), copied where the bench exports: exporting is tested in test_onnx.py, and a second
    # export here cost this test most of its time.
    import fpedit.export.onnx_export as onnx_export

    requested = []

    def reuse_export(model, out, **kwargs):
        requested.append((Path(model), kwargs["image_size"]))
        shutil.copytree(qk_export, out)
        return out

    monkeypatch.setattr(onnx_export, "export_onnx", reuse_export)
    cfg = BenchConfig.quick(
        model=str(model_dir),
        steps=3,
        size=64,
        repeat=1,
        requests=4,
        concurrency=4,
        backends=("torch", "onnxruntime", "tensorrt"),
    )
    report = run_bench(cfg, progress=False)
    assert [(model, (size.min, size.max)) for model, size in requested] == [(model_dir, (64, 64))]
    paths = write_outputs(report, tmp_path / "bench.json")
    data = json.loads(paths[0].read_text())
    for backend in ("torch", "onnxruntime"):
        for kind in ("real_edit", "cached_edit", "generated_edit"):
            entry = data["engine"][backend][kind]
            assert {"median_ms", "p95_ms", "stages_ms", "unet_rows"} <= set(entry)
            assert entry["median_ms"] > 0
        assert data["engine"][backend]["cached_edit"]["unet_rows"] == 2 * 3
        assert data["engine"][backend]["real_edit"]["unet_rows"] == 2 + 2 + 2 * 3
    grpc = data["grpc"]
    assert {
        "concurrency",
        "requests",
        "errors",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "throughput_rps",
        "overhead_ms",
    } <= set(grpc)
    assert grpc["concurrency"] >= 4 and grpc["errors"] == 0 and grpc["completed"] == 4
    assert data["machine"]["cpu_count"] >= 1 and "torch" in data["machine"]["versions"]
    assert "| torch | real_edit |" in paths[1].read_text()
    # A backend that cannot run here is reported with its reason, never dropped silently.
    if "tensorrt" not in data["engine"]:
        assert "TensorRT" in data["skipped_backends"]["tensorrt"]
        assert "| tensorrt | skipped: " in paths[1].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "dry-run"
    assert {"real_edit", "re_edit", "generated_edit"} <= set(data["latency"])
    assert "SUMMARY dry-run" in proc.stdout


def test_machine_facts_name_the_commit_given_where_git_cannot(monkeypatch):
    """A lent GPU machine runs a copy without .git: the commit comes from FPEDIT_COMMIT."""
    from fpedit.benchmarks import machine

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(machine.subprocess, "run", no_git)
    monkeypatch.setenv("FPEDIT_COMMIT", "abc1234")
    assert machine.machine_facts()["commit"] == "abc1234"
    monkeypatch.delenv("FPEDIT_COMMIT")
    assert machine.git_commit() is None


def test_adapter_mix_writes_both_strategies_and_the_switch_cost(tmp_path):
    """One short round per layout: both batching strategies side by side, and the switch measurement."""
    pytest.importorskip("peft")
    from fpedit.benchmarks.adapter_mix import SET_COUNTS, main

    out = tmp_path / "adapter_mix.json"
    assert main(["--steps", "1", "--repeat", "1", "--switch-edits", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    labels = {"no adapters", *(f"{k} set" + ("s" if k > 1 else "") for k in SET_COUNTS)}
    for strategy in ("mix", "group"):
        assert set(data["results"][strategy]) == labels
        assert data["results"][strategy]["1 set"]["vs_one_set"] == 1.0
    assert data["results"]["group"]["8 sets"]["mixed_calls_per_round"] == 0
    assert data["results"]["mix"]["8 sets"]["mixed_calls_per_round"] > 0  # 8 sets, 2 requests a call
    assert set(data["mix_vs_group"]) == labels and data["switch"]["alternating_vs_same"] > 0
