"""What can be shown on the CPU about the GPU paths: the process-wide capture gate under concurrent requests,
the TensorRT adapter's contexts, shared activation memory, alignment and checked returns (with a recording
stand-in for ``tensorrt``), the ONNX Runtime provider check, and the GPU smoke script's dry run."""

from __future__ import annotations

import ctypes
import json
import threading
import time
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from conftest import make_image
from helpers import run_concurrently

from fpedit import EditEngine, EditOptions, InvalidInputError, ModelLoadError
from fpedit.engine.backends.capture import CAPTURE_GATE, CaptureGate
from fpedit.engine.backends.torch_backend import TorchBackend
from fpedit.engine.contract import ENGINE_FORMAT, EXPORT_FORMAT, PAPER_LAYERS, ExportManifest, ShapeRange

# --- the capture gate ----------------------------------------------------------------------------------------


def test_gate_keeps_captures_and_shared_sections_apart():
    """A capture waits for shared holders to leave, new shared sections wait for a waiting capture, and a
    thread that holds the gate shared may capture (its own holds are set aside meanwhile)."""
    gate = CaptureGate()
    events: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def reader() -> None:
        with gate.shared():
            events.append("reader in")
            inside.set()
            release.wait(5)
            events.append("reader out")

    def capturer() -> None:
        with gate.shared():  # as the device loop inside Backend.unet
            with gate.exclusive():
                events.append("capture")
            assert gate.held_shared()

    def late() -> None:
        with gate.shared():
            events.append("late")

    r = threading.Thread(target=reader)
    r.start()
    inside.wait(5)
    c = threading.Thread(target=capturer)
    c.start()
    time.sleep(0.1)
    waiting = threading.Thread(target=late)
    waiting.start()
    time.sleep(0.1)
    assert events == ["reader in"]  # the capture waits for the reader, the late reader for the capture
    release.set()
    for t in (r, c, waiting):
        t.join(5)
    assert events == ["reader in", "reader out", "capture", "late"]
    assert gate.captures == 1 and not gate.capturing()


def test_gate_capture_from_a_nested_shared_section_still_waits_for_others():
    """A thread nested two shared sections deep counts once: its capture still waits for another thread's
    shared section to end (subtracting its nesting depth let the capture start beside that section)."""
    gate = CaptureGate()
    events: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def reader() -> None:
        with gate.shared():
            inside.set()
            release.wait(5)
            events.append("reader out")

    def capturer() -> None:
        with gate.shared(), gate.shared(), gate.exclusive():
            events.append("capture")

    r = threading.Thread(target=reader)
    r.start()
    inside.wait(5)
    c = threading.Thread(target=capturer)
    c.start()
    time.sleep(0.1)
    release.set()
    for t in (r, c):
        t.join(5)
    assert events == ["reader out", "capture"]
    with gate.exclusive():  # every count back to zero: nothing left waiting or held
        pass


class Recorder:
    """Intervals of device work and of captures, per thread, from the instrumented backend and programs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.intervals: list[tuple[str, int, float, float]] = []

    def add(self, kind: str, start: float) -> None:
        with self._lock:
            self.intervals.append((kind, threading.get_ident(), start, time.perf_counter()))

    def overlaps(self) -> list[tuple[Any, Any]]:
        """Device work of one thread that ran while another thread captured."""
        captures = [i for i in self.intervals if i[0] == "capture"]
        return [
            (c, w)
            for c in captures
            for w in self.intervals
            if w[0] != "capture" and w[1] != c[1] and w[2] < c[3] and c[2] < w[3]
        ]


class RecordingTorchBackend(TorchBackend):
    """The torch backend whose VAE, text encoder and synchronize record when they run (each a little longer,
    so that an unsafe overlap would show)."""

    recorder: Recorder

    def _timed(self, kind: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        time.sleep(0.002)
        try:
            return fn(*args)
        finally:
            self.recorder.add(kind, start)

    def encode_text(self, input_ids):
        return self._timed("text", super().encode_text, input_ids)

    def encode_image(self, images):
        return self._timed("vae_encode", super().encode_image, images)

    def decode_latents(self, latents):
        return self._timed("vae_decode", super().decode_latents, latents)

    def synchronize(self):
        return self._timed("synchronize", super().synchronize)


def noise(seed: int, h: int, w: int) -> torch.Tensor:
    return torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(seed))


def recorded_program(program: Any, recorder: Recorder) -> Any:
    """``program`` with the time spent inside each of its steps recorded (a step computes on the device)."""
    result = None
    first = True
    while True:
        start = time.perf_counter()
        try:
            step = next(program) if first else program.send(result)
        except StopIteration as stop:
            recorder.add("program", start)
            return stop.value
        time.sleep(0.001)
        recorder.add("program", start)
        first = False
        result = yield step


def test_captures_run_alone_under_eight_concurrent_batched_edits(model_dir, monkeypatch):
    """The device loop captures new graph keys (new batch sizes, merged variants, re-captures after the
    LRU of 3 evicts) while 8 requests run their VAE, text encoder, program steps and synchronize: no capture
    overlaps another thread's device work, and every request succeeds."""
    from fpedit.engine.loading import load_components

    parts = load_components(model_dir)
    backend = RecordingTorchBackend(
        unet=parts.unet,
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        spec=parts.spec,
        cuda_graphs=True,  # on the CPU: the same cache, keys, capture path and gate around eager forwards
        max_graphs=3,
    )
    recorder = backend.recorder = Recorder()
    real_capture = backend.graphs._capture

    def capture(*args: Any) -> Any:
        start = time.perf_counter()
        time.sleep(0.03)  # a real capture takes a while: widen the window an unsafe overlap would need
        try:
            return real_capture(*args)
        finally:
            recorder.add("capture", start)

    monkeypatch.setattr(backend.graphs, "_capture", capture)
    engine = EditEngine(backend, parts.tokenizer, batching=True, max_wait_ms=5)
    real_run = engine.executor.run
    monkeypatch.setattr(
        engine.executor, "run", lambda program, run: real_run(recorded_program(program, recorder), run)
    )
    opts = EditOptions(steps=3)
    image, small = make_image(64, 64, seed=1), make_image(64, 48, seed=2)
    jobs = [
        lambda: engine.edit_generated("a cat", "a dog", latents=noise(1, 8, 8), options=opts),
        lambda: engine.edit_generated("a", "b", latents=noise(2, 8, 16), options=opts),
        lambda: engine.edit_real(image, "a red car", options=opts),
        lambda: engine.edit_real(small, "a bus", options=opts.replace(map_format="probs")),
        lambda: engine.invert(image, options=opts),
        lambda: engine.edit_generated("x", "y", latents=noise(3, 16, 8), options=opts),
        lambda: engine.edit_real(image, "a boat", options=opts.replace(layers=(2, 15))),
        lambda: engine.edit_generated("p", "q", latents=noise(4, 8, 8), options=opts),
    ]
    captures_before = CAPTURE_GATE.captures
    results = run_concurrently(jobs, timeout_s=300)
    engine.close()
    assert [r for r in results if isinstance(r, Exception)] == []
    kinds = {i[0] for i in recorder.intervals}
    assert {"capture", "program", "text", "vae_encode", "vae_decode", "synchronize"} <= kinds
    assert backend.graphs.captures > backend.graphs.max_graphs  # re-captures after evictions, under load
    assert CAPTURE_GATE.captures - captures_before == backend.graphs.captures
    assert recorder.overlaps() == []


def test_attention_map_forwards_hold_the_gate(engine, monkeypatch):
    """``attention_maps`` runs its UNet calls on the executor (eager, for the cross-attention outputs): each
    forward holds the capture gate shared, like every other CUDA path, so none runs beside a capture."""
    held: list[bool] = []
    real_forward = engine.backend.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        held.append(CAPTURE_GATE.held_shared())
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.backend, "forward", forward)
    engine.attention_maps("a red cat", seed=3, steps=2, resolution=4, components=2)
    engine.attention_maps("a disc", image=make_image(64, 64), steps=2, resolution=4, components=2)
    assert len(held) >= 4 and all(held)


def test_null_text_holds_the_gate_per_iteration_not_throughout(engine):
    """Null-text inversion's gradient forwards run inside the gate, but it is let go between iterations, so a
    capture (and every request queued behind it) waits one iteration, not the whole optimisation: cancel
    checks (before every Adam iteration) and progress events (after every step) find it free."""
    inside: list[bool] = []
    between: list[bool] = []
    unet = engine.backend.differentiable_unet()
    hook = unet.register_forward_pre_hook(lambda *_: inside.append(CAPTURE_GATE.held_shared()))

    def progress(event: Any) -> None:
        if event.stage == "null_text":
            between.append(CAPTURE_GATE.held_shared())

    try:
        engine.invert(
            make_image(64, 64),
            options=EditOptions(steps=2),
            source_prompt="a disc",
            method="null-text",
            null_text_steps=2,
            progress=progress,
            cancel_check=lambda: between.append(CAPTURE_GATE.held_shared()),
        )
    finally:
        hook.remove()
    assert inside and all(inside)
    assert len(between) >= 4 and not any(between)


# --- TensorRT, with a recording stand-in ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec(model_dir) -> Any:
    from fpedit.engine.loading import load_components

    return load_components(model_dir).spec


def write_manifest(folder: Path, fmt: str, files: dict[str, str], spec: Any) -> Path:
    """A manifest for ``files`` (stand-in files written beside it) over the test model's spec."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = ExportManifest(
        spec=spec,
        layers=PAPER_LAYERS,
        map_format="qk",
        precision="float32",
        opset=17,
        batch=ShapeRange(1, 2, 8),
        image_size=ShapeRange(64, 128, 128),
        fpedit_version="test",
        source_model="test",
        source_hash="0",
        files=files,
        format=fmt,
    )
    (folder / "manifest.json").write_text(json.dumps(manifest.to_json()))
    for graph, file in files.items():
        if file.endswith(".onnx"):  # an empty graph: the backend reads the graph's initializers itself
            import onnx

            onnx.save_model(
                onnx.helper.make_model(onnx.helper.make_graph([], graph, [], [])), str(folder / file)
            )
        else:
            (folder / file).write_bytes(b"stand-in:" + graph.encode())
    return folder


def host_array(address: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 memory at ``address`` (the CPU stand-in reads and writes what the addresses point at)."""
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).reshape(shape)


class FakeTensorRT:
    """Stands in for the ``tensorrt`` module with the TensorRT 10.1+/11 names the backend uses, and records
    what it is handed. Its ``unet_plain`` computes noise_pred = 2 * sample + timestep from the bound
    addresses, so wrong addresses give wrong numbers; a context refuses unaligned addresses like TensorRT."""

    MEMORY = 4096
    INPUTS = ("sample", "timestep", "encoder_hidden_states")
    #: What each stand-in engine reports as its I/O tensors (direction, ``trt.DataType`` name), as a
    #: TensorRT engine built from a float32 export does.
    IO: ClassVar[dict[str, dict[str, tuple[str, str]]]] = {
        "unet_plain": {
            "sample": ("INPUT", "FLOAT"),
            "timestep": ("INPUT", "FLOAT"),
            "encoder_hidden_states": ("INPUT", "FLOAT"),
            "noise_pred": ("OUTPUT", "FLOAT"),
        },
        "vae_decoder": {"latents": ("INPUT", "FLOAT"), "decoded": ("OUTPUT", "FLOAT")},
    }

    def __init__(self) -> None:
        self.contexts: list[FakeContext] = []
        self.busy: set[int] = set()  # activation blocks in use by a running launch
        self.violations: list[str] = []
        self.fail_execute = False
        self.fail_create = False
        self.lock = threading.Lock()
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, severity: int) -> None:
                self.severity = severity

        class Engine:
            device_memory_size_v2 = FakeTensorRT.MEMORY

            def __init__(self, graph: str) -> None:
                self.io = list(FakeTensorRT.IO[graph].items())

            @property
            def num_io_tensors(self) -> int:
                return len(self.io)

            def get_tensor_name(self, index: int) -> str:
                return self.io[index][0]

            def get_tensor_mode(self, name: str) -> Any:
                return types.SimpleNamespace(name=dict(self.io)[name][0])

            def get_tensor_dtype(self, name: str) -> Any:
                return types.SimpleNamespace(name=dict(self.io)[name][1])

            def create_execution_context(self, strategy: int = 0) -> Any:
                if fake.fail_create:
                    return None
                context = FakeContext(fake, strategy)
                fake.contexts.append(context)
                return context

        class Runtime:
            def __init__(self, logger: Any) -> None:
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes) -> Any:
                prefix = b"stand-in:"
                return Engine(data[len(prefix) :].decode()) if data.startswith(prefix) else None

        self.module = types.SimpleNamespace(
            __version__="11.0.0",
            Logger=Logger,
            Runtime=Runtime,
            ExecutionContextAllocationStrategy=types.SimpleNamespace(
                STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2
            ),
        )


class FakeContext:
    def __init__(self, fake: FakeTensorRT, strategy: int) -> None:
        self.fake = fake
        self.strategy = strategy
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_sets: set[tuple] = set()  # distinct input shapes this context ever ran with
        self.launches = 0

    def set_device_memory(self, address: int, size: int) -> None:
        self.memory = (address, size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if name not in FakeTensorRT.INPUTS or not 1 <= shape[0] <= 8:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in (*FakeTensorRT.INPUTS, "noise_pred") or address % 256:
            return False
        self.addresses[name] = address
        return True

    def infer_shapes(self) -> list[str]:
        return [name for name in FakeTensorRT.INPUTS if name not in self.shapes]

    def execute_async_v3(self, stream: int) -> bool:
        fake = self.fake
        if fake.fail_execute:
            return False
        if self.memory is None or self.memory[1] < FakeTensorRT.MEMORY or self.memory[0] % 256:
            fake.violations.append("launch without a sufficient aligned activation block")
        with fake.lock:
            if self.memory and self.memory[0] in fake.busy:
                fake.violations.append("two launches used one activation block at once")
            if self.memory:
                fake.busy.add(self.memory[0])
        try:
            time.sleep(0.002)
            self.shape_sets.add(tuple(sorted(self.shapes.items())))
            self.launches += 1
            sample = host_array(self.addresses["sample"], self.shapes["sample"])
            timestep = host_array(self.addresses["timestep"], self.shapes["timestep"])
            out = host_array(self.addresses["noise_pred"], self.shapes["sample"])
            out[...] = 2 * sample + timestep.reshape(-1, 1, 1, 1)
        finally:
            with fake.lock:
                if self.memory:
                    fake.busy.discard(self.memory[0])
        return True


@pytest.fixture
def trt_folder(spec, tmp_path) -> Path:
    files = {"unet_plain": "unet_plain.plan", "vae_decoder": "vae_decoder.plan"}
    return write_manifest(tmp_path / "plans", ENGINE_FORMAT, files, spec)


def trt_backend(folder: Path, fake: FakeTensorRT, **options: Any) -> Any:
    from fpedit.engine.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(folder, device="cpu", runtime=fake.module, **options)


def unet_feeds(rows: int, seed: int, side: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn((rows, 4, side, side), generator=g)
    timestep = torch.rand((rows,), generator=g) * 1000
    context = torch.randn((rows, 77, 32), generator=g)
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
    return feeds, 2 * sample + timestep.reshape(-1, 1, 1, 1)


def run_unet(backend: Any, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    out = {"noise_pred": torch.empty_like(feeds["sample"])}
    backend._run("unet_plain", feeds, out)
    return out["noise_pred"]


def test_tensorrt_one_context_per_shape_set_on_one_shared_block(trt_folder):
    """Returning to an earlier shape (batch 1 after 2, merged batches of 3) replays that shape's own
    context; every context is USER_MANAGED on one activation block, and concurrent calls never use the block
    at once; each capture runs inside the process's gate."""
    fake = FakeTensorRT()
    backend = trt_backend(trt_folder, fake)
    captures_before = CAPTURE_GATE.captures
    for rows, seed in ((2, 0), (1, 1), (2, 2), (3, 3), (1, 4), (3, 5)):
        feeds, expected = unet_feeds(rows, seed)
        assert torch.equal(run_unet(backend, feeds), expected)
    assert len(fake.contexts) == 3 and backend.captures == 3
    assert all(len(c.shape_sets) == 1 for c in fake.contexts)  # no context ever re-bound to another shape
    assert {c.strategy for c in fake.contexts} == {2}  # USER_MANAGED
    assert len({c.memory for c in fake.contexts}) == 1  # one block for all of them
    assert CAPTURE_GATE.captures - captures_before == 3

    def client(i: int) -> None:
        feeds, expected = unet_feeds(1 + i % 4, 10 + i)
        assert torch.equal(run_unet(backend, feeds), expected)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(fake.contexts) == 4 and all(len(c.shape_sets) == 1 for c in fake.contexts)
    assert fake.violations == []


def test_tensorrt_graph_cache_is_a_bounded_lru(trt_folder):
    fake = FakeTensorRT()
    backend = trt_backend(trt_folder, fake, max_graphs=2)
    for rows in (1, 2, 3, 1, 3):
        feeds, expected = unet_feeds(rows, rows)
        assert torch.equal(run_unet(backend, feeds), expected)
    assert len(backend) == 2
    assert backend.captures == 4  # batch 1 was evicted by 3 and captured again; 3 stayed
    assert backend.describe()["max_graphs"] == 2


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_tensorrt_binds_only_aligned_addresses(trt_folder, cuda_graphs):
    """A tensor 4 bytes into its storage (like ``t[k:k+1]`` of a flat buffer) is copied to an aligned buffer
    before binding; an unaligned output is written through one."""
    from fpedit.engine.backends.tensorrt_backend import aligned_empty

    fake = FakeTensorRT()
    backend = trt_backend(trt_folder, fake, cuda_graphs=cuda_graphs)
    feeds, expected = unet_feeds(2, 7)
    storage = torch.empty(feeds["sample"].numel() + 1)
    sample = storage[1:].view(feeds["sample"].shape)
    sample.copy_(feeds["sample"])
    assert sample.data_ptr() % 256
    out_storage = torch.zeros(expected.numel() + 1)
    out = out_storage[1:].view(expected.shape)
    backend._run("unet_plain", {**feeds, "sample": sample}, {"noise_pred": out})
    assert torch.equal(out, expected)
    assert all(address % 256 == 0 for c in fake.contexts for address in c.addresses.values())
    assert aligned_empty((3, 5), torch.float16, torch.device("cpu")).data_ptr() % 256 == 0


def test_tensorrt_failures_raise_clear_errors(trt_folder, spec, tmp_path):
    from fpedit.engine.backends.tensorrt_backend import TensorRTError

    fake = FakeTensorRT()
    backend = trt_backend(trt_folder, fake)
    feeds, _ = unet_feeds(9, 0)  # beyond the profile: set_input_shape returns False
    with pytest.raises(InvalidInputError, match=r"sample \(9, 4, 8, 8\) is outside the engine profile"):
        run_unet(backend, feeds)
    fake.fail_create = True
    with pytest.raises(TensorRTError, match="could not create an execution context for unet_plain"):
        run_unet(backend, unet_feeds(1, 0)[0])
    fake.fail_create = False
    fake.fail_execute = True
    with pytest.raises(TensorRTError, match="failed to execute unet_plain"):
        run_unet(backend, unet_feeds(2, 0)[0])
    with pytest.raises(TensorRTError, match="refused the address of unet_plain:extra"):
        eager = trt_backend(trt_folder, FakeTensorRT(), cuda_graphs=False)
        eager._run(
            "unet_plain",
            unet_feeds(1, 0)[0],
            {"noise_pred": torch.empty(1, 4, 8, 8), "extra": torch.empty(4)},
        )
    broken = write_manifest(tmp_path / "broken", ENGINE_FORMAT, {"unet_plain": "u.plan"}, spec)
    (broken / "u.plan").write_bytes(b"other version")
    with pytest.raises(ModelLoadError, match="could not deserialize"):
        trt_backend(broken, FakeTensorRT())


def test_tensorrt_refuses_engines_whose_tensors_differ_from_the_manifest(trt_folder, monkeypatch):
    """An engine whose I/O differs from the manifest (a dtype the builder changed, a renamed input) would bind
    buffers of the wrong type by address and return garbage: loading refuses it, naming the tensors."""
    unet_io = FakeTensorRT.IO["unet_plain"]
    monkeypatch.setitem(FakeTensorRT.IO, "unet_plain", {**unet_io, "timestep": ("INPUT", "INT32")})
    with pytest.raises(
        ModelLoadError, match=r"unet_plain: .*timestep: engine \('INPUT', 'INT32'\), manifest"
    ):
        trt_backend(trt_folder, FakeTensorRT())
    renamed = {("context" if k == "encoder_hidden_states" else k): v for k, v in unet_io.items()}
    monkeypatch.setitem(FakeTensorRT.IO, "unet_plain", renamed)
    with pytest.raises(
        ModelLoadError, match=r"context: engine .* manifest None; encoder_hidden_states: engine"
    ):
        trt_backend(trt_folder, FakeTensorRT())


# --- ONNX Runtime providers ----------------------------------------------------------------------------------


class FakeSession:
    providers: ClassVar[list[str]] = ["CPUExecutionProvider"]

    def __init__(self, path: str, options: Any, providers: Any) -> None:
        self.requested = providers

    def get_providers(self) -> list[str]:
        return list(self.providers)


def test_onnxruntime_refuses_a_silent_cpu_fallback(spec, tmp_path, monkeypatch):
    """A CUDA session that came up on the CPU (ONNX Runtime only logs it) is refused, naming why; a session
    that really runs on CUDA is accepted; preload_dlls() runs first."""
    import onnxruntime as ort

    from fpedit.engine.backends.onnx_backend import OnnxRuntimeBackend

    folder = write_manifest(tmp_path / "onnx", EXPORT_FORMAT, {"unet_plain": "unet_plain.onnx"}, spec)
    preloaded: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "preload_dlls", lambda: preloaded.append(True), raising=False)
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    with pytest.raises(
        ModelLoadError,
        match=r"runs unet_plain on \['CPUExecutionProvider'\], not the requested \['CUDAExecutionProvider'\]: "
        r"this onnxruntime .* has no CUDAExecutionProvider library",
    ):
        OnnxRuntimeBackend(folder, device="cuda")
    assert preloaded == [True]
    monkeypatch.setattr(FakeSession, "providers", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert OnnxRuntimeBackend(folder, device="cuda").providers[0] == "CUDAExecutionProvider"


def test_provider_error_names_the_library_that_fails_to_load(tmp_path):
    from fpedit.engine.backends.onnx_backend import provider_load_error

    capi = tmp_path / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (capi / "libonnxruntime_providers_cuda.so").write_bytes(b"not a shared library")
    fake_ort = types.SimpleNamespace(
        __file__=str(tmp_path / "onnxruntime" / "__init__.py"), __version__="1.2"
    )
    message = provider_load_error(fake_ort, "CUDAExecutionProvider")
    assert message.startswith("libonnxruntime_providers_cuda.so failed to load: ")
    assert "libonnxruntime_providers_cuda.so" in message.split(": ", 1)[1]


# --- the GPU smoke script ------------------------------------------------------------------------------------


def test_gpu_smoke_dry_run_passes_on_the_cpu(model_dir, tmp_path, capsys):
    from fpedit.benchmarks.gpu_smoke import main

    out = tmp_path / "smoke.json"
    assert main(["--dry-run", "--json", str(out), "--model", str(model_dir)]) == 0
    report = json.loads(out.read_text())
    lines = capsys.readouterr().out
    checks = report["checks"]
    assert {c["name"] for c in checks} >= {
        "torch_graphs_vs_eager",
        "torch_batching_concurrent",
        "onnx_fp16_export",
        "onnxruntime_cuda_vs_cpu",
        "tensorrt",
        "peak_memory",
    }
    assert all(c["status"] in ("PASS", "SKIP") for c in checks), checks
    assert all(c["reason"] for c in checks if c["status"] == "SKIP")
    passed = {c["name"] for c in checks if c["status"] == "PASS"}
    assert {"torch_graphs_vs_eager", "torch_batching_concurrent", "onnx_fp16_export"} <= passed
    for check in checks:
        assert f"{check['status']} {check['name']}" in lines


def test_gpu_smoke_waits_for_hung_threads_once_not_per_thread():
    """A hang in the concurrent checks costs one deadline (the lease is short), not one per thread."""
    from fpedit.benchmarks.gpu_smoke import join_all

    release = threading.Event()
    threads = [threading.Thread(target=release.wait, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    started = time.monotonic()
    assert join_all(threads, 0.3) == 4
    assert time.monotonic() - started < 0.9  # 4 x 0.3 s if each thread got its own timeout
    release.set()
    assert join_all(threads, 5.0) == 0
