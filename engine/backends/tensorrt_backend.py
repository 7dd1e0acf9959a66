"""TensorRT backend: prebuilt engines executed on torch CUDA tensors with the tensor-name API (TensorRT 10/11).

All contract logic (variants, maps, gate, shapes) is :class:`GraphBackend`'s and is verified on the CPU
through ONNX Runtime; this adapter only deserializes engines, binds tensor addresses and replays CUDA graphs.
It uses only calls present in both TensorRT 10.x and 11.x (``Runtime.deserialize_cuda_engine``,
``ICudaEngine.create_execution_context``, ``IExecutionContext.set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``). It needs an NVIDIA GPU and was not executed on the machines this project is
developed on (see the README).

CUDA graphs: TensorRT allows capturing ``execute_async_v3`` into a CUDA graph once the context's input shapes
and addresses are set and one ordinary launch has flushed the shape-dependent set-up; the graph is valid for
exactly those shapes and addresses. So each distinct (graph, input shapes) call gets static input and output
buffers, one eager warm-up launch, then a capture; later calls with the same shapes copy their inputs into the
static buffers and replay. The number of distinct shapes is bounded by the profile (batch sizes × image sizes
a server actually sees), and all graphs share one memory pool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..contract import ENGINE_FORMAT
from ..errors import InvalidInputError, ModelLoadError
from .graph_backend import GraphBackend, load_export_tokenizer, read_manifest


@dataclass
class _Replay:
    """One captured launch: the buffers its addresses point at, and the graph itself."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph


class TensorRTBackend(GraphBackend):
    name = "tensorrt"

    def __init__(
        self, folder: Path, device: str | torch.device = "cuda", *, cuda_graphs: bool = True
    ) -> None:
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
                "the tensorrt backend needs TensorRT 10 or 11 (pip install 'fpedit[tensorrt]')"
            ) from exc
        super().__init__(manifest, device)
        self.cuda_graphs = cuda_graphs
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._replays: dict[tuple, _Replay] = {}
        self._pool: Any = None
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
    def load(
        cls, folder: str | Path, *, device: str = "cuda", cuda_graphs: bool = True
    ) -> tuple[TensorRTBackend, Any, str]:
        folder = Path(folder).expanduser()
        backend = cls(folder, device=device if device != "cpu" else "cuda", cuda_graphs=cuda_graphs)
        return backend, load_export_tokenizer(folder), str(folder.resolve())

    def _bind(self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        context = self._contexts[graph]
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise InvalidInputError(
                    "shape", f"{graph}: {name} {tuple(tensor.shape)} is outside the engine profile"
                )
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())

    def _launch(self, graph: str, stream: torch.cuda.Stream) -> None:
        if not self._contexts[graph].execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to execute {graph}")

    def _run(self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        stream = torch.cuda.current_stream(self.device)
        with self._locks[graph]:  # an execution context holds shapes and addresses: one call at a time
            if not self.cuda_graphs:
                self._bind(graph, inputs, outputs)
                self._launch(graph, stream)
                return
            key = (graph, *((name, tuple(t.shape)) for name, t in sorted(inputs.items())))
            replay = self._replays.get(key)
            if replay is None:
                replay = self._capture(graph, inputs, outputs)
                self._replays[key] = replay
            else:
                for name, tensor in inputs.items():
                    replay.inputs[name].copy_(tensor, non_blocking=True)
                replay.graph.replay()
            for name, tensor in outputs.items():
                tensor.copy_(replay.outputs[name], non_blocking=True)

    def _capture(
        self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> _Replay:
        """Static buffers, one eager launch (computes this call and flushes shape set-up), then capture."""
        static_in = {name: tensor.clone() for name, tensor in inputs.items()}
        static_out = {name: torch.empty_like(tensor) for name, tensor in outputs.items()}
        self._bind(graph, static_in, static_out)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._launch(graph, side)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, pool=self._pool):
            self._launch(graph, torch.cuda.current_stream(self.device))
        # The warm-up launch already computed this call's outputs into static_out; the capture only recorded.
        return _Replay(static_in, static_out, cuda_graph)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(cuda_graphs=self.cuda_graphs, captured_shapes=len(self._replays))
        return info
