"""CUDA graphs for the torch backend: a few graphs per latent size, replayed for every call.

A call is padded to the next of a small fixed set of batch sizes (1, 2, 4, 8, ... up to ``max_batch``;
padded rows repeat the last row with every map operation gated off, and their outputs are dropped), and its
map operations are made *dense*: every layer of a fixed layer set carries a map, a gate column and a donor
index as graph inputs (:meth:`CallState.dense`), so which layers or rows a request gates on is data, not a
new graph. A graph's key is therefore the call's variant (plain, capture, inject, donors, or a mix), padded
batch, latent and context shape, dtype, map format, layer set, whether it stops after the captured
layers, and the names of its LoRA adapters (:meth:`UNetCall.graph_key`). The layer set is the paper's 4-14 when the call stays inside it, else
all 16 (two choices, so that ``probs`` maps of the 64x64 layers are only held when asked for).

A call with adapters (``--lora-dir``) is captured with its adapters' hooks on, each hook multiplying by a row
of a (names, rows) float32 matrix of the graph's own instead of a number: the per-row scales
(:meth:`UNetCall.adapter_scales`, 0 where a row's set lacks the adapter) are copied in like any other input,
so one graph serves a set of names at every scale, and every mix of rows whose sets together use those
names; a set of names costs graphs like any other variant.

The cache is an LRU of at most ``max_graphs`` graphs (default :data:`DEFAULT_MAX_GRAPHS`). All graphs share
one memory pool, so their intermediates cost the largest graph's, not the sum; that is safe because one lock
covers every copy-in, replay and copy-out (a graph's static outputs may live where another graph keeps
intermediates, and they are cloned before any other graph runs). The GPU runs one UNet at a time anyway.
Every capture (warm-up runs included) runs inside the process's :data:`~.capture.CAPTURE_GATE` exclusive
section, so no other thread's VAE, text encoder, program step or synchronize can break it; the CPU stand-in
takes the same path.

Without CUDA (the tests) a "graph" replays by running the eager forward on its static buffers, so the
padding, dense state, keys, copy-in/out and eviction run on the CPU exactly as they do around a real graph.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calls import UNetCall, UNetResult
from ..contract import NUM_SELF_ATTENTION_LAYERS, PAPER_LAYERS, ModelSpec
from ..maps import AttentionMaps
from .attention import CallState
from .capture import CAPTURE_GATE

WARMUP_RUNS = 2
#: Graphs kept per backend: 4 batch sizes x a few variants x a size or two fits; older ones are evicted.
DEFAULT_MAX_GRAPHS = 24
ALL_LAYERS = tuple(range(1, NUM_SELF_ATTENTION_LAYERS + 1))

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, CallState], "torch.Tensor | None"]
#: Enters a block in which this thread's forwards apply the given (name, scale) pairs; a scale may be a
#: (rows,) tensor of per-row scales, which the hooks read when they run (in a graph: when it replays).
AdapterScope = Callable[[Sequence[tuple[str, Any]]], AbstractContextManager[None]]


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The captured batch sizes: powers of two below ``max_batch``, and ``max_batch``."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return (*sizes, max_batch)


def padded_rows(rows: int, max_batch: int) -> int:
    """The captured batch size a call of ``rows`` rows runs at."""
    for size in batch_sizes(max_batch):
        if rows <= size:
            return size
    raise ValueError(f"{rows} rows exceed max_batch {max_batch}")


def graph_layers(call: UNetCall) -> tuple[int, ...]:
    """The fixed layer set a graph serving ``call`` carries maps for."""
    return PAPER_LAYERS if set(call.map_layers) <= set(PAPER_LAYERS) else ALL_LAYERS


@dataclass
class _Graph:
    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    state: CallState  # static maps, gates and donor indices the graph reads; captured maps it writes
    graph: torch.cuda.CUDAGraph | None
    #: The adapters' names and their per-row scales ((names, rows) float32): inputs like the sample.
    adapter_names: tuple[str, ...] = ()
    scales: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)

    def adapters(self) -> tuple[tuple[str, torch.Tensor], ...]:
        """The adapters as the hooks take them, each name's per-row scales a view of :attr:`scales`."""
        if self.scales is None:
            return ()
        return tuple(zip(self.adapter_names, self.scales.unbind(), strict=True))

    def replay(self, forward: Forward, scope: AdapterScope | None) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        self.state.captured.clear()
        with _adapters_on(scope, self.adapters()):
            self.noise = forward(self.sample, self.timestep, self.context, self.state)
        self.captured = dict(self.state.captured)


def _adapters_on(
    scope: AdapterScope | None, adapters: Sequence[tuple[str, Any]]
) -> AbstractContextManager[None]:
    if not adapters:
        return nullcontext()
    if scope is None:
        raise ValueError("a call with adapters needs a backend with adapters")
    return scope(adapters)


class UNetGraphs:
    def __init__(
        self,
        forward: Forward,
        spec: ModelSpec,
        device: torch.device,
        channels_last: bool,
        *,
        max_batch: int = 8,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        adapter_scope: AdapterScope | None = None,
    ) -> None:
        self.forward = forward
        self.spec = spec
        self.device = device
        self.channels_last = channels_last
        self.max_batch = max_batch
        self.max_graphs = max(1, int(max_graphs))
        self.adapter_scope = adapter_scope
        self._graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self._lock = threading.Lock()  # every capture, copy-in, replay and copy-out (shared pool)
        self._pool: Any = None
        self._capture_stream: Any = None
        #: Graphs captured so far (evicted ones included): what the bound is about.
        self.captures = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, call: UNetCall) -> UNetResult:
        rows = call.rows
        padded = call.padded(padded_rows(rows, self.max_batch))
        layers = graph_layers(padded)
        key = padded.graph_key(layers)
        inputs = CallState.dense(padded, layers, self.spec, self.device)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is not None:
                self._graphs.move_to_end(key)
                return self._replay(entry, call, padded, inputs)
        # A new key: capture with no other CUDA work in the process (the gate first, then our lock: a thread
        # inside the gate's shared section may be waiting for our lock).
        with CAPTURE_GATE.exclusive(), self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(padded, inputs)
                self._graphs[key] = entry
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:  # another thread captured it while this one waited
                self._graphs.move_to_end(key)
            return self._replay(entry, call, padded, inputs)

    def _replay(self, entry: _Graph, call: UNetCall, padded: UNetCall, inputs: CallState) -> UNetResult:
        """Copy in, replay, copy out (under ``self._lock``: the graphs share one pool)."""
        rows = call.rows
        entry.sample.copy_(padded.sample)
        entry.timestep.copy_(padded.timesteps)
        entry.context.copy_(padded.context)
        entry.state.load(inputs)
        if entry.scales is not None:
            entry.scales.copy_(padded.adapter_scales())
        entry.replay(self.forward, self.adapter_scope)
        noise = None
        if call.need_noise_pred and entry.noise is not None:
            noise = entry.noise[:rows].clone()
        maps = None
        if call.capture:
            maps = AttentionMaps(
                call.map_format, {layer: entry.captured[layer][:rows].clone() for layer in call.capture}
            )
        return UNetResult(noise, maps)

    def _capture(self, call: UNetCall, inputs: CallState) -> _Graph:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        state = inputs.owned()  # static inputs of the graph's own: replays copy later calls into them
        entry = _Graph(
            sample=torch.empty_like(call.sample, memory_format=memory_format).copy_(call.sample),
            timestep=call.timesteps.clone(),
            context=call.context.clone(),
            state=state,
            graph=None,
            adapter_names=call.adapter_names,
            scales=call.adapter_scales().to(self.device) if call.adapter_names else None,
        )
        self.captures += 1
        if self.device.type != "cuda":
            return entry
        # Everything on this backend's device: torch.cuda.graph's default capture stream and its synchronize
        # follow the *current* device, which is cuda:0 in a fresh thread such as the device loop.
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), _adapters_on(self.adapter_scope, entry.adapters()):
                for _ in range(WARMUP_RUNS):  # let cuBLAS/cuDNN pick algorithms and allocate workspaces
                    state.captured.clear()
                    self.forward(entry.sample, entry.timestep, entry.context, state)
            torch.cuda.current_stream(self.device).wait_stream(side)
            state.captured.clear()
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
                self._capture_stream = torch.cuda.Stream(self.device)
            # The gate keeps every engine thread's CUDA work out; thread_local keeps a stray launch elsewhere in
            # the process (allowed onto other streams) from failing this capture. One capture stream per cache
            # (on its device), as torch asks of captures that share a pool.
            with (
                torch.cuda.graph(
                    graph, pool=self._pool, stream=self._capture_stream, capture_error_mode="thread_local"
                ),
                _adapters_on(self.adapter_scope, entry.adapters()),
            ):
                entry.noise = self.forward(entry.sample, entry.timestep, entry.context, state)
        entry.graph = graph
        entry.captured = dict(state.captured)
        return entry
