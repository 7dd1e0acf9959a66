"""The engine's flags, next to its config: the model flags every engine command takes, how they map to an
:class:`~fpedit.engine.config.EngineConfig`, and loading that engine with one log line.

Also the small generic piece the subsystems build their own flags with (as vLLM's ``EngineArgs`` does): a
config dataclass's field carries its flag in ``metadata`` (:func:`flag`), and :func:`add_config_arguments`
/ :func:`config_values_from_args` turn the one definition into argparse arguments and back. The field's
default is the flag's default, so the two cannot disagree.

Why here and not in ``fpedit/args.py``: the server and Ray build engines and parse ``fpedit serve`` flags
(a Ray Serve config file's ``args``) without the command line. Importing this module costs no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import BACKENDS, DTYPES, EngineConfig, resolve_backend

log = logging.getLogger("fpedit.cli")

# --- one definition per config field: its flag ---------------------------------------------------------------

#: The ``dataclasses.field(metadata=...)`` key a field's :class:`Flag` is kept under.
FLAG_KEY = "fpedit.flag"


@dataclass(frozen=True)
class Flag:
    """How one config field is given on the command line. ``help`` may say ``{default}`` (the field's
    default in the flag's unit, with a format spec such as ``{default:g}``)."""

    help: str
    type: Callable[[str], Any] | None = None
    #: The flag's name without ``--``; default: the field's name with dashes.
    name: str | None = None
    #: field value = flag value x ``unit`` (a byte field given in MiB or GiB).
    unit: int = 1
    choices: Sequence[str] | None = None
    #: The flag defaults to None and the caller settles the field (e.g. ``--workers`` by ``--batching``).
    unset: bool = False
    #: An argparse action instead of a value (``"store_true"`` for a boolean field that defaults to False).
    action: str | None = None


def flag(help: str, **options: Any) -> dict[str, Flag]:
    """``metadata=flag(...)`` for a config field: its flag, defined once beside the field."""
    return {FLAG_KEY: Flag(help, **options)}


def config_flags(config_class: type) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of ``config_class`` that have a flag, in field order."""
    return [(f, f.metadata[FLAG_KEY]) for f in dataclasses.fields(config_class) if FLAG_KEY in f.metadata]


def flag_name(config_class: type, field_name: str) -> str:
    """The flag (without ``--``) that sets ``field_name``: what a config's error messages name."""
    for found, spec in config_flags(config_class):
        if found.name == field_name:
            return spec.name or found.name.replace("_", "-")
    return field_name.replace("_", "-")


def _flag_default(found: dataclasses.Field, spec: Flag) -> Any:
    """The field's default in the flag's unit (what ``{default}`` in the help says)."""
    if found.default is dataclasses.MISSING:
        return None
    if spec.unit == 1 or found.default is None:
        return found.default
    if spec.type is int:
        return found.default // spec.unit
    return found.default / spec.unit


def add_config_arguments(parser: Any, config_class: type) -> None:
    """One argparse argument per flagged field of ``config_class`` (a parser or an argument group)."""
    for found, spec in config_flags(config_class):
        default = _flag_default(found, spec)
        name = spec.name or found.name.replace("_", "-")
        options: dict[str, Any] = {
            "default": None if spec.unset else default,
            "help": spec.help.format(default=default),
        }
        if spec.action is not None:
            options["action"] = spec.action
        if spec.type is not None:
            options["type"] = spec.type
        if spec.choices is not None:
            options["choices"] = spec.choices
        parser.add_argument(f"--{name}", **options)


def config_values_from_args(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The flagged fields' values from parsed ``args``, in the field's unit; an ``unset`` flag left out is
    left out here too (the caller settles it)."""
    values: dict[str, Any] = {}
    for found, spec in config_flags(config_class):
        value = getattr(args, (spec.name or found.name).replace("-", "_"))
        if value is None and spec.unset:
            continue
        values[found.name] = value if spec.unit == 1 or value is None else int(value * spec.unit)
    return values


# --- the model flags -> EngineConfig --------------------------------------------------------------------------

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def parse_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``: refused here rather than deep inside torch."""
    if not DEVICE_PATTERN.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text.strip()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """What engine to load: mapped to an :class:`EngineConfig` by :func:`engine_config_from_args`."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=EngineConfig.model,
        help="'tiny' (default, the embedded toy model), a diffusers SD 1.x folder, or a folder written by "
        "`fpedit export` / `fpedit build-engines` (then the backend is read from its manifest)",
    )
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        help="runtime (default: torch, or what the --model folder's manifest was made for)",
    )
    group.add_argument(
        "--device", default=EngineConfig.device, type=parse_device, help="cpu, cuda or cuda:N (default: cpu)"
    )
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        help="UNet/text precision (default: float16 on CUDA, float32 on CPU; an export's own precision)",
    )
    group.add_argument(
        "--vae-dtype",
        choices=DTYPES,
        help="VAE decoder precision, torch backend (default: bfloat16 on CUDA, float32 on CPU)",
    )
    group.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="torch and tensorrt on CUDA: no CUDA-graph replay (default: replay where supported)",
    )
    group.add_argument(
        "--compile", action="store_true", help="torch: torch.compile the UNet (experimental; default: off)"
    )
    group.add_argument(
        "--provider",
        action="append",
        dest="providers",
        help="ONNX Runtime provider (repeatable; default: CUDA then CPU on --device cuda, CPU on cpu)",
    )
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickled (.bin/.ckpt) weights; only for trusted files (default: safetensors only)",
    )
    add_checkpoint_arguments(group)
    add_adapter_arguments(parser)


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """Per-request LoRA adapters: the folder an engine offers them from, and the per-request cap."""
    from .adapters import DEFAULT_MAX_ADAPTERS

    group = parser.add_argument_group("adapters (LoRAs picked per request; torch backend)")
    group.add_argument(
        "--lora-dir",
        type=Path,
        metavar="DIR",
        help="offer every *.safetensors LoRA in DIR (diffusers/PEFT or kohya keys) by its file stem; requests "
        "pick them with --adapter / options.adapters (default: none)",
    )
    group.add_argument(
        "--max-adapters",
        type=int,
        default=DEFAULT_MAX_ADAPTERS,
        help=f"most adapters one request may combine (default {DEFAULT_MAX_ADAPTERS})",
    )


def add_checkpoint_arguments(group: Any) -> None:
    """Flags describing a single-file checkpoint and LoRAs fused at load (docs/models.md)."""
    group.add_argument(
        "--model-config",
        type=Path,
        help="a diffusers folder whose configs and tokenizer describe a non-standard single-file checkpoint",
    )
    group.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="what the UNet predicts, when the checkpoint does not say (v-prediction fine-tunes)",
    )
    group.add_argument(
        "--lora",
        action="append",
        dest="loras",
        metavar="FILE[:SCALE]",
        help="fuse a LoRA (.safetensors, diffusers/PEFT or kohya keys) into the weights at load; repeatable",
    )


def checkpoint_options(args: argparse.Namespace) -> dict[str, Any]:
    """The loader keywords the checkpoint flags (and --allow-pickle) name, one mapping for every command."""
    return {
        "model_config": args.model_config,
        "prediction_type": args.prediction_type,
        "loras": tuple(args.loras or ()),
        "allow_pickle": args.allow_pickle,
    }


def engine_config_from_args(args: argparse.Namespace, **engine: Any) -> EngineConfig:
    """The model flags as an :class:`EngineConfig` (the backend settled from the folder's manifest, a
    mismatch refused now); ``engine`` sets further fields (``batching``, ``show_progress``...)."""
    backend = resolve_backend(args.model, args.backend)
    args.backend = backend  # what the command reports and checks (e.g. `maps` needs torch)
    backend_options: dict[str, Any] = {}
    if backend in ("torch", "tensorrt") and args.no_cuda_graphs:
        backend_options["cuda_graphs"] = False
    if backend == "torch":
        backend_options["vae_dtype"] = args.vae_dtype
        if args.compile:
            backend_options["compile_unet"] = True
    return EngineConfig(
        model=args.model,
        backend=backend,
        device=args.device,
        dtype=args.dtype,
        **checkpoint_options(args),
        providers=tuple(args.providers) if args.providers else None,
        backend_options=backend_options,
        lora_dir=str(args.lora_dir) if getattr(args, "lora_dir", None) else None,
        max_adapters=getattr(args, "max_adapters", EngineConfig.max_adapters),
        adapter_batching=getattr(args, "adapter_batching", EngineConfig.adapter_batching),
        **engine,
    )


# --- loading --------------------------------------------------------------------------------------------------


def engine_from_config(config: EngineConfig) -> Any:
    """Load the engine ``config`` describes, with one log line for the load and its time (every command,
    ``fpedit serve`` and each Ray replica)."""
    from .pipeline import EditEngine

    quiet_libraries()
    log.info("loading model %s (backend %s, device %s)", config.model, config.backend, config.device)
    started = time.perf_counter()
    engine = EditEngine.from_config(config)
    described = engine.info()
    log.info(
        "model loaded in %.2f s: backend %s on %s, %s",
        time.perf_counter() - started,
        described.get("backend"),
        described.get("device"),
        described.get("dtype"),
    )
    return engine


def quiet_libraries() -> None:
    """diffusers/transformers advice (accelerate, fp16 on CPU, token-length notes) is noise to a CLI user;
    fpedit reports what matters itself (e.g. one warning for a truncated prompt). ``-v`` keeps it."""
    # The engine logs a truncated prompt and also raises a Python warning for library callers; on the command
    # line the log line alone says it once.
    warnings.filterwarnings("ignore", message=r"prompt has \d+ tokens; truncated", category=UserWarning)
    if logging.getLogger().isEnabledFor(logging.INFO):
        return
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # diffusers' deprecate() notes on a checkpoint's scheduler config (steps_offset, clip_sample) are warnings,
    # not log records: several lines asking the user to open a pull request on the Hub.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers)(\.|$)")
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()  # "Loading weights" of every text encoder load
    except ImportError:  # pragma: no cover - both are dependencies
        pass
