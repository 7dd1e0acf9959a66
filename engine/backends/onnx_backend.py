"""ONNX Runtime backend: the exported graphs in InferenceSessions, fed through I/O binding.

I/O binding hands ONNX Runtime the torch tensors' memory directly (inputs and preallocated outputs), so no
copies are made on the CPU and, with the CUDA or TensorRT execution providers, nothing leaves the GPU.
"""

from __future__ import annotations

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


def default_providers(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


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
        missing = [p for p in chosen if p not in ort.get_available_providers()]
        if missing:
            raise InvalidInputError(
                "providers",
                f"{missing} not available in this onnxruntime; available: {ort.get_available_providers()}",
            )
        if self.device.type == "cpu" and chosen[0] != "CPUExecutionProvider":
            raise InvalidInputError("device", f"provider {chosen[0]} needs device='cuda'")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Six sessions each own a thread pool; spinning pools steal the cores the next graph needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provider_args: list[Any] = [
            (p, {"device_id": self.device.index or 0}) if p != "CPUExecutionProvider" else p for p in chosen
        ]
        self.providers = chosen
        self._sessions = {}
        for graph, file in manifest.files.items():
            path = folder / file
            if not path.is_file():
                raise ModelLoadError(f"missing {path} (listed in the manifest)")
            try:
                self._sessions[graph] = ort.InferenceSession(str(path), options, providers=provider_args)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc

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
