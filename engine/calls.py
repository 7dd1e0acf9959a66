"""One UNet evaluation as a value: what the FPE programs ask for and what a backend runs.

A :class:`UNetCall` carries the rows (sample, per-row timesteps, context) and the map operations on them:
layers to capture, maps to inject with a per-row, per-layer gate, and in-call donors. Because every map
operation is per row, calls from different requests can share one backend call: :meth:`UNetCall.merge`
stacks compatible calls (a plain row is an inject row with gate 0), the backend runs the merged call once,
and :meth:`UNetResult.split` hands each call its own rows and layers back. :meth:`UNetCall.split` cuts a call
into pieces a backend's ``max_batch`` accepts, keeping a row with the row it borrows a map from. Adapter sets
are per row too once calls of different sets merge (:attr:`UNetCall.row_adapters`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .adapters import AdapterSet
from .maps import AttentionMaps, Injection


@dataclass(frozen=True)
class Donors:
    """In-call donors: in layer ``layers[j]``, row ``r`` attends with row ``source[r]``'s map when
    ``gate[r, j]``; a generated edit's target row borrows its source row's map within one call."""

    source: tuple[int, ...]
    layers: tuple[int, ...]
    gate: torch.Tensor  # (B, len(layers)) bool, on the CPU

    @classmethod
    def for_rows(cls, source: Sequence[int], layers: Iterable[int]) -> Donors:
        layers = tuple(sorted(set(layers)))
        borrowing = torch.tensor([s != r for r, s in enumerate(source)], dtype=torch.bool)
        return cls(tuple(source), layers, borrowing[:, None].expand(len(source), len(layers)).clone())

    def index(self, layer: int) -> list[int] | None:
        """Per row, the row whose map it uses in ``layer`` (itself when its gate is off); None if no row
        borrows there."""
        if layer not in self.layers:
            return None
        column = self.gate[:, self.layers.index(layer)]
        if not bool(column.any()):
            return None
        return [s if bool(on) else r for r, (s, on) in enumerate(zip(self.source, column, strict=True))]


@dataclass(frozen=True)
class UNetCall:
    """One UNet evaluation on a batch of rows and the map operations on them.

    ``timesteps`` is (B,) so rows may sit at different steps; ``capture`` names layers whose maps (in
    ``map_format``) come back for every row; ``inject`` gives maps and a per-row, per-layer gate; ``donors``
    lets rows borrow another row's map of the same call. With ``need_noise_pred=False`` the backend may stop
    after the last captured layer and return no noise (a real edit's source rows run only for their maps).
    """

    sample: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    map_format: str = "qk"
    capture: tuple[int, ...] = ()
    inject: Injection | None = None
    donors: Donors | None = None
    need_noise_pred: bool = True
    #: Self-attention layer numbers whose transformer block's *cross*-attention probabilities (softmax over
    #: the text tokens, averaged over heads, float32) come back for every row: a word-mask blend's input.
    cross_probs: tuple[int, ...] = ()
    #: The request's LoRA adapters ((name, scale) pairs, sorted), applied to every row of the call.
    adapters: AdapterSet = ()
    #: Each row's own set where the rows' sets differ (calls of several sets merged; then ``adapters`` is
    #: empty); ``None`` where every row has :attr:`adapters`, so such a call pays no per-row work.
    row_adapters: tuple[AdapterSet, ...] | None = None

    def __post_init__(self) -> None:
        rows = self.sample.shape[0]
        if self.timesteps.shape != (rows,) or self.context.shape[0] != rows:
            raise ValueError(
                f"rows disagree: sample {tuple(self.sample.shape)}, timesteps {tuple(self.timesteps.shape)}, "
                f"context {tuple(self.context.shape)}"
            )
        if self.inject is not None and self.inject.gate.shape[0] != rows:
            raise ValueError("the injection gate needs one row per sample")
        if self.donors is not None and len(self.donors.source) != rows:
            raise ValueError("donors need one entry per sample")
        if self.row_adapters is not None and len(self.row_adapters) != rows:
            raise ValueError("row_adapters need one set per sample")

    # --- what the call is ---------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])

    @property
    def uses_maps(self) -> bool:
        return bool(self.capture) or self.inject is not None or self.donors is not None

    @property
    def variant(self) -> str:
        """Which map operations the call performs: ``plain``, or a ``+``-joined subset of
        ``capture``, ``donors``, ``inject``."""
        parts = [
            name
            for name, on in (
                ("capture", bool(self.capture)),
                ("donors", self.donors is not None),
                ("inject", self.inject is not None),
            )
            if on
        ]
        return "+".join(parts) or "plain"

    @property
    def map_layers(self) -> tuple[int, ...]:
        """Every layer the call captures, injects or donates in."""
        layers = set(self.capture)
        if self.inject is not None:
            layers.update(self.inject.maps.layers)
        if self.donors is not None:
            layers.update(self.donors.layers)
        return tuple(sorted(layers))

    def graph_key(self, map_layers: tuple[int, ...]) -> tuple[Any, ...]:
        """Everything that changes the kernels a CUDA graph of this call launches, given the fixed layer
        set the graph serves: not which layers or rows are gated on (the gate is an input)."""
        return (
            self.variant,
            self.rows,
            tuple(self.sample.shape[1:]),
            tuple(self.context.shape[1:]),
            self.sample.dtype,
            self.map_format if self.uses_maps else None,
            map_layers if self.uses_maps else (),
            self.need_noise_pred or not self.capture,
            self.adapter_names,  # the scales are graph inputs: one graph serves every scale and row mix
        )

    @property
    def row_sets(self) -> tuple[AdapterSet, ...]:
        """Each row's adapter set."""
        return self.row_adapters if self.row_adapters is not None else (self.adapters,) * self.rows

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The names of every adapter some row of the call uses, sorted (their scales aside)."""
        if self.row_adapters is None:
            return tuple(name for name, _ in self.adapters)
        return tuple(sorted({name for row in self.row_adapters for name, _ in row}))

    def same_adapters(self, other: UNetCall) -> bool:
        """Whether both calls' rows all have one and the same set."""
        return self.row_adapters is None and other.row_adapters is None and self.adapters == other.adapters

    def adapter_scales(self) -> torch.Tensor:
        """(len(adapter_names), rows) float32 on the CPU: per adapter, each row's scale (0 where the row's set
        lacks it)."""
        names = self.adapter_names
        scales = torch.zeros((len(names), self.rows), dtype=torch.float32)
        for r, row in enumerate(self.row_sets):
            for name, scale in row:
                scales[names.index(name), r] = scale
        return scales

    def active_adapters(self, device: torch.device) -> tuple[tuple[str, Any], ...]:
        """What the adapter hooks take for this call: the set itself where every row has it, else per
        adapter a (rows,) vector of the rows' scales on ``device``."""
        if self.row_adapters is None:
            return self.adapters
        return tuple(zip(self.adapter_names, self.adapter_scales().to(device).unbind(), strict=True))

    # --- cutting and joining ------------------------------------------------------------------------------

    def slice(self, lo: int, hi: int) -> UNetCall:
        """Rows ``lo:hi`` as a call of their own; a row must not borrow from outside the range."""
        inject = None
        if self.inject is not None:
            inject = Injection(self.inject.maps.rows(range(lo, hi)), self.inject.gate[lo:hi])
        donors = None
        if self.donors is not None:
            gate = self.donors.gate[lo:hi]
            source = self.donors.source[lo:hi]
            for r, s in enumerate(source):
                if bool(gate[r].any()) and not lo <= s < hi:
                    raise ValueError(f"row {lo + r} borrows row {s}, outside rows {lo}..{hi - 1}")
            donors = Donors(
                tuple(s - lo if lo <= s < hi else r for r, s in enumerate(source)), self.donors.layers, gate
            )
        adapters = {} if self.row_adapters is None else _adapter_fields(self.row_adapters[lo:hi])
        return replace(
            self,
            sample=self.sample[lo:hi],
            timesteps=self.timesteps[lo:hi],
            context=self.context[lo:hi],
            inject=inject,
            donors=donors,
            **adapters,
        )

    def split(self, max_rows: int) -> list[UNetCall]:
        """Pieces of at most ``max_rows`` rows; rows tied by donors stay in one piece."""
        if self.rows <= max_rows:
            return [self]
        cuts = self._groups()
        pieces: list[UNetCall] = []
        lo = 0
        for start, end in cuts:
            if end - start > max_rows:
                raise ValueError(
                    f"rows {start}..{end - 1} share maps and need {end - start} rows in one call"
                )
            if end - lo > max_rows:
                pieces.append(self.slice(lo, start))
                lo = start
        pieces.append(self.slice(lo, self.rows))
        return pieces

    def _groups(self) -> list[tuple[int, int]]:
        """Consecutive row ranges that a split must not cut (a borrowing row and its donor)."""
        reach = list(range(self.rows))  # reach[r]: furthest row r is tied to
        if self.donors is not None:
            for r, s in enumerate(self.donors.source):
                if bool(self.donors.gate[r].any()):
                    a, b = min(r, s), max(r, s)
                    reach[a] = max(reach[a], b)
        groups: list[tuple[int, int]] = []
        start, end = 0, 0
        for r in range(self.rows):
            if r > end:
                groups.append((start, end + 1))
                start = r
            end = max(end, reach[r])
        groups.append((start, end + 1))
        return groups

    def compatible(self, other: UNetCall, mix_adapters: bool = False) -> bool:
        """Whether the two calls' rows can run as one batch: same latent and context shapes and dtype, and
        one map format among the calls that use maps, and one adapter set unless ``mix_adapters``."""
        return (
            self.sample.shape[1:] == other.sample.shape[1:]
            and self.sample.dtype == other.sample.dtype
            and self.sample.device == other.sample.device
            and self.context.shape[1:] == other.context.shape[1:]
            and self.context.dtype == other.context.dtype
            and (not (self.uses_maps and other.uses_maps) or self.map_format == other.map_format)
            and (mix_adapters or self.same_adapters(other))
        )

    @classmethod
    def merge(cls, calls: Sequence[UNetCall]) -> UNetCall:
        """One call whose rows are every call's rows in order: captures are united (each call gets its own
        layers back from :meth:`UNetResult.split`), rows without an injection or donor are gated off, and
        rows keep their own adapter sets (whether sets may mix is the executor's choice)."""
        if len(calls) == 1:
            return calls[0]
        first = calls[0]
        for other in calls[1:]:
            if not first.compatible(other, mix_adapters=True):
                raise ValueError(
                    "calls of different latent sizes, dtypes or map formats cannot share a batch"
                )
        with_maps = [c for c in calls if c.uses_maps]
        map_format = with_maps[0].map_format if with_maps else first.map_format
        capture = tuple(sorted({layer for c in calls for layer in c.capture}))
        cross_probs = tuple(sorted({layer for c in calls for layer in c.cross_probs}))
        return cls(
            sample=torch.cat([c.sample for c in calls]),
            timesteps=torch.cat([c.timesteps for c in calls]),
            context=torch.cat([c.context for c in calls]),
            map_format=map_format,
            capture=capture,
            inject=_merge_injections(calls, map_format),
            donors=_merge_donors(calls),
            need_noise_pred=any(c.need_noise_pred for c in calls) or not capture,
            cross_probs=cross_probs,
            **_adapter_fields([row for c in calls for row in c.row_sets]),
        )

    def padded(self, rows: int) -> UNetCall:
        """The call grown to ``rows`` rows by repeating its last row with every map operation gated off;
        the extra rows' outputs are dropped (a CUDA graph serves a fixed batch size)."""
        extra = rows - self.rows
        if extra < 0:
            raise ValueError(f"cannot pad {self.rows} rows down to {rows}")
        if extra == 0:
            return self

        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])

        inject = None
        if self.inject is not None:
            maps = self.inject.maps
            inject = Injection(
                AttentionMaps(maps.format, {layer: grow(t) for layer, t in maps.tensors.items()}),
                torch.cat(
                    [self.inject.gate, torch.zeros((extra, self.inject.gate.shape[1]), dtype=torch.bool)]
                ),
            )
        donors = None
        if self.donors is not None:
            donors = Donors(
                (*self.donors.source, *range(self.rows, rows)),
                self.donors.layers,
                torch.cat(
                    [self.donors.gate, torch.zeros((extra, len(self.donors.layers)), dtype=torch.bool)]
                ),
            )
        padded_sets = self.row_adapters
        if padded_sets is not None:  # padding rows repeat the last row's set, as they repeat its sample
            padded_sets = (*padded_sets, *padded_sets[-1:] * extra)
        return replace(
            self,
            sample=grow(self.sample),
            timesteps=grow(self.timesteps),
            context=grow(self.context),
            inject=inject,
            donors=donors,
            row_adapters=padded_sets,
        )


def _adapter_fields(sets: Sequence[AdapterSet]) -> dict[str, Any]:
    """``adapters``/``row_adapters`` for rows of these sets: one set for all when they agree (no per-row
    work), else a set per row."""
    if all(row == sets[0] for row in sets):
        return {"adapters": tuple(sets[0]), "row_adapters": None}
    return {"adapters": (), "row_adapters": tuple(sets)}


def _merge_injections(calls: Sequence[UNetCall], map_format: str) -> Injection | None:
    injected = [c.inject for c in calls if c.inject is not None]
    if not injected:
        return None
    layers = sorted({layer for inj in injected for layer in inj.maps.layers})
    template = {
        layer: next(inj.maps.tensors[layer] for inj in injected if layer in inj.maps.tensors)
        for layer in layers
    }
    tensors: dict[int, torch.Tensor] = {}
    for layer in layers:
        parts = []
        for c in calls:
            if c.inject is not None and layer in c.inject.maps.tensors:
                parts.append(c.inject.maps.tensors[layer])
            else:  # gated off: any values of the right shape
                t = template[layer]
                parts.append(t.new_zeros((c.rows, *t.shape[1:])))
        tensors[layer] = torch.cat(parts)
    gate = torch.zeros((sum(c.rows for c in calls), len(layers)), dtype=torch.bool)
    lo = 0
    for c in calls:
        if c.inject is not None:
            columns = [layers.index(layer) for layer in c.inject.maps.layers]
            gate[lo : lo + c.rows, columns] = c.inject.gate.to("cpu", torch.bool)
        lo += c.rows
    return Injection(AttentionMaps(map_format, tensors), gate)


def _merge_donors(calls: Sequence[UNetCall]) -> Donors | None:
    if all(c.donors is None for c in calls):
        return None
    layers = tuple(sorted({layer for c in calls if c.donors is not None for layer in c.donors.layers}))
    source: list[int] = []
    gate = torch.zeros((sum(c.rows for c in calls), len(layers)), dtype=torch.bool)
    lo = 0
    for c in calls:
        if c.donors is None:
            source.extend(range(lo, lo + c.rows))
        else:
            source.extend(lo + s for s in c.donors.source)
            columns = [layers.index(layer) for layer in c.donors.layers]
            gate[lo : lo + c.rows, columns] = c.donors.gate
        lo += c.rows
    return Donors(tuple(source), layers, gate)


@dataclass(frozen=True)
class UNetResult:
    """What a UNet call gives back: the noise prediction (float32; ``None`` when the call did not need it
    and the backend stopped early) and the captured maps (``None`` without capture)."""

    noise: torch.Tensor | None
    maps: AttentionMaps | None = None
    #: Per layer of the call's ``cross_probs``: (B, query tokens, text tokens) float32; ``None`` without.
    cross: dict[int, torch.Tensor] | None = None

    def rows(
        self,
        lo: int,
        hi: int,
        capture: Sequence[int] | None = None,
        need_noise: bool = True,
        cross_probs: Sequence[int] | None = None,
    ) -> UNetResult:
        """Rows ``lo:hi``, with maps of ``capture`` only (all captured layers when ``None``) and cross-attention
        probabilities of ``cross_probs`` only (likewise)."""
        noise = self.noise[lo:hi] if self.noise is not None and need_noise else None
        maps = None
        if self.maps is not None and capture != ():
            layers = self.maps.layers if capture is None else capture
            maps = AttentionMaps(
                self.maps.format, {layer: self.maps.tensors[layer][lo:hi] for layer in layers}
            )
        cross = None
        if self.cross is not None and cross_probs != ():
            wanted = self.cross if cross_probs is None else cross_probs
            cross = {layer: self.cross[layer][lo:hi] for layer in wanted}
        return UNetResult(noise, maps, cross)

    def split(self, calls: Sequence[UNetCall]) -> list[UNetResult]:
        """Each merged call's rows and captured layers, in order (the inverse of :meth:`UNetCall.merge`)."""
        parts, lo = [], 0
        for c in calls:
            parts.append(self.rows(lo, lo + c.rows, c.capture, c.need_noise_pred, c.cross_probs))
            lo += c.rows
        return parts

    @staticmethod
    def cat(parts: Sequence[UNetResult]) -> UNetResult:
        """The results of a split call's pieces, joined back in row order."""
        if len(parts) == 1:
            return parts[0]
        noises = [p.noise for p in parts]
        noise = torch.cat(noises) if all(n is not None for n in noises) else None  # type: ignore[arg-type]
        maps = [p.maps for p in parts if p.maps is not None]
        crosses = [p.cross for p in parts if p.cross is not None]
        cross = {layer: torch.cat([c[layer] for c in crosses]) for layer in crosses[0]} if crosses else None
        return UNetResult(noise, AttentionMaps.cat(maps) if maps else None, cross)
