"""ONNX export of the contract's graphs and the ONNX Runtime backend, against torch and the reference."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import make_image, model_input
from reference import rel_l2

from fpedit import EditEngine, EditOptions, InvalidInputError, ModelLoadError
from fpedit.engine.contract import (
    GRAPHS,
    PAPER_LAYERS,
    UNET_WEIGHTS_FILE,
    WEIGHTS_ALIGNMENT,
    ShapeRange,
    unet_io,
)
from fpedit.export.onnx_export import export_onnx
from fpedit.export.verify import verify_export

SIZES = ShapeRange(64, 128, 128)
GEN_TOL, REAL_TOL = 1e-3, 3e-3  # relative L2 of ONNX Runtime against the reference


@pytest.fixture(scope="module")
def probs_export(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "probs"
    export_onnx(model_dir, out, map_format="probs", image_size=SIZES)
    return out


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_export_writes_checked_graphs_with_contract_io(qk_export, engine):
    spec = engine.spec
    for graph in GRAPHS:
        path = qk_export / f"{graph}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
    capture = onnx.load(str(qk_export / "unet_capture.onnx"), load_external_data=False)
    inject = onnx.load(str(qk_export / "unet_inject.onnx"), load_external_data=False)
    plain = onnx.load(str(qk_export / "unet_plain.onnx"), load_external_data=False)
    std = ["sample", "timestep", "encoder_hidden_states"]
    assert [i.name for i in plain.graph.input] == std
    assert [o.name for o in capture.graph.output] == ["noise_pred"] + [
        f"map_out_{i:02d}" for i in range(4, 15)
    ]
    assert [i.name for i in inject.graph.input] == [
        *std,
        *[f"map_in_{i:02d}" for i in range(4, 15)],
        "map_gate",
    ]
    # Shapes and dynamic axes are the contract's.
    inputs, outputs = unet_io("inject", spec, PAPER_LAYERS, "qk")
    for value, tensor in zip(inject.graph.input, inputs, strict=True):
        assert dims(value) == list(tensor.shape), tensor.name
    _, outputs = unet_io("capture", spec, PAPER_LAYERS, "qk")
    for value, tensor in zip(capture.graph.output, outputs, strict=True):
        assert dims(value) == list(tensor.shape), tensor.name


@pytest.mark.parametrize("fixture", ["qk_export", "probs_export"])
def test_every_variant_matches_torch(request, fixture):
    errors = verify_export(request.getfixturevalue(fixture), batch=3, image_side=64)
    assert {e.graph for e in errors} == set(GRAPHS)
    assert len([e for e in errors if e.graph == "unet_capture"]) == 1 + len(PAPER_LAYERS)
    worst = max(errors, key=lambda e: e.max_rel)
    assert worst.max_rel < 1e-4, worst


def test_ort_generated_edit_matches_reference(ort_engine, reference):
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(2))
    for opts in (EditOptions(steps=6), EditOptions(steps=6, layers=(5, 9, 14), replace_window=(0.2, 0.9))):
        r = ort_engine.edit_generated("a cat", "a dog", latents=z, options=opts)
        ref_src, ref_tgt = reference.edit_generated(
            "a cat", "a dog", z, opts.steps, opts.guidance_scale, opts.replace_window, opts.layers
        )
        assert rel_l2(r.source_latents, ref_src) < GEN_TOL
        assert rel_l2(r.edited_latents, ref_tgt) < GEN_TOL
        # Injection is what is being checked: without it the same run misses by >= 10x the tolerance.
        off = ort_engine.edit_generated(
            "a cat", "a dog", latents=z, options=opts.replace(replace_window=(0, 0))
        )
        assert rel_l2(off.edited_latents, ref_tgt) >= 10 * GEN_TOL, opts


def test_ort_real_edit_and_reedit_match_reference(ort_engine, reference):
    image = make_image()
    opts = EditOptions(steps=6)
    inv = ort_engine.invert(image, options=opts)
    z0 = reference.encode(model_input(image))
    for prompt, layers in (("a red car", PAPER_LAYERS), ("a blue boat", (6, 7, 12))):
        o = opts.replace(layers=layers)
        r = ort_engine.edit_real(inv, prompt, options=o)
        _, ref_src, ref_tgt = reference.edit_real(
            z0, prompt, o.steps, o.guidance_scale, o.replace_window, layers
        )
        assert rel_l2(r.edited_latents, ref_tgt) < REAL_TOL
        assert rel_l2(r.source_latents, ref_src) < REAL_TOL
        off = ort_engine.edit_real(inv, prompt, options=o.replace(replace_window=(0, 0)))
        assert rel_l2(off.edited_latents, ref_tgt) >= 10 * REAL_TOL, layers
    # The capture graph holds all 11 exported layers, so the subset edit above reused the first one's maps.
    assert r.stats["unet_rows"] == 2 * opts.steps and r.stats["source_maps_cached"] == 4


def test_probs_export_runs_edits(probs_export, engine, image):
    eng = EditEngine.from_pretrained(probs_export, backend="onnxruntime")
    opts = EditOptions(steps=5, map_format="probs")
    a = eng.edit_real(image, "a red car", options=opts)
    b = engine.edit_real(image, "a red car", options=opts)
    assert rel_l2(a.edited_latents, b.edited_latents) < REAL_TOL
    off = eng.edit_real(a.inversion, "a red car", options=opts.replace(replace_window=(0, 0)))
    assert rel_l2(off.edited_latents, b.edited_latents) >= 10 * REAL_TOL
    with pytest.raises(InvalidInputError, match="map_format"):
        eng.edit_real(image, "a red car", options=opts.replace(map_format="qk"))


def test_layers_outside_the_export_are_refused(ort_engine, image):
    with pytest.raises(InvalidInputError, match=r"exported layers \[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14\]"):
        ort_engine.edit_real(image, "a red car", options=EditOptions(steps=3, layers=(2, 5)))
    # The torch backend serves any layer.
    EditEngine.from_pretrained("tiny").edit_generated(
        "a", "b", seed=0, options=EditOptions(steps=2, layers=(1, 2))
    )


def test_dynamic_sizes_run_and_static_exports_refuse_others(ort_engine, model_dir, tmp_path):
    # Dynamic spatial axes: a size outside the TensorRT profile range still runs in ONNX Runtime.
    r = ort_engine.edit_real(make_image(192, 256), "a red car", options=EditOptions(steps=2))
    assert r.edited_image.size == (192, 256)
    export_onnx(model_dir, tmp_path / "static", image_size=ShapeRange(64, 64, 64))
    static = EditEngine.from_pretrained(tmp_path / "static", backend="onnxruntime")
    assert static.edit_real(make_image(64, 64), "a car", options=EditOptions(steps=2)).edited_image.size == (
        64,
        64,
    )
    with pytest.raises(InvalidInputError, match=r"image sizes \(64x64\)"):
        static.edit_real(make_image(128, 128), "a red car", options=EditOptions(steps=2))


def test_export_is_deterministic_and_supports_external_data(model_dir, tmp_path):
    kwargs = {"image_size": SIZES, "graphs": ["unet_inject", "text_encoder"]}
    a = export_onnx(model_dir, tmp_path / "a", **kwargs)
    export_onnx(model_dir, tmp_path / "b", **kwargs)
    for file in ("unet_inject.onnx", UNET_WEIGHTS_FILE, "text_encoder.onnx"):
        digest = [hashlib.sha256((tmp_path / d / file).read_bytes()).hexdigest() for d in "ab"]
        assert digest[0] == digest[1], file
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    assert a.source_hash.startswith("sha256:")

    # A graph other than the UNet's keeps its own data file when asked to (or past 2 GB).
    ext = export_onnx(
        model_dir, tmp_path / "ext", external_data="always", image_size=SIZES, graphs=["text_encoder"]
    )
    data = tmp_path / "ext" / "text_encoder.onnx.data"
    assert data.stat().st_size > (tmp_path / "ext" / "text_encoder.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "ext" / "text_encoder.onnx"), full_check=True)
    assert ext.files == {"text_encoder": "text_encoder.onnx"}

    # --external-data never: every UNet graph embeds its weights, no shared file.
    export_onnx(
        model_dir, tmp_path / "inline", external_data="never", image_size=SIZES, graphs=["unet_plain"]
    )
    assert not (tmp_path / "inline" / UNET_WEIGHTS_FILE).exists()
    assert initializer_bytes(tmp_path / "inline" / "unet_plain.onnx") > 0.9 * unet_parameter_bytes(model_dir)


def initializer_bytes(graph: Path) -> int:
    """Bytes of the initializers a graph file holds inline (external ones are not loaded)."""
    proto = onnx.load(str(graph), load_external_data=False)
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def unet_parameter_bytes(model_dir: Path) -> int:
    from safetensors.numpy import load_file

    return sum(a.nbytes for f in (model_dir / "unet").glob("*.safetensors") for a in load_file(f).values())


def test_unet_graphs_hold_one_copy_of_the_weights(qk_export, model_dir):
    """The three UNet graphs point into one weights file, each tensor stored once (three inline copies were
    3x the UNet's bytes; ONNX Runtime and TensorRT then held three copies too)."""
    one_copy = unet_parameter_bytes(model_dir)
    held = (qk_export / UNET_WEIGHTS_FILE).stat().st_size + sum(
        initializer_bytes(qk_export / f"{graph}.onnx")
        for graph in ("unet_plain", "unet_capture", "unet_inject")
    )
    assert one_copy < held < 1.1 * one_copy
    for graph in ("unet_plain", "unet_capture", "unet_inject"):
        proto = onnx.load(str(qk_export / f"{graph}.onnx"), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in external]
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {
            UNET_WEIGHTS_FILE
        }
        assert all(offset % WEIGHTS_ALIGNMENT == 0 for offset in offsets), graph
        assert sum(len(t.raw_data) for t in proto.graph.initializer) < 0.02 * one_copy, graph


@pytest.fixture(scope="module")
def fp16_export(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp16"
    export_onnx(model_dir, out, fp16=True, image_size=SIZES)
    return out


def test_fp16_export_passes_the_checker_and_verify_export(fp16_export, tmp_path, capsys):
    """Every graph of an fp16 export is checked, typed float16 (VAE float32), and verifies as the README says."""
    from fpedit.cli import main

    for graph in GRAPHS:
        onnx.checker.check_model(str(fp16_export / f"{graph}.onnx"), full_check=True)
    first_input = {
        graph: onnx.load(str(fp16_export / f"{graph}.onnx"), load_external_data=False).graph.input[0]
        for graph in ("unet_inject", "vae_decoder")
    }
    assert first_input["unet_inject"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert first_input["vae_decoder"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    report = tmp_path / "errors.json"
    # The README's command, with no --tolerance: the default follows the manifest's precision.
    assert main(["verify-export", str(fp16_export), "--json", str(report)]) == 0
    assert "OK: max relative error" in capsys.readouterr().out
    worst = max(e["max_rel"] for e in json.loads(report.read_text()))
    assert 1e-3 < worst < 1e-2  # over the float32 bound, within the float16 one


def test_fp16_export_runs_an_edit(fp16_export, image):
    eng = EditEngine.from_pretrained(fp16_export, backend="onnxruntime")
    assert eng.info()["precision"] == "float16"
    r = eng.edit_real(image, "a red car", options=EditOptions(steps=3))
    assert np.isfinite(r.edited_latents).all() and r.edited_image.size == image.size


def test_a_failed_export_leaves_no_export_behind(model_dir, tmp_path, monkeypatch):
    import fpedit.export.onnx_export as onnx_export

    real_trace_graph = onnx_export.trace_graph
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("simulated exporter failure")
        return real_trace_graph(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "trace_graph", fail_on_second)
    graphs = ["text_encoder", "vae_decoder"]
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(model_dir, tmp_path / "new", image_size=SIZES, graphs=graphs)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging folder left either

    # A previous complete export in the way survives a failed re-export untouched.
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "manifest.json").write_text("{}")
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(model_dir, previous, image_size=SIZES, graphs=graphs)
    assert sorted(p.name for p in previous.iterdir()) == ["manifest.json"]


def test_export_refuses_a_foreign_folder_before_any_work(tmp_path, monkeypatch):
    import fpedit.export.onnx_export as onnx_export

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(onnx_export, "load_components", must_not_load)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="non-empty directory without an fpedit manifest"):
        export_onnx("tiny", tmp_path / "photos")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not a directory"):
        export_onnx("tiny", tmp_path / "file")


def test_a_partial_export_does_not_replace_an_export_with_more_graphs(tmp_path, monkeypatch, capsys):
    """``--graphs`` writes a folder with those graphs alone; the folder is replaced whole, so an export there
    holding others would lose them. Refused before any work, naming the graphs it would drop."""
    import fpedit.export.onnx_export as onnx_export
    from fpedit.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the graphs were checked")

    monkeypatch.setattr(onnx_export, "load_components", must_not_load)
    full = tmp_path / "full"
    full.mkdir()
    manifest = json.dumps({"graphs": {name: {} for name in GRAPHS}})
    (full / "manifest.json").write_text(manifest)
    with pytest.raises(InvalidInputError, match="unet_plain") as info:
        export_onnx("tiny", full, graphs=["text_encoder"])
    assert info.value.field == "graphs" and "text_encoder, unet_plain" not in str(info.value)
    assert main(["export", "--model", "tiny", "--out", str(full), "--graphs", "text_encoder"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fpedit: error: --graphs: ") and err.count("\n") == 1, err
    assert (full / "manifest.json").read_text() == manifest and len(list(full.iterdir())) == 1


def test_incomplete_export_dirs_are_refused(tmp_path, qk_export):
    with pytest.raises(ModelLoadError, match="manifest"):
        EditEngine.from_pretrained(tmp_path, backend="onnxruntime")
    with pytest.raises(ModelLoadError, match="fpedit-tensorrt"):
        from fpedit.engine.backends.graph_backend import read_manifest

        read_manifest(qk_export, "fpedit-tensorrt")


def test_tensorrt_profiles_follow_the_contract(qk_export):
    from fpedit.engine.backends.graph_backend import read_manifest
    from fpedit.export.tensorrt_build import check_ranges, profile_shapes

    manifest = read_manifest(qk_export, "fpedit-onnx")
    shapes = profile_shapes(manifest, "unet_inject", ShapeRange(1, 2, 8), ShapeRange(64, 128, 128))
    assert shapes["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 16, 16))
    layer14 = manifest.spec.layer(14)
    assert shapes["map_in_14"] == (
        (1, 2, 64, layer14.channels),
        (2, 2, 256, layer14.channels),
        (8, 2, 256, layer14.channels),
    )
    assert shapes["map_gate"] == ((1, 11), (2, 11), (8, 11))
    with pytest.raises(InvalidInputError, match="image_size"):
        check_ranges(manifest, ShapeRange(1, 2, 8), ShapeRange(64, 128, 512))


class FakePolygraphy:
    """Stands in for ``tensorrt`` and ``polygraphy.backend.trt`` and records what the builder hands them."""

    def __init__(self, version: str) -> None:
        self.networks: list[tuple[tuple, dict]] = []
        self.configs: list[dict] = []
        self.profiles: list[dict] = []
        self.builds: list[dict] = []
        recorder = self

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict = {}
                recorder.profiles.append(self.shapes)

            def add(self, name, min, opt, max):  # polygraphy's keyword names
                self.shapes[name] = (tuple(min), tuple(opt), tuple(max))
                return self

        def CreateConfig(**kwargs):
            recorder.configs.append(kwargs)
            return ("config", len(recorder.configs))

        def network_from_onnx_path(*args, **kwargs):
            recorder.networks.append((args, kwargs))
            return ("network", args[0])

        def engine_from_network(network, config=None, save_timing_cache=None):
            recorder.builds.append({"network": network, "config": config, "cache": save_timing_cache})
            Path(save_timing_cache).write_bytes(b"timing")
            return ("engine", network[1])

        def save_engine(engine, path):
            Path(path).write_bytes(b"plan of " + Path(engine[1]).name.encode())

        self.trt = types.SimpleNamespace(
            __version__=version, MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE")
        )
        self.module = types.ModuleType("polygraphy.backend.trt")
        for obj in (Profile, CreateConfig, network_from_onnx_path, engine_from_network, save_engine):
            setattr(self.module, obj.__name__, obj)

    def install(self, monkeypatch) -> None:
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        for name in ("polygraphy", "polygraphy.backend"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", self.module)


def test_tensorrt_build_hands_polygraphy_a_strongly_typed_configuration(qk_export, tmp_path, monkeypatch):
    """TensorRT 11 has no weak typing: no precision flag may reach CreateConfig; precision is the ONNX's."""
    from fpedit.export.tensorrt_build import build_engines

    fake = FakePolygraphy("11.0.0")
    fake.install(monkeypatch)
    out = tmp_path / "plans"
    manifest = build_engines(qk_export, out, workspace_gib=2, builder_optimization_level=3)

    assert [(Path(args[0]).name, kwargs) for args, kwargs in fake.networks] == [
        (f"{graph}.onnx", {"strongly_typed": True}) for graph in manifest.files
    ]
    assert all(
        set(config) == {"profiles", "load_timing_cache", "memory_pool_limits", "builder_optimization_level"}
        for config in fake.configs
    )
    assert all(config["memory_pool_limits"] == {"WORKSPACE": 2 * 1024**3} for config in fake.configs)
    assert all(config["builder_optimization_level"] == 3 for config in fake.configs)
    # The first build starts a timing cache in the output folder; every later build reuses it.
    assert fake.configs[0]["load_timing_cache"] is None
    assert all(config["load_timing_cache"] for config in fake.configs[1:])
    assert len({build["cache"] for build in fake.builds}) == 1
    # One profile per graph, from the export's ranges (batch 1:2:8, sides 64:128:128 px).
    unet = dict(zip(manifest.files, fake.profiles, strict=True))["unet_inject"]
    assert unet["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 16, 16))
    assert unet["map_gate"] == ((1, 11), (2, 11), (8, 11))
    written = json.loads((out / "manifest.json").read_text())
    assert written["format"] == "fpedit-tensorrt"
    assert written["extra"]["tensorrt_version"] == "11.0.0" and written["extra"]["strongly_typed"] is True
    assert (out / "unet_inject.plan").read_bytes() == b"plan of unet_inject.onnx"
    assert (out / "timing.cache").is_file() and (out / "tokenizer").is_dir()
    assert written["extra"]["refittable"] is False

    # Refittable engines (LoRA swaps by refit, issue 19) are asked of polygraphy only when wanted.
    refit = FakePolygraphy("11.0.0")
    refit.install(monkeypatch)
    manifest = build_engines(qk_export, tmp_path / "refit", refittable=True)
    assert [config.get("refittable") for config in refit.configs] == [True] * len(manifest.files)
    assert manifest.extra["refittable"] is True


def test_tensorrt_build_refuses_other_versions_and_bad_options(qk_export, tmp_path, monkeypatch):
    from fpedit.export.tensorrt_build import build_engines

    FakePolygraphy("9.3.0").install(monkeypatch)
    with pytest.raises(
        ModelLoadError, match=r"TensorRT 9\.3\.0 is not supported; install TensorRT 10\.x or 11\.x"
    ):
        build_engines(qk_export, tmp_path / "plans")
    assert not (tmp_path / "plans").exists()
    with pytest.raises(InvalidInputError, match="opt_level"):
        build_engines(qk_export, tmp_path / "plans", builder_optimization_level=9)


def test_tensorrt_backend_on_gpu(qk_export, tmp_path, reference, image):
    """Builds engines and compares a real edit with the reference; runs only where TensorRT and a GPU exist."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (no NVIDIA GPU stack here)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from fpedit.export.tensorrt_build import build_engines

    tolerance = 1e-2  # TensorRT may use TF32 for float32 layers
    build_engines(qk_export, tmp_path / "plans")
    trt_engine = EditEngine.from_pretrained(tmp_path / "plans", backend="tensorrt", device="cuda")
    opts = EditOptions(steps=6)
    r = trt_engine.edit_real(image, "a red car", options=opts)
    _, _, ref_tgt = reference.edit_real(
        reference.encode(model_input(image)), "a red car", 6, 7.5, opts.replace_window, PAPER_LAYERS
    )
    assert rel_l2(r.edited_latents, ref_tgt) < tolerance
    off = trt_engine.edit_real(r.inversion, "a red car", options=opts.replace(replace_window=(0, 0)))
    assert rel_l2(off.edited_latents, ref_tgt) >= 10 * tolerance
    # CUDA-graph replay: the same call shapes again give the same result.
    again = trt_engine.edit_real(r.inversion, "a red car", options=opts)
    assert rel_l2(again.edited_latents, r.edited_latents) < 1e-6
    assert trt_engine.info()["captured_shapes"] > 0


def test_onnxruntime_cuda_provider(qk_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("onnxruntime-gpu with a CUDA GPU is not available here")
    eng = EditEngine.from_pretrained(qk_export, backend="onnxruntime", device="cuda")
    cpu = EditEngine.from_pretrained(qk_export, backend="onnxruntime")
    a = eng.edit_generated("a", "b", seed=0, options=EditOptions(steps=3))
    b = cpu.edit_generated("a", "b", seed=0, options=EditOptions(steps=3))
    assert rel_l2(a.edited_latents, b.edited_latents) < 1e-3


def test_serve_refuses_a_partial_export_before_loading_it(qk_export, tmp_path, monkeypatch, capsys):
    """A folder from ``fpedit export --graphs`` would load and then refuse every edit: ``fpedit serve`` says so
    at start-up, naming the graphs it lacks, before any model loads."""
    import fpedit.engine.flags
    from fpedit.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the export was judged")

    monkeypatch.setattr(fpedit.engine.flags, "engine_from_config", must_not_load)
    partial = tmp_path / "partial"
    shutil.copytree(qk_export, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    for graph in ("unet_plain", "vae_encoder"):  # as `--graphs` leaves them out
        (partial / manifest["files"].pop(graph)).unlink()
        manifest["graphs"].pop(graph, None)
    (partial / "manifest.json").write_text(json.dumps(manifest))
    assert main(["serve", "--model", str(partial), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fpedit: error: --model: "), err
    assert "partial export without vae_encoder, unet_plain" in err


def test_export_traces_at_the_smallest_size_whatever_the_export_sizes(model_dir, tmp_path, monkeypatch):
    """The tracer runs each graph once at 8x8 latents, not at the export's opt size: the graphs do not depend
    on the traced size (the fp16 export verifies at its opt size above), and a float16 trace of SD 1.5 at
    the opt size ran for most of an hour on a CPU."""
    traced = []
    real_export = torch.onnx.export

    def record(module, args, *rest, **kwargs):
        traced.append((tuple(args[0].shape), args[0].dtype))
        return real_export(module, args, *rest, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", record)
    export_onnx(
        model_dir,
        tmp_path / "e",
        fp16=True,
        image_size=ShapeRange(64, 256, 256),
        graphs=["unet_plain", "vae_decoder"],
    )
    assert traced == [((2, 4, 8, 8), torch.float16), ((2, 4, 8, 8), torch.float32)]


def test_export_refuses_a_device_it_does_not_have_in_one_line(model_dir, tmp_path, capsys):
    from fpedit.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: cuda is a device it has")
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fpedit: error: --device: CUDA was requested but torch sees no GPU"]
    assert not (tmp_path / "e").exists()


def test_export_files_follow_the_umask(model_dir, tmp_path):
    """onnx writes external data files 0600; another account serving the export could not read them."""
    import os
    import stat

    previous = os.umask(0o027)
    try:
        export_onnx(
            model_dir,
            tmp_path / "e",
            image_size=SIZES,
            external_data="always",
            graphs=["unet_plain", "text_encoder"],
        )
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "e").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {UNET_WEIGHTS_FILE, "text_encoder.onnx.data", "unet_plain.onnx"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o640 for p in files}


MEMORY_PROBE = """
import json, sys
from pathlib import Path
import onnxruntime, psutil, torch
from fpedit.engine.backends.onnx_backend import OnnxRuntimeBackend
from fpedit.engine.calls import UNetCall
from fpedit.engine.maps import Injection

process = psutil.Process()
before = process.memory_info().rss
backend = OnnxRuntimeBackend(Path(sys.argv[1]))
spec = backend.spec
g = torch.Generator().manual_seed(0)
sample = torch.randn((2, spec.latent_channels, 8, 8), generator=g)
t = torch.tensor([501.0, 501.0])
context = torch.randn((2, spec.text_max_length, spec.text_hidden_size), generator=g)
layers = backend.capture_layers(list(backend.manifest.layers))
maps = backend.unet(UNetCall(sample, t, context, "qk", capture=layers)).maps
backend.unet(UNetCall(sample, t, context))
injection = Injection.for_rows(maps.rows([1, 1]), [False, True], layers)
backend.unet(UNetCall(sample, t, context, "qk", inject=injection))
print(json.dumps({"grown": process.memory_info().rss - before}))
"""


def test_onnxruntime_holds_the_unet_weights_once(tmp_path_factory):
    """Its three UNet sessions hold one copy of the weights: the process grows by less than 1.6 copies while
    it loads and runs all three (each session used to keep its own copy and re-laid-out, pre-packed ones:
    6x). A wider tiny model (190 MiB of UNet weights) so that copies stand out from the runtime's own."""
    import subprocess

    from fpedit.engine.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("wide")
    model = save_tiny_model(root / "model", width=128)
    export = root / "onnx"
    export_onnx(
        model, export, image_size=ShapeRange(64, 64, 64), graphs=["unet_plain", "unet_capture", "unet_inject"]
    )
    weights = unet_parameter_bytes(model)
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(export)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    grown = json.loads(proc.stdout.strip().splitlines()[-1])["grown"]
    assert 0.9 * weights < grown < 1.6 * weights, (grown / weights, weights)


def test_ort_user_mask_blend_equals_torch_and_word_masks_are_refused(ort_engine, engine):
    """The blend runs outside the UNet, so a user mask works on an export as on torch (same mask, the
    inversion's z_0 outside it bit for bit); word masks need cross-attention outputs the export lacks."""
    from fpedit.engine.blend import Blend

    image = make_image(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    opts = EditOptions(steps=4, blend=Blend(mask=mask, start=0.25))
    r = ort_engine.edit_real(image, "a red car", options=opts)
    t = engine.edit_real(image, "a red car", options=opts)
    np.testing.assert_array_equal(r.blend_mask, t.blend_mask)
    assert r.blend_mask[:, :4].all() and not r.blend_mask[:, 4:].any()
    outside = ~r.blend_mask
    z0 = r.inversion.latent(0).cpu().numpy()
    np.testing.assert_array_equal(r.edited_latents[..., outside], z0[..., outside])
    assert rel_l2(r.edited_latents, t.edited_latents) < 1e-3
    with pytest.raises(InvalidInputError, match="word masks need cross-attention") as err:
        ort_engine.edit_real(r.inversion, "a red car", options=opts.replace(blend=Blend(words=("car",))))
    assert err.value.field == "blend_words"
