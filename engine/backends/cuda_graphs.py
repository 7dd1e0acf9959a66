"""CUDA graphs for the torch backend: each distinct UNet call is captured once, then replayed.

A call's *key* is everything that changes the kernels it launches: shapes and dtypes, the map format, the
captured layers, whether it stops after them, the injection pattern (which rows take maps in which layers)
and the in-call donors. Per key a graph owns static input buffers; a call copies its inputs in (device to
device), replays, and clones the outputs out, so nothing is allocated by the model per step and the host
never waits for the device.

All graphs share one memory pool, so their intermediates cost the largest graph's, not the sum (a dozen
SD 1.5 graphs otherwise hold tens of GB). That is safe because one lock covers every copy-in, replay and
copy-out: a graph's static outputs may live where another graph keeps intermediates, and they are cloned
before any other graph runs. The GPU runs one UNet at a time anyway, so the lock costs no throughput.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..maps import AttentionMaps, Injection

if TYPE_CHECKING:
    from .torch_backend import CallState, TorchBackend

WARMUP_RUNS = 2


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    inject_maps: dict[int, torch.Tensor]
    noise: torch.Tensor | None
    captured: dict[int, torch.Tensor]
    state: CallState  # keeps the row masks and donor indices the graph reads alive


class UNetGraphs:
    def __init__(self, backend: TorchBackend) -> None:
        self.backend = backend
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._lock = threading.Lock()  # every capture, copy-in, replay and copy-out (shared pool)
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    @staticmethod
    def key(
        sample: torch.Tensor,
        context: torch.Tensor,
        capture: Sequence[int] | None,
        map_format: str,
        inject: Injection | None,
        need_noise_pred: bool,
        donors: Sequence[int] | None,
        donor_layers: Sequence[int],
    ) -> tuple[Any, ...]:
        inject_key = None
        if inject is not None:
            inject_key = (
                inject.maps.format,
                tuple((layer, tuple(t.shape)) for layer, t in sorted(inject.maps.tensors.items())),
                tuple(map(tuple, inject.gate.to("cpu", torch.bool).tolist())),
            )
        return (
            tuple(sample.shape),
            sample.dtype,
            tuple(context.shape),
            map_format,
            tuple(sorted(capture or ())),
            need_noise_pred,
            inject_key,
            tuple(donors) if donors is not None else None,
            tuple(sorted(donor_layers)),
        )

    def run(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        capture: Sequence[int] | None,
        map_format: str,
        inject: Injection | None,
        need_noise_pred: bool,
        donors: Sequence[int] | None,
        donor_layers: Sequence[int],
    ) -> tuple[torch.Tensor | None, AttentionMaps | None]:
        key = self.key(sample, context, capture, map_format, inject, need_noise_pred, donors, donor_layers)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._capture(
                    sample,
                    timestep,
                    context,
                    capture,
                    map_format,
                    inject,
                    need_noise_pred,
                    donors,
                    donor_layers,
                )
            entry.sample.copy_(sample)
            entry.timestep.copy_(timestep)
            entry.context.copy_(context)
            if inject is not None:
                for layer, buffer in entry.inject_maps.items():
                    buffer.copy_(inject.maps.tensors[layer])
            entry.graph.replay()
            noise = entry.noise.clone() if entry.noise is not None else None
            maps = None
            if capture:
                maps = AttentionMaps(map_format, {layer: t.clone() for layer, t in entry.captured.items()})
        return noise, maps

    def _capture(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        capture: Sequence[int] | None,
        map_format: str,
        inject: Injection | None,
        need_noise_pred: bool,
        donors: Sequence[int] | None,
        donor_layers: Sequence[int],
    ) -> _Graph:
        from .torch_backend import CallState

        backend = self.backend
        memory_format = torch.channels_last if backend.channels_last else torch.contiguous_format
        static_sample = torch.empty_like(sample, memory_format=memory_format).copy_(sample)
        static_t = timestep.clone()
        static_ctx = context.clone()
        static_inject = None
        inject_maps: dict[int, torch.Tensor] = {}
        if inject is not None:
            inject_maps = {layer: t.contiguous().clone() for layer, t in inject.maps.tensors.items()}
            static_inject = Injection(AttentionMaps(inject.maps.format, inject_maps), inject.gate)

        def make_state() -> CallState:
            return CallState.build(
                map_format, capture, static_inject, backend.device, not need_noise_pred, donors, donor_layers
            )

        state = make_state()
        side = torch.cuda.Stream(backend.device)
        side.wait_stream(torch.cuda.current_stream(backend.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):  # let cuBLAS/cuDNN pick algorithms and allocate workspaces
                backend.forward(static_sample, static_t, static_ctx, make_state())
        torch.cuda.current_stream(backend.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: other requests may use the GPU (VAE, text) from their threads while this captures.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            noise = backend.forward(static_sample, static_t, static_ctx, state)
        return _Graph(
            graph=graph,
            sample=static_sample,
            timestep=static_t,
            context=static_ctx,
            inject_maps=inject_maps,
            noise=noise,
            captured=dict(state.captured),
            state=state,
        )
