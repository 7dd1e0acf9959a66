"""LoRA adapters a server offers and each request picks (issue 29), applied inside the calls that use them.

``--lora-dir DIR`` loads every ``*.safetensors`` there once, at start, through the same diffusers reader as
``--lora`` (PEFT/diffusers and kohya layouts, alpha honoured): each file is loaded as a PEFT adapter, its
per-module down/up layers and ``alpha / r`` scaling are copied out, and the PEFT layers are unloaded again,
so the model's modules stay plain and shared by every request.

Each touched module then carries one forward hook that adds ``scale * alpha / r * up(down(x))`` for the
adapters of *the call being run*, read from a thread-local: the executor's device loop (or a request's own
thread without batching) sets it around one UNet call from that call's adapters, and the text encoder's
thread sets it around one encode. Nothing request-global is switched, so two requests with different sets
cannot see each other's weights. A scale is a number (every row of the call has the set) or a vector with one
scale per row (0 where a row's set lacks the adapter): a call may then carry rows of several sets
(``adapter_batching="mix"``). Every hooked module takes batch-first inputs (attention projections [B, N, C],
convolutions [B, C, H, W], time-embedding linears [B, C]), so a row's scale broadcasts over its output. The
sum ``W x + s * B (A x)`` equals the fused ``(W + s * B A) x`` up to float rounding.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidInputError, ModelLoadError

if TYPE_CHECKING:  # the options module imports this one, and clients import it without torch
    import torch

log = logging.getLogger(__name__)

#: A request's adapters: (name, scale) pairs sorted by name, so equal sets compare (and batch) equal.
AdapterSet = tuple[tuple[str, float], ...]

#: Largest |scale| a request may give an adapter (past it an image is noise, not a style).
MAX_ADAPTER_SCALE = 4.0
#: Adapters one request may combine unless ``--max-adapters`` says otherwise.
DEFAULT_MAX_ADAPTERS = 4
#: The components a file may touch, as diffusers names them.
COMPONENTS = ("unet", "text_encoder")
#: How the batching executor treats calls of different sets: ``group`` runs only calls of one set together,
#: ``mix`` lets them share a backend call with a scale per row (same-set calls are still preferred), ``auto``
#: picks by backend (:func:`resolve_adapter_batching`).
ADAPTER_BATCHING = ("auto", "mix", "group")
DEFAULT_ADAPTER_BATCHING = "auto"


def resolve_adapter_batching(choice: str, replays_graphs: bool) -> str:
    """``auto`` as ``mix`` where calls run eagerly — measured on the CPU benchmark (benchmarks/README.md): no
    slower where grouping fills calls, half the backend calls and faster where sets outnumber the requests a
    call holds — and as ``group`` where a backend replays CUDA graphs: a graph is keyed by its call's adapter
    names, so mixed calls would bring a key (a capture) per combination of names that meet in a call, while
    grouped calls keep one per set. Mixing under graphs is not measured on a GPU."""
    if choice != "auto":
        return choice
    return "group" if replays_graphs else "mix"


#: What the hooks take: (name, scale) pairs, a scale being a number or a (rows,) float32 tensor.
ActiveAdapters = Sequence[tuple[str, Any]]


def parse_adapter(value: Any) -> tuple[str, float]:
    """``NAME`` or ``NAME:SCALE`` (CLI), a ``{"name", "scale"}`` mapping, or a (name, scale) pair."""
    if isinstance(value, Mapping):
        name, scale = value.get("name"), value.get("scale", 1.0)
    elif isinstance(value, tuple | list):
        if len(value) != 2:
            raise InvalidInputError("adapters", f"an adapter is (name, scale), got {value!r}")
        name, scale = value
    elif isinstance(value, str):
        head, sep, tail = value.rpartition(":")
        name, scale = (head, tail) if sep else (value, 1.0)
    else:
        raise InvalidInputError("adapters", f"an adapter is NAME[:SCALE] or (name, scale), got {value!r}")
    if not isinstance(name, str) or not name:
        raise InvalidInputError("adapters", f"an adapter needs a name, got {name!r}")
    try:
        if isinstance(scale, bool):
            raise TypeError("a bool is not a scale")
        scale = float(scale)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("adapters", f"adapter {name!r}: scale {scale!r} is not a number") from exc
    if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
        raise InvalidInputError(
            "adapters",
            f"adapter {name!r}: scale {scale} is outside [-{MAX_ADAPTER_SCALE:g}, {MAX_ADAPTER_SCALE:g}]",
        )
    return name, scale


def normalize_adapters(values: Any) -> AdapterSet:
    """A request's adapters as an :data:`AdapterSet`; a name given twice is refused (which scale?)."""
    if values is None:
        return ()
    if isinstance(values, str | Mapping):
        values = [values]
    pairs = [parse_adapter(v) for v in values]
    names = [name for name, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise InvalidInputError("adapters", f"adapter {name!r} is given more than once")
    return tuple(sorted(pairs))


def describe_set(adapters: AdapterSet) -> str:
    """``a:0.5+b:1`` (or ``none``) for messages naming a set."""
    return "+".join(f"{name}:{scale:g}" for name, scale in adapters) or "none"


@dataclass
class LoraLayer:
    """One module's low-rank pair: ``down`` (x -> r), ``up`` (r -> out) and ``alpha / r``."""

    down: torch.nn.Module
    up: torch.nn.Module
    scaling: float


@dataclass
class Adapter:
    """One file of the adapter folder: its layers per component, keyed by module name."""

    name: str
    path: Path
    layers: dict[str, dict[str, LoraLayer]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        ranks = [_rank(layer.down) for modules in self.layers.values() for layer in modules.values()]
        return max(ranks, default=0)

    def describe(self) -> dict[str, Any]:
        touched = sorted(f"{c}.{m}" for c, modules in self.layers.items() for m in modules)
        return {"name": self.name, "file": str(self.path), "rank": self.rank, "layers": touched}


def _rank(module: torch.nn.Module) -> int:
    return int(getattr(module, "out_features", None) or getattr(module, "out_channels", 0))


def adapter_files(directory: str | Path) -> list[Path]:
    """The ``*.safetensors`` files of ``directory`` (sorted); a missing folder is refused."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise InvalidInputError("lora_dir", f"no such folder: {folder}")
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def load_adapters(directory: str | Path, unet: Any, text_encoder: Any, tokenizer: Any) -> dict[str, Adapter]:
    """Read every file of ``directory`` as an adapter named by its stem, leaving the modules plain."""
    files = adapter_files(directory)
    if not files:
        return {}
    try:
        from peft.tuners.lora import LoraLayer as PeftLoraLayer
    except ModuleNotFoundError as exc:
        raise ModelLoadError("--lora-dir needs peft: pip install 'fpedit[engine]'") from exc
    from .lora import lora_pipeline

    pipe = lora_pipeline(unet, text_encoder, tokenizer)
    adapters: dict[str, Adapter] = {}
    for path in files:
        adapter = Adapter(path.stem, path)
        try:
            pipe.load_lora_weights(str(path), adapter_name=path.stem)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot load adapter {path}: {exc}") from exc
        try:
            for component, model in (("unet", unet), ("text_encoder", text_encoder)):
                for module_name, module in model.named_modules():
                    if not isinstance(module, PeftLoraLayer) or path.stem not in module.lora_A:
                        continue
                    if getattr(module, "use_dora", {}).get(path.stem):
                        raise ModelLoadError(f"adapter {path}: DoRA layers are not supported")
                    adapter.layers.setdefault(component, {})[module_name] = LoraLayer(
                        copy.deepcopy(module.lora_A[path.stem]).eval().requires_grad_(False),
                        copy.deepcopy(module.lora_B[path.stem]).eval().requires_grad_(False),
                        float(module.scaling[path.stem]),
                    )
        finally:
            pipe.unload_lora_weights()  # plain modules again: the next file, and serving, see base weights
        if not adapter.layers:
            raise ModelLoadError(f"adapter {path} matches no UNet or text encoder module of this model")
        adapters[adapter.name] = adapter
        log.info(
            "adapter %s: rank %d, %d layers", adapter.name, adapter.rank, len(adapter.describe()["layers"])
        )
    return adapters


class AdapterBank:
    """The adapters of one backend, hooked into its modules; :meth:`active` selects a call's set."""

    def __init__(self, adapters: Mapping[str, Adapter] | None = None) -> None:
        self.adapters: dict[str, Adapter] = dict(adapters or {})
        self._local = threading.local()
        self._handles: list[Any] = []

    def __bool__(self) -> bool:
        return bool(self.adapters)

    def describe(self) -> list[dict[str, Any]]:
        return [self.adapters[name].describe() for name in sorted(self.adapters)]

    def check(self, adapters: AdapterSet, max_adapters: int) -> None:
        """Refuse unknown names and sets larger than ``max_adapters``, naming what is wrong."""
        if len(adapters) > max_adapters:
            raise InvalidInputError(
                "adapters", f"{len(adapters)} adapters requested; this server allows at most {max_adapters}"
            )
        for name, _ in adapters:
            if name not in self.adapters:
                offered = ", ".join(sorted(self.adapters)) or "none"
                raise InvalidInputError(
                    "adapters", f"unknown adapter {name!r} (this server offers: {offered})"
                )

    def install(
        self, modules: Mapping[str, torch.nn.Module], device: torch.device, dtype: torch.dtype
    ) -> None:
        """Move every layer to ``device``/``dtype`` and hook each touched module of ``modules`` (by
        component) once."""
        tables: dict[tuple[str, str], dict[str, LoraLayer]] = {}
        for adapter in self.adapters.values():
            for component, layers in adapter.layers.items():
                for module_name, layer in layers.items():
                    layer.down.to(device, dtype)
                    layer.up.to(device, dtype)
                    tables.setdefault((component, module_name), {})[adapter.name] = layer
        for (component, module_name), table in tables.items():
            module = modules[component].get_submodule(module_name)
            self._handles.append(module.register_forward_hook(self._hook(table)))

    def _hook(self, table: dict[str, LoraLayer]) -> Any:
        def add_lora(
            module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            active: ActiveAdapters = getattr(self._local, "adapters", ())
            if not active:
                return None
            x = args[0]
            for name, scale in active:
                layer = table.get(name)
                if layer is not None:
                    delta = layer.up(layer.down(x))
                    output = output + _scaled(delta, scale, layer.scaling)
            return output

        return add_lora

    @contextmanager
    def active(self, adapters: ActiveAdapters) -> Iterator[None]:
        """Apply ``adapters`` to forwards run by this thread inside the block (nested blocks restore); a
        scale may be a (rows,) tensor, read when the hooks run (in a CUDA graph: when it replays)."""
        previous = getattr(self._local, "adapters", ())
        self._local.adapters = tuple(adapters)
        try:
            yield
        finally:
            self._local.adapters = previous


def _scaled(delta: torch.Tensor, scale: Any, scaling: float) -> torch.Tensor:
    """``delta * scale * alpha / r`` in ``delta``'s dtype, rounded once: a number multiplies fp16 rows in
    float32 (torch's rule for a Python scalar), and so does a per-row float32 vector here (broadcast as
    (rows, 1, ...)), so that a row gives the same in a call of one set, in a mixed call and in a CUDA graph."""
    if isinstance(scale, int | float):
        return delta * (scale * scaling)
    if scale.shape[0] != delta.shape[0]:
        raise ValueError(f"{scale.shape[0]} per-row adapter scales for a batch of {delta.shape[0]} rows")
    factor = (scale * scaling).view(-1, *(1,) * (delta.dim() - 1))
    return (delta * factor).to(delta.dtype)


def check_request_adapters(
    adapters: Sequence[tuple[str, float]], bank: AdapterBank | None, backend: str
) -> None:
    """Refuse adapters on a backend that has none loaded (the message says why)."""
    if adapters and not bank:
        raise InvalidInputError(
            "adapters",
            f"this server offers no adapters ({backend} backend"
            + (
                ", started without --lora-dir)"
                if backend == "torch"
                else "; adapters need the torch backend)"
            ),
        )
