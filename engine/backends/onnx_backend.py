"""ONNX Runtime backend: the exported graphs in InferenceSessions, fed through I/O binding.

I/O binding hands ONNX Runtime the torch tensors' memory directly (inputs and preallocated outputs), so no
copies are made on the CPU and, with the CUDA or TensorRT execution providers, nothing leaves the GPU.

ONNX Runtime falls back to the CPU with only a log line when a GPU provider's libraries fail to load, and
``get_available_providers()`` lists the providers compiled in, not the loadable ones; binding GPU pointers to
such a session would then be wrong. So on CUDA the backend first calls ``onnxruntime.preload_dlls()`` (1.21+:
loads the CUDA and cuDNN libraries of the nvidia wheels or torch), then checks every session's
``get_providers()`` against the request and, when a provider is missing, says which library failed to load.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contract import EXPORT_FORMAT
from ..errors import InvalidInputError, ModelLoadError
from .graph_backend import GraphBackend, load_export_tokenizer, read_manifest

log = logging.getLogger(__name__)

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


#: The shared library each GPU provider lives in (``onnxruntime/capi/libonnxruntime_providers_<name>.so``).
PROVIDER_LIBRARIES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}


def preload_gpu_libraries(ort: Any) -> None:
    """``onnxruntime.preload_dlls()`` where this onnxruntime has it (1.21+); its own failures are left to the
    provider check, which names the library."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # onnxruntime raises various types; the session check reports what matters
        log.warning("onnxruntime.preload_dlls() failed: %s", exc)


def provider_load_error(ort: Any, provider: str) -> str:
    """Why ``provider`` is not active: its library is absent (a CPU build) or fails to load (and why)."""
    short = PROVIDER_LIBRARIES.get(provider)
    if short is None:
        return f"{provider} could not be created (see onnxruntime's log)"
    capi = Path(ort.__file__).parent / "capi"
    libraries = sorted(capi.glob(f"*onnxruntime_providers_{short}.*"))
    if not libraries:
        return (
            f"this onnxruntime ({getattr(ort, '__version__', '?')}) has no {provider} library in {capi}: a CPU "
            "build, or the CPU `onnxruntime` wheel shadowing `onnxruntime-gpu` (pip uninstall onnxruntime "
            "onnxruntime-gpu && pip install onnxruntime-gpu)"
        )
    try:
        ctypes.CDLL(str(libraries[0]))
    except OSError as exc:
        return f"{libraries[0].name} failed to load: {exc}"
    return f"{libraries[0].name} loads, but {provider} could not be created (see onnxruntime's log)"


def default_providers(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(ort: Any) -> Any:
    """Options for one of the export's sessions, chosen so that the weights are held once in all of them.

    Measured on the full-size SD 1.5 UNet (three sessions, ONNX Runtime 1.32, CPU; docs/design.md): the
    layout optimisations of ``ORT_ENABLE_ALL`` (NCHWc) rewrite every convolution's weights into a new tensor,
    and pre-packing copies every MatMul's, per session: 2.3 GB and 1 GB a session on top of the shared
    initializers. ``ORT_ENABLE_EXTENDED`` without pre-packing keeps the fusions and uses the shared tensors
    as they are, at about the same speed; without the CPU arena, activations are returned after each run
    instead of being kept at their high-water mark by every session.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    # Six sessions each own a thread pool; spinning pools steal the cores the next graph needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class SharedInitializers:
    """One memory map per external-data file, and one OrtValue per stored tensor, for every session.

    An export's three UNet graphs point into one weights file (``UNET_WEIGHTS_FILE``); left to itself, each
    InferenceSession would read its own copy of every tensor. Handed to every session as the same
    user-owned initializers (``SessionOptions.add_initializer``), they are held once: on the CPU as pages
    of the mapped file, on a GPU as one device copy (docs/design.md, "One copy of the UNet's weights").
    """

    def __init__(self, folder: Path, device: torch.device):
        self.folder = folder
        self.device = device
        self._maps: dict[str, np.memmap] = {}
        self._values: dict[tuple[str, int, int, int, tuple[int, ...]], Any] = {}

    def initializers(self, graph_path: Path) -> dict[str, Any]:
        """OrtValues for ``graph_path``'s externally stored initializers, shared with every other graph."""
        import onnx
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype

        proto = onnx.load(str(graph_path), load_external_data=False)
        found = {}
        for tensor in proto.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            location, offset = info["location"], int(info.get("offset", 0))
            dims = tuple(int(d) for d in tensor.dims)
            key = (location, offset, int(info.get("length", 0)), tensor.data_type, dims)
            if key not in self._values:
                dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
                if location not in self._maps:
                    self._maps[location] = np.memmap(self.folder / location, mode="r")
                count = int(np.prod(dims, dtype=np.int64))
                array = np.frombuffer(self._maps[location], dtype, count, offset).reshape(dims)
                if self.device.type == "cuda":
                    self._values[key] = ort.OrtValue.ortvalue_from_numpy(
                        array, "cuda", self.device.index or 0
                    )
                else:
                    self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            found[tensor.name] = self._values[key]
        return found


class OnnxRuntimeBackend(GraphBackend):
    name = "onnxruntime"
    size_range_binds = False

    def __init__(
        self, folder: Path, device: str | torch.device = "cpu", providers: Sequence[str] | None = None
    ):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # constant-folding notices are not the user's business
        manifest = read_manifest(folder, EXPORT_FORMAT)
        super().__init__(manifest, torch.device(device))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError("device", "CUDA was requested but torch sees no GPU")
        chosen = list(providers or default_providers(self.device))
        if any(p in PROVIDER_LIBRARIES for p in chosen):
            preload_gpu_libraries(ort)
        missing = [p for p in chosen if p not in ort.get_available_providers()]
        if missing:
            raise InvalidInputError(
                "providers",
                f"{missing} not available in this onnxruntime; available: {ort.get_available_providers()}",
            )
        if self.device.type == "cpu" and chosen[0] != "CPUExecutionProvider":
            raise InvalidInputError("device", f"provider {chosen[0]} needs device='cuda'")
        provider_args: list[Any] = [
            (p, {"device_id": self.device.index or 0}) if p != "CPUExecutionProvider" else p for p in chosen
        ]
        self.providers = chosen
        self._sessions = {}
        paths = {graph: folder / file for graph, file in manifest.files.items()}
        for path in paths.values():
            if not path.is_file():
                raise ModelLoadError(f"missing {path} (listed in the manifest)")
        self._weights = SharedInitializers(folder, self.device)
        for graph, path in paths.items():
            options = session_options(ort)
            try:
                for name, value in self._weights.initializers(path).items():
                    options.add_initializer(name, value)
                session = ort.InferenceSession(str(path), options, providers=provider_args)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
            active = list(session.get_providers())
            lost = [p for p in chosen if p not in active]
            if lost:  # onnxruntime fell back (to the CPU) with only a log line: refuse instead
                reasons = "; ".join(provider_load_error(ort, p) for p in lost)
                raise ModelLoadError(
                    f"onnxruntime runs {graph} on {active}, not the requested {lost}: {reasons}"
                )
            self._sessions[graph] = session

    @classmethod
    def load(
        cls, folder: str | Path, *, device: str = "cpu", providers: Sequence[str] | None = None
    ) -> tuple[OnnxRuntimeBackend, Any, str]:
        folder = Path(folder).expanduser()
        backend = cls(folder, device=device, providers=providers)
        return backend, load_export_tokenizer(folder), str(folder.resolve())

    def _run(self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        session = self._sessions[graph]
        binding = session.io_binding()
        device_type = "cuda" if self.device.type == "cuda" else "cpu"
        device_id = self.device.index or 0
        for name, tensor in (*inputs.items(), *outputs.items()):
            bind = binding.bind_input if name in inputs else binding.bind_output
            bind(
                name,
                device_type,
                device_id,
                NUMPY_DTYPES[tensor.dtype],
                list(tensor.shape),
                tensor.data_ptr(),
            )
        if device_type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch's stream
        session.run_with_iobinding(binding)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers}
