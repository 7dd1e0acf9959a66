"""TensorRT backend: prebuilt engines executed on torch CUDA tensors with the tensor-name API (TensorRT 10/11).

All contract logic (variants, maps, gate, shapes) is :class:`GraphBackend`'s and is verified on the CPU
through ONNX Runtime; this adapter only deserializes engines, binds tensor addresses and replays CUDA graphs.
It uses calls present in both TensorRT 10.x (10.1 and later) and 11.x: ``Runtime.deserialize_cuda_engine``,
``ICudaEngine.create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)``,
``ICudaEngine.device_memory_size_v2`` / ``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` /
``get_tensor_dtype`` (the engine's I/O checked against the manifest at load),
``IExecutionContext.set_device_memory(ptr, size)`` /
``set_input_shape`` / ``set_tensor_address`` / ``infer_shapes`` / ``execute_async_v3``. Every one that reports
failure by returning ``False`` or ``None`` is checked and raises a message naming the graph and tensor.

Design, for correctness by construction:

* **One execution context per captured input-shape set.** A CUDA graph captured from ``execute_async_v3``
  depends on its context's state; binding another shape on the same context leaves earlier graphs undefined.
  So each (graph, input shapes) key owns a context, its static buffers and its graph, in an LRU of at most
  ``max_graphs`` entries (evicting one frees all three). Eager launches (``cuda_graphs=False``) use one context
  per graph and re-bind freely, which TensorRT allows outside graphs.
* **One user-managed activation block.** Contexts are created with the ``USER_MANAGED`` strategy and all get
  the same device block, sized for the largest engine (``device_memory_size_v2``), instead of one block of the
  largest profile per context. Sharing is safe because every launch and replay runs under one lock on one
  dedicated (non-default) stream, so no two contexts use the block at once.
* **A dedicated stream.** TensorRT on the default stream adds device-wide synchronizations, which would also
  break another thread's capture. Launches run on the backend's stream, ordered against the caller's stream
  on both sides.
* **Captures under the process's capture gate** (:mod:`.capture`), in ``thread_local`` mode, so no other
  thread's CUDA work can invalidate them.
* **256-byte aligned addresses.** ``set_tensor_address`` needs 256-byte alignment; a slice such as
  ``t[k:k+1]`` keeps an offset. Every bound address is checked; an unaligned input is copied into an aligned
  buffer and an unaligned output is written through one.

The device-specific parts (stream, graph capture) are thin; with a stand-in ``runtime`` module (tests) the
same bookkeeping runs on the CPU, a "graph" replaying by launching its own context again.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..contract import ENGINE_FORMAT
from ..errors import InvalidInputError, ModelLoadError
from .capture import CAPTURE_GATE
from .graph_backend import GraphBackend, load_export_tokenizer, read_manifest

#: ``IExecutionContext.setTensorAddress``: "The pointer must have at least 256-byte alignment."
ADDRESS_ALIGNMENT = 256
#: Captured shape sets kept (each holds a context, static buffers and a graph); older ones are evicted.
DEFAULT_MAX_GRAPHS = 24
#: ``trt.DataType`` member names of the manifest's dtypes.
TRT_DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}


class TensorRTError(RuntimeError):
    """A TensorRT call reported failure."""


def _member(value: Any) -> str:
    """A TensorRT enum member's name (``DataType.HALF`` -> ``HALF``)."""
    return str(getattr(value, "name", str(value).rsplit(".", 1)[-1]))


def is_aligned(tensor: torch.Tensor, alignment: int = ADDRESS_ALIGNMENT) -> bool:
    return tensor.data_ptr() % alignment == 0


def aligned_empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, alignment: int = ADDRESS_ALIGNMENT
) -> torch.Tensor:
    """An empty contiguous tensor whose address is a multiple of ``alignment`` (CUDA's allocator already
    gives 512 bytes; the CPU allocator only 64, hence the offset)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for size in shape:
        count *= size
    raw = torch.empty(count * itemsize + alignment, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % alignment
    return raw[offset : offset + count * itemsize].view(dtype).view(shape)


def aligned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when contiguous and aligned, else an aligned contiguous copy."""
    if tensor.is_contiguous() and is_aligned(tensor):
        return tensor
    return aligned_empty(tuple(tensor.shape), tensor.dtype, tensor.device).copy_(tensor)


@dataclass
class _Replay:
    """One captured shape set: its own context, the buffers its addresses point at, and the graph."""

    name: str
    context: Any
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None  # None: the CPU stand-in, which launches the context again


class TensorRTBackend(GraphBackend):
    name = "tensorrt"

    def __init__(
        self,
        folder: Path,
        device: str | torch.device = "cuda",
        *,
        cuda_graphs: bool = True,
        max_graphs: int | None = None,
        runtime: ModuleType | None = None,
    ) -> None:
        """``runtime`` stands in for the ``tensorrt`` module (tests run this adapter on the CPU with one)."""
        manifest = read_manifest(folder, ENGINE_FORMAT)
        device = torch.device(device)
        if runtime is None:
            if device.type != "cuda" or not torch.cuda.is_available():
                raise InvalidInputError(
                    "device", "the tensorrt backend needs device='cuda' and a visible NVIDIA GPU"
                )
            try:
                import tensorrt as runtime
            except ImportError as exc:
                raise ModelLoadError(
                    "the tensorrt backend needs TensorRT 10 or 11 (pip install 'fpedit[tensorrt]')"
                ) from exc
        super().__init__(manifest, device)
        self._trt = runtime
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max(1, int(max_graphs or DEFAULT_MAX_GRAPHS))
        self._logger = runtime.Logger(runtime.Logger.WARNING)
        self._runtime = runtime.Runtime(self._logger)
        if self._runtime is None:
            raise ModelLoadError("TensorRT could not create a runtime (see its log above)")
        self._engines: dict[str, Any] = {}
        self._eager: dict[str, Any] = {}  # graph -> context (cuda_graphs=False)
        self._replays: OrderedDict[tuple[Any, ...], _Replay] = OrderedDict()
        #: One lock for every launch, replay and binding: all contexts share one activation block.
        self._lock = threading.Lock()
        self._pool: Any = None
        #: Shape sets captured so far (evicted ones included).
        self.captures = 0
        on_cuda = device.type == "cuda"
        with torch.cuda.device(device) if on_cuda else contextlib.nullcontext():
            for graph, file in manifest.files.items():
                path = folder / file
                if not path.is_file():
                    raise ModelLoadError(f"missing {path} (listed in the manifest)")
                engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise ModelLoadError(f"TensorRT could not deserialize {path} (built by another version?)")
                self._check_io(graph, engine)
                self._engines[graph] = engine
            self._memory_size = max(self._engine_memory(g, e) for g, e in self._engines.items())
            self._memory = aligned_empty((max(1, self._memory_size),), torch.uint8, device)
            self._stream = torch.cuda.Stream(device) if on_cuda else None

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        device: str = "cuda",
        cuda_graphs: bool = True,
        max_graphs: int | None = None,
    ) -> tuple[TensorRTBackend, Any, str]:
        folder = Path(folder).expanduser()
        backend = cls(
            folder,
            device=device if device != "cpu" else "cuda",
            cuda_graphs=cuda_graphs,
            max_graphs=max_graphs,
        )
        return backend, load_export_tokenizer(folder), str(folder.resolve())

    # --- TensorRT calls, each checked ----------------------------------------------------------------------

    @staticmethod
    def _engine_memory(graph: str, engine: Any) -> int:
        """Activation bytes a context of ``engine`` needs (``device_memory_size_v2``: TensorRT 10.1+, 11)."""
        size = getattr(engine, "device_memory_size_v2", None)
        if size is None:
            raise ModelLoadError(
                f"{graph}: this TensorRT has no ICudaEngine.device_memory_size_v2; install TensorRT >= 10.1"
            )
        return int(size)

    def _check_io(self, graph: str, engine: Any) -> None:
        """The engine's I/O tensors are the manifest's in name, direction and dtype (``num_io_tensors``,
        ``get_tensor_name/mode/dtype``): a buffer of another dtype bound by address runs without any error and
        returns garbage, so a mismatch (engines from another export, a cast by the builder) is refused here."""
        inputs, outputs = self._io[graph]
        wanted = {t.name: ("INPUT", TRT_DTYPE_NAMES[t.dtype]) for t in inputs}
        wanted.update({t.name: ("OUTPUT", TRT_DTYPE_NAMES[t.dtype]) for t in outputs})
        found = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            found[name] = (_member(engine.get_tensor_mode(name)), _member(engine.get_tensor_dtype(name)))
        if found != wanted:
            wrong = sorted(name for name in {*found, *wanted} if found.get(name) != wanted.get(name))
            details = "; ".join(f"{n}: engine {found.get(n)}, manifest {wanted.get(n)}" for n in wrong)
            raise ModelLoadError(
                f"{graph}: the engine's tensors differ from the manifest's ({details}); rebuild the engines "
                "from this export with `fpedit build-engines`"
            )

    def _new_context(self, graph: str) -> Any:
        """A context on the shared activation block (created without memory of its own)."""
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = self._engines[graph].create_execution_context(strategy)
        if context is None:
            raise TensorRTError(
                f"TensorRT could not create an execution context for {graph} (out of device memory?)"
            )
        context.set_device_memory(self._memory.data_ptr(), self._memory_size)
        return context

    def _bind(
        self, graph: str, context: Any, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:
        """Shapes and addresses; every tensor here is already aligned (checked again: TensorRT would fail)."""
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise InvalidInputError(
                    "shape", f"{graph}: {name} {tuple(tensor.shape)} is outside the engine profile"
                )
        for name, tensor in (*inputs.items(), *outputs.items()):
            if not is_aligned(tensor):
                raise TensorRTError(
                    f"{graph}: {name} at {tensor.data_ptr():#x} is not {ADDRESS_ALIGNMENT}-byte aligned"
                )
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise TensorRTError(f"TensorRT refused the address of {graph}:{name} (unknown tensor name?)")
        missing = context.infer_shapes()
        if missing:
            raise TensorRTError(f"{graph}: TensorRT has no shape for {list(missing)}")

    def _launch(self, graph: str, context: Any, stream: Any) -> None:
        handle = stream.cuda_stream if stream is not None else 0
        if not context.execute_async_v3(handle):
            raise TensorRTError(f"TensorRT failed to execute {graph} (see its log above)")

    # --- running ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _on_stream(self) -> Any:
        """Run the body on the backend's stream, ordered after and before the caller's stream."""
        if self._stream is None:
            yield None
            return
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self._stream):
                yield self._stream
        finally:
            caller.wait_stream(self._stream)

    def _run(self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        # Contexts are created and captured on the current device, which is cuda:0 in a fresh thread (the
        # device loop, a request thread): make it this backend's device for cuda:N.
        with torch.cuda.device(self.device) if self._stream is not None else contextlib.nullcontext():
            self._run_on_device(graph, inputs, outputs)

    def _run_on_device(
        self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:
        if not self.cuda_graphs:
            with self._lock, self._on_stream() as stream:
                context = self._eager.get(graph)
                if context is None:
                    context = self._eager[graph] = self._new_context(graph)
                bound_in = {name: aligned_copy(t) for name, t in inputs.items()}
                bound_out = {name: t if is_aligned(t) else aligned_copy(t) for name, t in outputs.items()}
                self._bind(graph, context, bound_in, bound_out)
                self._launch(graph, context, stream)
                for name, tensor in outputs.items():
                    if bound_out[name] is not tensor:
                        tensor.copy_(bound_out[name])
            return
        key = (graph, *((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items())))
        with self._lock:
            replay = self._replays.get(key)
            if replay is not None:
                self._replays.move_to_end(key)
                self._replay(replay, inputs, outputs)
                return
        # A new shape set: capture with no other CUDA work in the process (gate first, then our lock).
        with CAPTURE_GATE.exclusive(), self._lock:
            replay = self._replays.get(key)
            if replay is None:
                replay = self._capture(graph, inputs, outputs)
                self._replays[key] = replay
                if len(self._replays) > self.max_graphs:
                    if self._stream is not None:  # nothing of the evicted entry may still be running
                        self._stream.synchronize()
                    while len(self._replays) > self.max_graphs:
                        self._replays.popitem(last=False)  # its context, buffers and graph go with it
            self._replay(replay, inputs, outputs)

    def _replay(
        self, replay: _Replay, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:
        with self._on_stream() as stream:
            for name, tensor in inputs.items():
                replay.inputs[name].copy_(tensor)
            if replay.graph is not None:
                replay.graph.replay()
            else:
                self._launch(replay.name, replay.context, stream)
            for name, tensor in outputs.items():
                tensor.copy_(replay.outputs[name])

    def _capture(
        self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> _Replay:
        """A context of its own, aligned static buffers, one eager launch (flushes TensorRT's shape set-up),
        then the capture on the backend's stream."""
        context = self._new_context(graph)
        static_in = {name: aligned_copy(t.clone()) for name, t in inputs.items()}
        static_out = {name: aligned_empty(tuple(t.shape), t.dtype, t.device) for name, t in outputs.items()}
        self._bind(graph, context, static_in, static_out)
        self.captures += 1
        cuda_graph = None
        with self._on_stream() as stream:
            self._launch(graph, context, stream)
            if stream is not None:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(
                    cuda_graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"
                ):
                    self._launch(graph, context, stream)
        return _Replay(graph, context, static_in, static_out, cuda_graph)

    def __len__(self) -> int:
        return len(self._replays)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            cuda_graphs=self.cuda_graphs,
            captured_shapes=len(self._replays),
            max_graphs=self.max_graphs,
            activation_bytes=self._memory_size,
        )
        return info
