"""Self-attention maps as they travel between the source and the target branch (docs/design.md, map contract)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class AttentionMaps:
    """Per-layer maps, batch-first, one row per UNet sample.

    ``qk``: ``(B, 2, N, C)``, the projected queries and keys; ``probs``: ``(B, heads, N, N)``, the softmax.
    """

    format: str
    tensors: dict[int, torch.Tensor]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.tensors))

    @property
    def batch(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def rows(self, index: Sequence[int]) -> AttentionMaps:
        """The maps of the given rows, in that order (a row may repeat)."""
        if len(set(index)) == 1:
            # One source row for every target row: a broadcast view, no copy.
            i = index[0]
            return AttentionMaps(
                self.format,
                {layer: t[i : i + 1].expand(len(index), *t.shape[1:]) for layer, t in self.tensors.items()},
            )
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return AttentionMaps(
            self.format, {layer: t.index_select(0, idx.to(t.device)) for layer, t in self.tensors.items()}
        )

    @staticmethod
    def cat(parts: Sequence[AttentionMaps]) -> AttentionMaps:
        first = parts[0]
        return AttentionMaps(
            first.format, {layer: torch.cat([p.tensors[layer] for p in parts]) for layer in first.tensors}
        )


@dataclass
class Injection:
    """Maps to inject into a UNet call and, per row and layer, whether to use them.

    ``gate`` is ``(B, len(maps.layers))`` bool, columns in ``maps.layers`` order. A row whose gate is off in a
    layer keeps its own attention there, so the target's unconditional and conditional rows share one call.
    """

    maps: AttentionMaps
    gate: torch.Tensor

    @classmethod
    def for_rows(
        cls, maps: AttentionMaps, replaced_rows: Sequence[bool], layers_on: Iterable[int]
    ) -> Injection:
        on = set(layers_on)
        missing = on - set(maps.layers)
        if missing:
            raise ValueError(f"maps lack layers {sorted(missing)}")
        columns = torch.tensor([layer in on for layer in maps.layers], dtype=torch.bool)
        rows = torch.tensor(list(replaced_rows), dtype=torch.bool)
        return cls(maps=maps, gate=rows[:, None] & columns[None, :])
