"""Runtimes behind the :class:`~fpedit.engine.backends.base.Backend` interface."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import BACKENDS, DTYPES
from ..errors import InvalidInputError
from .base import Backend


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidInputError("dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has; refused with the reason (not deep inside torch)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError("device", f"must be cpu, cuda or cuda:N, got {device!r}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise InvalidInputError("device", f"must be cpu, cuda or cuda:N, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError("device", "CUDA was requested but torch sees no GPU")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise InvalidInputError("device", f"{device} does not exist: torch sees {count} GPU(s)")
    return resolved


def create_backend(
    model: str | Path,
    backend: str,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    providers: Sequence[str] | None = None,
    backend_options: dict[str, Any] | None = None,
    model_config: str | Path | None = None,
    prediction_type: str | None = None,
    loras: Sequence[Any] = (),
    lora_dir: str | Path | None = None,
) -> tuple[Backend, Any, str]:
    """Build ``backend`` for ``model``; returns (backend, tokenizer, model source description).

    ``dtype`` (torch backend) defaults to float16 on CUDA and float32 elsewhere; ``backend_options`` go to
    the backend's constructor (torch: ``vae_dtype``, ``cuda_graphs``, ``channels_last``, ``compile_unet``,
    ``max_batch``, ``max_graphs``; tensorrt: ``cuda_graphs``, ``max_graphs``). ``model_config`` and ``prediction_type``
    (torch) describe a single-file checkpoint (see :mod:`fpedit.engine.single_file`).
    """
    options = dict(backend_options or {})
    torch_device = resolve_device(device)
    if lora_dir is not None and backend == "torch":
        from ..adapters import adapter_files

        adapter_files(lora_dir)  # a missing folder fails before the model loads
    if backend == "torch":
        from ..loading import load_components
        from .torch_backend import TorchBackend

        on_cuda = torch_device.type == "cuda"
        torch_dtype = parse_dtype(dtype or ("float16" if on_cuda else "float32"))
        if "vae_dtype" in options and options["vae_dtype"] is not None:
            options["vae_dtype"] = parse_dtype(options["vae_dtype"])
        parts = load_components(
            model,
            allow_pickle=allow_pickle,
            model_config=model_config,
            prediction_type=prediction_type,
            loras=loras,
        )
        bank = None
        if lora_dir is not None:  # after the fused LoRAs: adapters apply on top of them
            from ..adapters import AdapterBank, load_adapters

            bank = AdapterBank(load_adapters(lora_dir, parts.unet, parts.text_encoder, parts.tokenizer))
        created = TorchBackend(
            unet=parts.unet,
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            spec=parts.spec,
            device=device,
            dtype=torch_dtype,
            adapters=bank,
            **options,
        )
        created.loras = list(parts.loras)  # what `fpedit info` / GetInfo report
        return created, parts.tokenizer, parts.source
    if lora_dir is not None:
        raise InvalidInputError(
            "lora_dir",
            f"per-request adapters need the torch backend; the {backend} backend runs exported graphs with "
            "fixed weights (fuse a LoRA into an export with `fpedit export --lora`)",
        )
    if model_config is not None or prediction_type is not None or loras:
        field = (
            "model_config" if model_config is not None else "prediction_type" if prediction_type else "loras"
        )
        raise InvalidInputError(
            field,
            f"applies when loading a checkpoint (torch backend, or `fpedit export`); an {backend} folder "
            "has it baked in",
        )
    if backend == "onnxruntime":
        from .onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend.load(model, device=device, providers=providers)
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend.load(
            model,
            device=device,
            cuda_graphs=options.get("cuda_graphs", True),
            max_graphs=options.get("max_graphs"),
        )
    raise InvalidInputError("backend", f"must be one of {list(BACKENDS)}, got {backend!r}")
