"""Shared fixtures: small SD 1.x-shaped checkpoints written to disk in diffusers layout, and test images."""

from __future__ import annotations

import copy
import inspect
import os
import re
from pathlib import Path

# Threads per test process, set before torch (or onnxruntime's OpenMP) is imported and exported so that every
# process a test starts (`fpedit serve` subprocesses, Ray's raylet and workers) inherits the same cap: uncapped
# processes each take every core, and two suites (or a suite and a server) on one machine then thrash. One
# thread by default; FPEDIT_TEST_THREADS (or an OMP_NUM_THREADS already set) chooses otherwise.
TEST_THREADS = int(os.environ.get("FPEDIT_TEST_THREADS") or os.environ.get("OMP_NUM_THREADS") or 1)
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_name] = str(TEST_THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_image  # noqa: E402  (re-exported: test modules import it from conftest)
from PIL import Image  # noqa: E402

from fpedit import EditEngine  # noqa: E402
from fpedit.engine.tiny import save_tiny_model  # noqa: E402

torch.set_num_threads(TEST_THREADS)


#: Scales of the self-attention Q/K projections and the cross-attention V projection of the test checkpoint.
#: Seeded random weights give near-uniform self-attention, so piping one branch's maps into the other would
#: move an edit by less than the tests' tolerances (7.7e-4 against 1e-3 once) and a test comparing with the
#: reference could not tell injection from none. Sharper maps (Q/K) that depend more on the prompt (V of the
#: cross-attention) make injection move every tested edit by >= 10x its tolerance; the tests assert that.
SELF_QK_SCALE, CROSS_V_SCALE = 3.0, 3.0


def sharpen_attention(folder: Path, qk_scale: float = SELF_QK_SCALE, v_scale: float = CROSS_V_SCALE) -> Path:
    """Rescale the saved UNet's attention projections in place (still a plain diffusers checkpoint)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(qk_scale)
                module.to_k.weight.mul_(qk_scale)
            elif name.endswith("attn2"):
                module.to_v.weight.mul_(v_scale)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The tiny SD 1.x topology at small widths, seeded, with attention sharp enough that map injection
    matters (see SELF_QK_SCALE), saved as safetensors in diffusers layout."""
    return sharpen_attention(save_tiny_model(tmp_path_factory.mktemp("models") / "sd1-tiny", seed=7))


@pytest.fixture(scope="session")
def qk_export(model_dir, tmp_path_factory) -> Path:
    """A float32 ONNX export of ``model_dir`` (qk maps, layers 4-14, sides 64..128 px), shared by the tests."""
    from fpedit.engine.contract import ShapeRange
    from fpedit.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "qk"
    export_onnx(model_dir, out, image_size=ShapeRange(64, 128, 128))
    return out


@pytest.fixture(scope="session")
def engine(model_dir) -> EditEngine:
    return EditEngine.from_pretrained(model_dir, backend="torch", device="cpu")


@pytest.fixture(scope="session")
def ort_engine(qk_export) -> EditEngine:
    """ONNX Runtime on ``qk_export``, one per session: tests that only run edits on it share it."""
    return EditEngine.from_pretrained(qk_export, backend="onnxruntime")


@pytest.fixture(scope="session")
def raw_modules(model_dir):
    """The same checkpoint loaded with diffusers/transformers directly, for the reference implementation."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "unet": UNet2DConditionModel.from_pretrained(model_dir / "unet").eval(),
        "vae": AutoencoderKL.from_pretrained(model_dir / "vae").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
    }


@pytest.fixture(scope="session")
def reference(raw_modules):
    from reference import ReferenceFPE

    mods = {k: copy.deepcopy(v) for k, v in raw_modules.items()}
    return ReferenceFPE(mods["unet"], mods["vae"], mods["text_encoder"], mods["tokenizer"])


@pytest.fixture
def image() -> Image.Image:
    return make_image()


@pytest.fixture
def no_engine(monkeypatch):
    """Fails the test if a command loads a model: these mistakes must be caught before any work."""
    import fpedit.engine.flags

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(fpedit.engine.flags, "engine_from_config", refuse)


#: tests/<folder>/: each folder is a subsystem and a marker of the same name (pyproject.toml).
SUBSYSTEMS = ("engine", "export", "server", "scaleout", "cli", "eval", "project")
#: A test whose own code starts a process (a server, the CLI, a script): slower, and deselectable.
STARTS_A_PROCESS = re.compile(r"\bsubprocess\.(run|Popen|check_output|call)\b|\bPopen\(")


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test with its subsystem (its folder) and, when its body starts a process, ``subprocess``."""
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in SUBSYSTEMS:
            item.add_marker(folder)
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            source = ""
        if STARTS_A_PROCESS.search(source):
            item.add_marker("subprocess")


# --- clients of a module's `running` server (tests/server: each module starts its own) --------------------------
@pytest.fixture(scope="module")
def http(running):
    """An HTTP client of the module's ``running`` server's HTTP front."""
    import httpx

    with httpx.Client(base_url=running.http.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def stub(running):
    """A gRPC stub of the module's ``running`` server."""
    import grpc

    from fpedit.v1 import edit_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield edit_pb2_grpc.EditServiceStub(channel)
    channel.close()
