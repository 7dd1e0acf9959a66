"""The small interface every runtime implements; the FPE step programs (``engine.programs``) sit above it.

A backend runs graphs on batches of torch tensors on its device. It does not know about prompts, schedules,
branches or windows: it only evaluates the UNet (optionally capturing or injecting self-attention maps, per
the contract in ``engine.contract``), the text encoder and the VAE.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import torch

from ..adapters import ActiveAdapters, AdapterBank
from ..calls import UNetCall, UNetResult
from ..contract import ModelSpec
from ..maps import AttentionMaps, Injection
from .capture import device_work

#: The entry points that touch the device: every subclass's own definitions run inside a shared section of
#: the process's capture gate (:mod:`.capture`), so no backend can forget it.
DEVICE_METHODS = ("encode_text", "encode_image", "decode_latents", "unet", "synchronize")


class Backend(ABC):
    """Runs SD 1.x graphs. Inputs and outputs are torch tensors on :attr:`device`."""

    name: str = "abstract"
    spec: ModelSpec
    device: torch.device
    #: dtype of UNet and text-encoder inputs and outputs (maps too).
    dtype: torch.dtype
    #: Layers this backend can capture and inject; ``None`` means any of 1..16.
    map_layers: tuple[int, ...] | None = None
    #: Map formats this backend can capture and inject.
    map_formats: tuple[str, ...] = ("qk", "probs")
    #: LoRA files fused into the weights at load (``FILE:SCALE``), reported by ``info``.
    loras: Sequence[str] = ()
    #: Largest UNet batch (rows) one call may take.
    max_batch: int = 8
    #: Whether :meth:`unet` takes ``call.donors``: rows that attend with another row's map of the same call.
    supports_donors: bool = False
    #: LoRA adapters requests may pick (``--lora-dir``); ``None`` where the backend serves none.
    adapters: AdapterBank | None = None
    #: Whether :meth:`unet` returns ``call.cross_probs`` (cross-attention probabilities: word-mask blends).
    supports_cross_probs: bool = False
    #: Whether :meth:`differentiable_unet` gives a module (gradient work such as null-text inversion): what a
    #: check asks, so that judging a request never makes the float32 copy itself.
    supports_gradients: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in DEVICE_METHODS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "__isabstractmethod__", False):
                setattr(cls, name, device_work(method))

    @abstractmethod
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids → (B, L, D) last hidden states."""

    @abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 4, H/8, W/8) VAE posterior mean, before the scaling factor."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latents, already divided by the scaling factor → (B, 3, 8h, 8w) in about [-1, 1]."""

    @abstractmethod
    def unet(self, call: UNetCall) -> UNetResult:
        """One UNet evaluation of ``call``'s rows with its map operations (see :class:`UNetCall`).

        Returns the noise prediction (``None`` when ``call.need_noise_pred`` is false) and the maps of
        ``call.capture``. ``call.donors`` is accepted only where :attr:`supports_donors`.
        """

    def differentiable_unet(self) -> torch.nn.Module | None:
        """A float32 UNet module gradients can flow through (frozen weights; called as diffusers' UNet), for
        gradient work such as null-text inversion; ``None`` where this backend has none (exported graphs).
        The engine refuses such work up front when this is ``None``."""
        return None

    def on_device(self, call: UNetCall) -> UNetCall:
        """``call`` with its tensors on this backend's device and in its dtype (timesteps float32)."""
        inject = call.inject
        if inject is not None:
            maps = inject.maps
            inject = Injection(
                AttentionMaps(
                    maps.format, {i: t.to(self.device, self.dtype) for i, t in maps.tensors.items()}
                ),
                inject.gate,
            )
        return replace(
            call,
            sample=call.sample.to(self.device, self.dtype),
            timesteps=call.timesteps.to(self.device, torch.float32),
            context=call.context.to(self.device, self.dtype),
            inject=inject,
        )

    def adapter_scope(self, adapters: ActiveAdapters) -> AbstractContextManager[None]:
        """A block in which this thread's forwards (text encoder, eager UNet) apply ``adapters`` (a scale
        may be a per-row vector: :meth:`UNetCall.active_adapters`)."""
        if not adapters:
            return nullcontext()
        if self.adapters is None:
            from ..errors import InvalidInputError

            raise InvalidInputError("adapters", f"the {self.name} backend has no adapters loaded")
        return self.adapters.active(adapters)

    def can_share_call(self, a: UNetCall, b: UNetCall, mix_adapters: bool = False) -> bool:
        """Whether rows of ``a`` and ``b`` may run as one call on this backend (same latent size, dtype and
        map format, and adapter set unless ``mix_adapters``; backends whose graphs cannot mix map operations
        narrow this)."""
        return a.compatible(b, mix_adapters) and (
            self.supports_donors or (a.donors is None and b.donors is None)
        )

    def capture_layers(self, requested: Sequence[int]) -> tuple[int, ...]:
        """Layers to capture for a request: fixed-graph backends capture their whole set, so a cached
        source can serve any later subset."""
        return tuple(requested) if self.map_layers is None else self.map_layers

    def check_map_request(self, layers: Sequence[int], map_format: str) -> None:
        """Refuse layers or formats this backend's graphs do not carry, with a message that names them."""
        from ..errors import InvalidInputError

        if map_format not in self.map_formats:
            raise InvalidInputError(
                "map_format", f"this {self.name} model serves {list(self.map_formats)}, not {map_format!r}"
            )
        if self.map_layers is not None:
            missing = sorted(set(layers) - set(self.map_layers))
            if missing:
                raise InvalidInputError(
                    "layers",
                    f"layers {missing} are not in this {self.name} model's exported layers "
                    f"{list(self.map_layers)}; re-export with --layers to include them",
                )

    @device_work
    def synchronize(self) -> None:
        """Wait for queued device work (stage timings). Never while a graph is being captured: a device-wide
        synchronization from any thread invalidates a capture in progress (hence the gate)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def weights_digest(self) -> str:
        """A digest of the weights this backend runs (configs included), independent of file layout: saved
        inversions record it so that a trajectory is only edited by the model that computed it."""
        raise NotImplementedError(f"the {self.name} backend cannot identify its weights")

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "map_layers": list(self.map_layers) if self.map_layers is not None else list(range(1, 17)),
            "map_formats": list(self.map_formats),
            "max_batch": self.max_batch,
        }
