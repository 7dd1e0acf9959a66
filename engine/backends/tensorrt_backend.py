"""TensorRT backend: prebuilt engines executed on torch CUDA tensors with the TensorRT 10 tensor-name API.

All contract logic (variants, maps, gate, shapes) is :class:`GraphBackend`'s and is verified on the CPU
through ONNX Runtime; this adapter only deserializes engines and binds tensor addresses. It needs an NVIDIA
GPU with TensorRT 10 and was not executed on the machines this project is developed on (see the README).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from ..contract import ENGINE_FORMAT
from ..errors import InvalidInputError, ModelLoadError
from .graph_backend import GraphBackend, load_export_tokenizer, read_manifest


class TensorRTBackend(GraphBackend):
    name = "tensorrt"

    def __init__(self, folder: Path, device: str | torch.device = "cuda") -> None:
        manifest = read_manifest(folder, ENGINE_FORMAT)
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise InvalidInputError(
                "device", "the tensorrt backend needs device='cuda' and a visible NVIDIA GPU"
            )
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise ModelLoadError(
                "the tensorrt backend needs TensorRT 10 (pip install 'fpedit[tensorrt]')"
            ) from exc
        super().__init__(manifest, device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        with torch.cuda.device(device):
            for graph, file in manifest.files.items():
                path = folder / file
                if not path.is_file():
                    raise ModelLoadError(f"missing {path} (listed in the manifest)")
                engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise ModelLoadError(f"TensorRT could not deserialize {path} (built by another version?)")
                self._engines[graph] = engine
                self._contexts[graph] = engine.create_execution_context()
                self._locks[graph] = threading.Lock()

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "cuda") -> tuple[TensorRTBackend, Any, str]:
        folder = Path(folder).expanduser()
        backend = cls(folder, device=device if device != "cpu" else "cuda")
        return backend, load_export_tokenizer(folder), str(folder.resolve())

    def _run(self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        context = self._contexts[graph]
        stream = torch.cuda.current_stream(self.device)
        with self._locks[graph]:  # an execution context holds shapes and addresses: one call at a time
            for name, tensor in inputs.items():
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise InvalidInputError(
                        "shape", f"{graph}: {name} {tuple(tensor.shape)} is outside the engine profile"
                    )
                context.set_tensor_address(name, tensor.data_ptr())
            for name, tensor in outputs.items():
                context.set_tensor_address(name, tensor.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to execute {graph}")
