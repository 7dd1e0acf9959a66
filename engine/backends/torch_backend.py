"""The reference backend: diffusers modules with the attention processors of :mod:`.attention`."""

from __future__ import annotations

import copy
import hashlib
import json
import threading

import torch

from ..adapters import AdapterBank
from ..calls import UNetCall, UNetResult
from ..contract import ModelSpec
from ..maps import AttentionMaps
from .attention import CallState, StopForward, install_processors, unet_forward
from .base import Backend
from .capture import CAPTURE_GATE


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device, cast only when needed (diffusers warns on every ``.to(dtype)``), freeze."""
    current = next(module.parameters())
    if current.dtype != dtype:
        module = module.to(dtype=dtype)
    if current.device != device:
        module = module.to(device)
    return module.eval().requires_grad_(False)


class TorchBackend(Backend):
    """diffusers/transformers modules on a torch device: the reference, and the embedded default.

    On CUDA the UNet runs in fp16 (or bf16) with SDPA (flash) attention for every layer, injected ones
    included, channels-last convolutions, and calls padded to a few batch sizes replayed from a bounded
    cache of CUDA graphs (``max_graphs``; see :mod:`.cuda_graphs`); ``compile_unet`` adds ``torch.compile``
    (experimental). ``cuda_graphs=True`` on the CPU runs the same graph bookkeeping around eager forwards.
    """

    name = "torch"
    supports_donors = True
    supports_cross_probs = True
    supports_gradients = True

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        spec: ModelSpec,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
        max_batch: int = 8,
        cuda_graphs: bool | None = None,
        channels_last: bool | None = None,
        compile_unet: bool = False,
        max_graphs: int | None = None,
        adapters: AdapterBank | None = None,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.dtype = dtype
        # The VAE *decoder* runs in bf16 on CUDA: fp32's range (SD's VAE overflows fp16) at a quarter of
        # fp32's time on an H200, 45 dB PSNR against fp32 decodes there. The encoder stays float32: the
        # inversion starts from its output and amplifies its rounding (a bf16 encoder cost a real edit of the
        # tiny model 22 dB of PSNR on that machine).
        self.vae_dtype = vae_dtype or (torch.bfloat16 if on_cuda else torch.float32)
        self.max_batch = max_batch
        self._unet = _place(unet, self.device, dtype)
        self._text = _place(text_encoder, self.device, dtype)
        self._vae = _place(vae, self.device, torch.float32)
        if self.vae_dtype != torch.float32:
            self._vae.decoder.to(self.vae_dtype)
            self._vae.post_quant_conv.to(self.vae_dtype)
        install_processors(self._unet, spec)
        # Per-request LoRA adapters: hooks on the touched modules, inert unless a call's set is active.
        self.adapters = adapters if adapters else None
        if self.adapters is not None:
            self.adapters.install({"unet": self._unet, "text_encoder": self._text}, self.device, dtype)
        self.channels_last = on_cuda if channels_last is None else channels_last
        if self.channels_last:
            self._unet.to(memory_format=torch.channels_last)
        self._unet32: torch.nn.Module | None = self._unet if dtype == torch.float32 else None
        self._unet32_lock = threading.Lock()
        self._forward_module: torch.nn.Module = self._unet
        if compile_unet:
            self._forward_module = torch.compile(self._unet, mode="max-autotune-no-cudagraphs", dynamic=False)
        self.graphs = None
        if on_cuda if cuda_graphs is None else cuda_graphs:
            from .cuda_graphs import DEFAULT_MAX_GRAPHS, UNetGraphs

            self.graphs = UNetGraphs(
                self.forward,
                spec,
                self.device,
                self.channels_last,
                max_batch=max_batch,
                max_graphs=max_graphs or DEFAULT_MAX_GRAPHS,
                adapter_scope=self.adapter_scope,
            )

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._text(input_ids.to(self.device))[0]

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self._vae.encode(images.to(self.device, torch.float32)).latent_dist
        return posterior.mean.float()

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae.decode(latents.to(self.device, self.vae_dtype)).sample.float()

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, state: CallState
    ) -> torch.Tensor | None:
        """One UNet forward under ``state``; ``None`` when it stopped after the last captured layer."""
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        try:
            return unet_forward(self._forward_module, sample, timestep, context, state)
        except StopForward:
            return None

    @torch.inference_mode()
    def unet(self, call: UNetCall) -> UNetResult:
        call = self.on_device(call)
        # Cross-attention probabilities run eagerly (their capture is not part of a graph's outputs). Adapter
        # calls replay graphs of their adapters' names, captured with the hooks on and the per-row scales as
        # inputs.
        if self.graphs is not None and not call.cross_probs:
            return self.graphs.run(call)
        state = CallState.for_call(call, self.device)
        with self.adapter_scope(call.active_adapters(self.device)):
            noise = self.forward(call.sample, call.timesteps, call.context, state)
        maps = AttentionMaps(call.map_format, dict(state.captured)) if call.capture else None
        cross = dict(state.cross_captured) if call.cross_probs else None
        return UNetResult(noise if call.need_noise_pred else None, maps, cross)

    @property
    def unet_module(self) -> torch.nn.Module:
        """The serving UNet module with the map processors installed, for inspection (hooks, parameters,
        layer order) without reaching into the backend's private state."""
        return self._unet

    @property
    def vae_module(self) -> torch.nn.Module:
        """The serving VAE (float32 encoder; decoder in :attr:`vae_dtype`), for measurements such as
        ``benchmarks/gpu.py``'s precision check."""
        return self._vae

    def differentiable_unet(self) -> torch.nn.Module:
        """The serving UNet itself when it is float32, else one frozen float32 copy made on first use and kept
        with this backend (fp16 gradients underflow in Adam's moments; serving stays in the backend's dtype,
        so the copy costs the UNet's float32 size once)."""
        if self._unet32 is None:
            # The copy is device work (allocations, casts): never beside a graph capture; the gate before
            # this backend's own lock, as the capture discipline requires.
            with CAPTURE_GATE.shared(), self._unet32_lock:
                if self._unet32 is None:
                    self._unet32 = copy.deepcopy(self._unet).to(torch.float32).eval().requires_grad_(False)
        return self._unet32

    def weights_digest(self) -> str:
        """sha256 over the three modules' configs and weights as float32 (seconds for SD 1.5; callers cache
        it): the same checkpoint gives the same digest in any process."""
        digest = hashlib.sha256()
        for module in (self._unet, self._vae, self._text):
            config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
            config = {
                k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"
            }
            digest.update(json.dumps(config, sort_keys=True, default=str).encode())
            for key, tensor in sorted(module.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info.update(
            vae_dtype=str(self.vae_dtype).replace("torch.", ""),
            cuda_graphs=self.graphs is not None,
            channels_last=self.channels_last,
            adapters=self.adapters.describe() if self.adapters is not None else [],
        )
        return info
