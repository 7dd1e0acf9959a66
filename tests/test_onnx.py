"""ONNX export of the contract's graphs and the ONNX Runtime backend, against torch and the reference."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from conftest import make_image
from reference import rel_l2

from fpedit import EditEngine, EditOptions, InvalidInputError, ModelLoadError
from fpedit.engine.contract import GRAPHS, PAPER_LAYERS, ShapeRange, unet_io
from fpedit.export.onnx_export import export_onnx
from fpedit.export.verify import verify_export

SIZES = ShapeRange(64, 128, 128)


@pytest.fixture(scope="module")
def qk_export(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "qk"
    export_onnx(model_dir, out, image_size=SIZES)
    return out


@pytest.fixture(scope="module")
def probs_export(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "probs"
    export_onnx(model_dir, out, map_format="probs", image_size=SIZES)
    return out


@pytest.fixture(scope="module")
def ort_engine(qk_export):
    return EditEngine.from_pretrained(qk_export, backend="onnxruntime")


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
        assert rel_l2(r.source_latents, ref_src) < 1e-3
        assert rel_l2(r.edited_latents, ref_tgt) < 1e-3


def test_ort_real_edit_and_reedit_match_reference(ort_engine, reference):
    from test_real import pixels

    image = make_image()
    opts = EditOptions(steps=6)
    inv = ort_engine.invert(image, options=opts)
    z0 = reference.encode(pixels(image))
    for prompt, layers in (("a red car", PAPER_LAYERS), ("a blue boat", (6, 7, 12))):
        o = opts.replace(layers=layers)
        r = ort_engine.edit_real(inv, prompt, options=o)
        _, ref_src, ref_tgt = reference.edit_real(
            z0, prompt, o.steps, o.guidance_scale, o.replace_window, layers
        )
        assert rel_l2(r.edited_latents, ref_tgt) < 3e-3
        assert rel_l2(r.source_latents, ref_src) < 3e-3
    # The capture graph holds all 11 exported layers, so the subset edit above reused the first one's maps.
    assert r.stats["unet_rows"] == 2 * opts.steps and r.stats["source_maps_cached"] == 4


def test_probs_export_runs_edits(probs_export, engine, image):
    eng = EditEngine.from_pretrained(probs_export, backend="onnxruntime")
    opts = EditOptions(steps=5, map_format="probs")
    a = eng.edit_real(image, "a red car", options=opts)
    b = engine.edit_real(image, "a red car", options=opts)
    assert rel_l2(a.edited_latents, b.edited_latents) < 3e-3
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
    for graph in kwargs["graphs"]:
        digest = [hashlib.sha256((tmp_path / d / f"{graph}.onnx").read_bytes()).hexdigest() for d in "ab"]
        assert digest[0] == digest[1], graph
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    assert a.source_hash.startswith("sha256:")

    ext = export_onnx(
        model_dir, tmp_path / "ext", external_data="always", image_size=SIZES, graphs=["unet_plain"]
    )
    data = tmp_path / "ext" / "unet_plain.onnx.data"
    assert data.stat().st_size > (tmp_path / "ext" / "unet_plain.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "ext" / "unet_plain.onnx"), full_check=True)
    assert ext.files == {"unet_plain": "unet_plain.onnx"}


def test_fp16_export(model_dir, tmp_path):
    import onnxruntime as ort

    manifest = export_onnx(model_dir, tmp_path / "fp16", fp16=True, image_size=SIZES, graphs=["unet_plain"])
    assert manifest.precision == "float16"
    model = onnx.load(str(tmp_path / "fp16" / "unet_plain.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    session = ort.InferenceSession(
        str(tmp_path / "fp16" / "unet_plain.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    out = session.run(
        None,
        {
            "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float16),
            "timestep": np.array([10.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float16),
        },
    )[0]
    assert out.dtype == np.float16 and np.isfinite(out).all()


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


def test_tensorrt_backend_on_gpu(qk_export, tmp_path, reference):
    """Builds engines and compares with ONNX Runtime; runs only where TensorRT and a GPU exist."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (no NVIDIA GPU stack here)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from fpedit.export.tensorrt_build import build_engines

    build_engines(qk_export, tmp_path / "plans", fp16=False)
    trt_engine = EditEngine.from_pretrained(tmp_path / "plans", backend="tensorrt", device="cuda")
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(2))
    r = trt_engine.edit_generated("a cat", "a dog", latents=z, options=EditOptions(steps=4))
    _, ref_tgt = reference.edit_generated("a cat", "a dog", z, 4, 7.5, (0.0, 0.8), PAPER_LAYERS)
    assert rel_l2(r.edited_latents, ref_tgt) < 1e-2


def test_onnxruntime_cuda_provider(qk_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("onnxruntime-gpu with a CUDA GPU is not available here")
    eng = EditEngine.from_pretrained(qk_export, backend="onnxruntime", device="cuda")
    cpu = EditEngine.from_pretrained(qk_export, backend="onnxruntime")
    a = eng.edit_generated("a", "b", seed=0, options=EditOptions(steps=3))
    b = cpu.edit_generated("a", "b", seed=0, options=EditOptions(steps=3))
    assert rel_l2(a.edited_latents, b.edited_latents) < 1e-3
