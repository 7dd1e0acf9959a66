"""The command line's one argument module: every command's shared flags, their parsers, and how they map to
the typed configs (:class:`~fpedit.engine.config.EngineConfig`, :class:`~fpedit.engine.options.EditOptions`,
:class:`~fpedit.engine.options.InversionOptions`).

``fpedit/cli.py`` and each subsystem's ``cli.py`` build their commands from these; none imports another
command module, so there is no import cycle. Importing this module costs no torch (``fpedit --help`` and
``fpedit client`` stay fast); :func:`engine_from_config` loads the engine when a command needs one.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

from fpedit.engine.adapters import DEFAULT_MAX_ADAPTERS
from fpedit.engine.config import BACKENDS, DTYPES, EngineConfig, resolve_backend
from fpedit.engine.contract import LAYER_PRESETS, MAP_FORMATS
from fpedit.engine.errors import InvalidInputError
from fpedit.engine.options import (
    DEFAULT_NULL_TEXT_EPSILON,
    DEFAULT_NULL_TEXT_STEPS,
    IMAGE_FILE_FORMATS,
    INVERSION_METHODS,
    MAX_NULL_TEXT_STEPS,
    EditOptions,
    InversionOptions,
)

EXIT_USER_ERROR = 2
log = logging.getLogger("fpedit.cli")

#: API field -> the flag a user types, per command; messages name the flag (``--window (replace_window): ...``).
COMMON_FLAGS = {
    "steps": "--steps",
    "guidance_scale": "--guidance",
    "replace_window": "--window",
    "layers": "--layers",
    "map_format": "--map-format",
    "device": "--device",
    "dtype": "--dtype",
    "backend": "--backend",
    "model": "--model",
    "model_config": "--model-config",
    "prediction_type": "--prediction-type",
    "loras": "--lora",
    "lora_dir": "--lora-dir",
    "max_adapters": "--max-adapters",
    "adapters": "--adapter",
    "seed": "--seed",
    "height": "--height",
    "width": "--width",
    "out": "--out",
    "graphs": "--graphs",
    "output": "-o/--output",
    "reconstruction": "--reconstruction",
    "source_output": "--source-output",
    "batch": "--batch",
    "image_size": "--image-size",
}
EDIT_FLAGS = {
    "target_prompt": "-p/--prompt",
    "image": "IMAGE",
    "source_prompt": "--source-prompt",
    "method": "--inversion",
    "null_text_steps": "--null-text-steps",
    "null_text_epsilon": "--null-text-epsilon",
    "output_size": "--size",
    "inversion_file": "--inversion-file",
    "save_inversion": "--save-inversion",
}
GENERATE_FLAGS = {"source_prompt": "-s/--source-prompt", "target_prompt": "-t/--target-prompt"}

#: A module a command needs -> the extra that installs it (the bare package and `client` have no torch).
MISSING_EXTRAS = {
    "torch": "engine",
    "diffusers": "engine",
    "transformers": "engine",
    "safetensors": "engine",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "tensorrt": "tensorrt",
    "polygraphy": "tensorrt",
    "grpc": "client",
    "grpc_health": "client",
    "grpc_reflection": "server",
    "google": "client",
    "tqdm": "engine",
    "matplotlib": "bench",
    "prometheus_client": "server",
    "ray": "ray",
}
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
#: Image formats results may be written as, by file extension (what PIL writes and the service returns).
OUTPUT_FORMATS = IMAGE_FILE_FORMATS
#: The variable a bearer token is read from when --token is left out (server and client).
TOKEN_ENV = "FPEDIT_TOKEN"
#: What the generate commands use without --seed: runs repeat, locally and on a server.
DEFAULT_SEED = 0
#: The paper's edit options: the local commands' flag defaults (a client's unset flag takes the server's).
PAPER_OPTIONS = EditOptions()


class FpeditParser(argparse.ArgumentParser):
    """Usage mistakes end in one ``fpedit: error: ...`` line (status 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"fpedit: error: {message} (see `{self.prog} --help`)\n")


def bearer_token(given: str | None) -> str | None:
    """``--token``, else ``$FPEDIT_TOKEN``, else none (``fpedit serve`` and ``fpedit client``)."""
    import os

    return given or os.environ.get(TOKEN_ENV) or None


def describe_error(exc: InvalidInputError, args: argparse.Namespace) -> str:
    """``--window (replace_window): ...``: the flag the user typed, then the API field it maps to."""
    flags = {**COMMON_FLAGS, **getattr(args, "flags", {})}
    flag = flags.get(exc.field)
    if flag is None or flag == exc.field:
        return str(exc)
    if flag.lstrip("-") == exc.field.replace("_", "-") or flag.isupper():
        return f"{flag}: {exc.reason}"
    return f"{flag} ({exc.field}): {exc.reason}"


# --- value parsers (argparse ``type=``) ------------------------------------------------------------------------


def parse_layers(text: str) -> str | tuple[int, ...]:
    """``"4-14"``, ``"3,5,7-9"``, ``"paper"`` or ``"resolution"``."""
    text = text.strip()
    if text in LAYER_PRESETS:
        return text
    layers: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError(part)
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"layers must look like '4-14', '3,5,7-9', 'paper' or 'resolution', got {text!r}"
        ) from exc
    if not layers:
        raise argparse.ArgumentTypeError("layers must name at least one layer")
    return tuple(layers)


def parse_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``: refused here rather than deep inside torch."""
    if not DEVICE_PATTERN.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text.strip()


def parse_seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2**63-1, got {seed}")
    return seed


def parse_side(text: str) -> int:
    try:
        side = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer number of pixels, got {text!r}") from None
    if side < 64 or side % 64:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 64, got {side}")
    return side


def parse_output_size(text: str) -> str | tuple[int, int]:
    """``input``, ``working`` or ``WxH`` (e.g. ``640x480``)."""
    text = text.strip().lower()
    if text in ("input", "working"):
        return text
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(
            f"must be input, working or WIDTHxHEIGHT (e.g. 640x480), got {text!r}"
        )
    return int(match[1]), int(match[2])


# --- path checks (before any work) ----------------------------------------------------------------------------


def check_output_path(path: Path | None, flag: str) -> None:
    """Refuse, before any work, an output that could not be written as an image."""
    if path is None:
        return
    if path.is_dir():
        raise InvalidInputError(flag, f"{path} is a directory; give a file name such as {path / 'out.png'}")
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise InvalidInputError(
            flag, f"{path}: the extension must be one of {', '.join(OUTPUT_FORMATS)} (it picks the format)"
        )
    if path.parent.exists() and not path.parent.is_dir():
        raise InvalidInputError(flag, f"{path.parent} is not a directory")


def check_distinct_outputs(*outputs: tuple[Path | None, str]) -> None:
    """Refuse two outputs that name one file: the later write would silently replace the earlier result."""
    seen: dict[Path, str] = {}
    for path, flag in outputs:
        if path is None:
            continue
        key = path.expanduser().resolve()
        if key in seen:
            raise InvalidInputError(
                flag, f"{path} is also the {seen[key]} file; give each output its own file name"
            )
        seen[key] = flag


def check_input_image(path: Path, flag: str = "IMAGE") -> None:
    if path.is_dir():
        raise InvalidInputError(flag, f"{path} is a directory, not an image file")
    if not path.is_file():
        raise InvalidInputError(flag, f"no such file: {path}")


def source_output_path(output: Path, source_output: Path | None) -> Path:
    """Where ``generate`` writes the source image: ``--source-output``, else ``OUTPUT.source.EXT``."""
    return source_output or output.with_name(f"{output.stem}.source{output.suffix}")


# --- flag groups ----------------------------------------------------------------------------------------------


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
    """Per-request LoRA adapters (issue 29): the folder an engine offers them from, and the per-request cap."""

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
    """Flags describing a single-file checkpoint and LoRAs fused at load (README 'Your own model')."""
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


#: Where argparse keeps each inversion option, by its request name (EDIT_FLAGS has the flags).
INVERSION_DESTS = {
    "method": "inversion",
    "source_prompt": "source_prompt",
    "null_text_steps": "null_text_steps",
    "null_text_epsilon": "null_text_epsilon",
}


def inversion_fields_given(args: argparse.Namespace) -> list[str]:
    """The inversion options given on the command line (request names), for the rule that an inversion
    already made takes none (:func:`~fpedit.engine.options.refuse_inversion_options`)."""
    return [field for field, dest in INVERSION_DESTS.items() if getattr(args, dest, None) is not None]


def add_edit_arguments(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The edit options. ``defaults=False`` (a client): unset flags stay None and take the server's."""
    paper = PAPER_OPTIONS
    if defaults:
        group = parser.add_argument_group("edit options (defaults follow the paper)")
        default: dict[str, Any] = {
            "steps": paper.steps,
            "guidance": paper.guidance_scale,
            "window": paper.replace_window,
            "layers": "paper",
            "map_format": paper.map_format,
        }
        said = "default {}"
    else:
        group = parser.add_argument_group("edit options (unset: the server's defaults)")
        default = dict.fromkeys(("steps", "guidance", "window", "layers", "map_format"))
        said = "default: the server's, {}"
    window = " ".join(f"{x:g}" if x else "0.0" for x in paper.replace_window)
    group.add_argument(
        "--steps", type=int, default=default["steps"], help=f"DDIM steps ({said.format(paper.steps)})"
    )
    group.add_argument(
        "--guidance",
        type=float,
        default=default["guidance"],
        help=f"classifier-free guidance scale ({said.format(paper.guidance_scale)})",
    )
    group.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=default["window"],
        metavar=("START", "END"),
        help=f"replace step i when int(steps*START) <= i < int(steps*END) ({said.format(window)})",
    )
    group.add_argument(
        "--layers",
        type=parse_layers,
        default=default["layers"],
        help="self-attention layers 1..16 in execution order: '4-14' (paper, default), 'resolution' (<=32x32 "
        "tokens, the authors' code), or a list such as '3,5,7-9'",
    )
    group.add_argument(
        "--adapter",
        action="append",
        dest="adapters",
        metavar="NAME[:SCALE]",
        help="apply the engine's --lora-dir adapter NAME at SCALE (default 1, in [-4, 4]); repeatable",
    )
    group.add_argument(
        "--map-format",
        default=default["map_format"],
        choices=MAP_FORMATS,
        help="how maps travel: qk (projected Q and K, default) or probs (explicit softmax probabilities)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """A local run's output: the progress bar and ``--stats``."""
    group = parser.add_argument_group("output")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    group.add_argument(
        "--stats",
        action="store_true",
        help="print timing statistics as JSON on stdout (messages go to stderr; default: off)",
    )


def add_inversion_arguments(
    parser: argparse.ArgumentParser, *, epsilon: bool = True
) -> argparse._ArgumentGroup:
    """How a real image is inverted (mapped by :func:`inversion_options_from_args`); unset flags are None."""
    group = parser.add_argument_group("inversion (see the README's 'Inversion methods')")
    group.add_argument(
        "--inversion",
        choices=INVERSION_METHODS,
        help="method: ddim (default; no source prompt), null-text (optimised null embeddings; torch "
        "backend; several times slower) or negative-prompt (the source prompt as null embedding; free)",
    )
    group.add_argument(
        "--source-prompt",
        help="what the image shows; needed by null-text and negative-prompt, refused with ddim (default: none)",
    )
    group.add_argument(
        "--null-text-steps",
        type=int,
        help=f"null-text: Adam iterations per step, 1..{MAX_NULL_TEXT_STEPS} (default {DEFAULT_NULL_TEXT_STEPS})",
    )
    if epsilon:
        group.add_argument(
            "--null-text-epsilon",
            type=float,
            help=f"null-text: early-stop loss threshold (default {DEFAULT_NULL_TEXT_EPSILON:g})",
        )
    return group


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """``generate``'s prompts, seed, size and outputs (local and client commands alike)."""
    parser.add_argument(
        "--source-prompt", "-s", required=True, help="prompt the source image is generated from"
    )
    parser.add_argument("--target-prompt", "-t", required=True, help="prompt the edited image moves toward")
    parser.add_argument(
        "--seed",
        type=parse_seed,
        default=DEFAULT_SEED,
        help=f"seed of the shared initial noise z_T (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--height", type=parse_side, help="image height in px, a multiple of 64 (default: model's)"
    )
    parser.add_argument(
        "--width", type=parse_side, help="image width in px, a multiple of 64 (default: model's)"
    )
    parser.add_argument(
        "--output", "-o", type=Path, required=True, help="edited image file (.png, .jpg or .webp)"
    )
    parser.add_argument("--source-output", type=Path, help="source image file (default: OUTPUT.source.EXT)")


# --- flags -> configs -----------------------------------------------------------------------------------------


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
        max_adapters=getattr(args, "max_adapters", DEFAULT_MAX_ADAPTERS),
        **engine,
    )


def edit_options_from_args(args: argparse.Namespace) -> EditOptions:
    """The edit flags as :class:`EditOptions` (judged now, before any model loads)."""
    return EditOptions(
        steps=args.steps,
        guidance_scale=args.guidance,
        replace_window=tuple(args.window),
        layers=args.layers,
        map_format=args.map_format,
        adapters=tuple(getattr(args, "adapters", None) or ()),
    )


def inversion_options_from_args(args: argparse.Namespace) -> InversionOptions:
    """The inversion flags as :class:`InversionOptions`, judged (by its rules) before any model loads or call
    is made."""
    return InversionOptions(
        method=args.inversion or "ddim",
        source_prompt=args.source_prompt or "",
        null_text_steps=args.null_text_steps,
        null_text_epsilon=getattr(args, "null_text_epsilon", None),
    )


def engine_from_config(config: EngineConfig) -> Any:
    """Load the engine ``config`` describes, with one log line for the load and its time."""
    from fpedit.engine import EditEngine

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


# --- `fpedit serve` -------------------------------------------------------------------------------------------

#: Requests in flight on one engine when batching is on: enough for the device loop to fill batches of
#: 2-row target steps and 8-row capture calls without holding many requests' activations at once.
DEFAULT_BATCHING_WORKERS = 4


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``fpedit serve``'s flags; every default is :class:`~fpedit.server.config.ServerConfig`'s own."""
    from fpedit.server.config import LOG_FORMATS, ServerConfig

    defaults = ServerConfig()
    add_model_arguments(parser)
    parser.add_argument("--host", default=defaults.host, help="bind address (default loopback)")
    parser.add_argument(
        "--port",
        type=int,
        default=defaults.port,
        help=f"gRPC port (default {defaults.port}; 0 picks a free one)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help=f"requests the engine runs at once (default: {DEFAULT_BATCHING_WORKERS} with batching, whose "
        f"device loop merges their UNet calls; {defaults.workers} without)",
    )
    parser.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="merge the UNet calls of concurrent requests into shared backend calls (default: on)",
    )
    parser.add_argument(
        "--threads-per-worker",
        type=int,
        help="CPU: torch intra-op threads (default: all cores with batching, else cores // --workers)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help=f"requests that may wait; more get RESOURCE_EXHAUSTED (default {defaults.max_queue})",
    )
    message_mb = defaults.max_message_bytes // 1024**2
    parser.add_argument(
        "--max-message-mb",
        type=int,
        default=message_mb,
        help=f"largest request or response message (default {message_mb} MiB)",
    )
    cache_gib = defaults.cache_bytes / 1024**3
    parser.add_argument(
        "--cache-gib",
        type=float,
        default=cache_gib,
        help=f"inversion cache budget (default {cache_gib:g} GiB)",
    )
    parser.add_argument(
        "--cache-ttl-s",
        type=float,
        default=defaults.cache_ttl_s,
        help=f"an unused inversion expires after this (default {defaults.cache_ttl_s:g} s)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help=f"larger images get INVALID_ARGUMENT (default {defaults.max_image_pixels})",
    )
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=defaults.max_prompt_chars,
        help=f"longer prompts get INVALID_ARGUMENT (default {defaults.max_prompt_chars})",
    )
    parser.add_argument(
        "--token", help="require 'authorization: Bearer TOKEN' (default: $FPEDIT_TOKEN, else no token)"
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain (default: plaintext; needs --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert, unencrypted (default: none)")
    parser.add_argument(
        "--grace-s",
        type=float,
        default=defaults.grace_s,
        help=f"drain time on SIGTERM, in seconds (default {defaults.grace_s:g})",
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)"
    )
    parser.add_argument("--metrics-host", help="metrics bind address (default: --host)")
    parser.add_argument(
        "--http-port",
        type=int,
        help="also serve HTTP/JSON and the editor page at http://HOST:PORT/ (default: off; 0 picks a port)",
    )
    parser.add_argument("--http-host", help="HTTP bind address (default: --host)")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=defaults.log_format,
        help=f"json: one object per request (default {defaults.log_format})",
    )
    ray = parser.add_argument_group("scale out on Ray Serve (pip install 'fpedit[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run the engines as Ray Serve replicas (one per GPU on CUDA) behind this gRPC front",
    )
    ray.add_argument("--replicas", type=int, help="with --ray: engine replicas (default 1)")
    ray.add_argument(
        "--ray-address",
        help="with --ray: join this Ray cluster (auto, or HEAD:6379; run on one of its nodes); default: start one",
    )
    # Start-up errors name the flag as typed (`--workers: must be at least 1`): config fields are flag names.
    flags = {
        option[2:]: option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    parser.set_defaults(flags=flags)


def server_config_from_args(args: argparse.Namespace) -> Any:
    """The validated :class:`ServerConfig` of ``fpedit serve`` flags (also read by the Ray Serve config file)."""

    from fpedit.server.config import ServerConfig

    token = bearer_token(args.token)
    return ServerConfig(
        host=args.host,
        port=args.port,
        workers=args.workers
        if args.workers is not None
        else (DEFAULT_BATCHING_WORKERS if args.batching else ServerConfig.workers),
        max_queue=args.max_queue,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        cache_bytes=int(args.cache_gib * 1024**3),
        cache_ttl_s=args.cache_ttl_s,
        max_image_pixels=args.max_image_pixels,
        max_prompt_chars=args.max_prompt_chars,
        token=token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        grace_s=args.grace_s,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        log_format=args.log_format,
        http_port=args.http_port,
        http_host=args.http_host,
        threads_per_worker=args.threads_per_worker,
    ).validate()  # before the model loads: a bad flag fails in a second, not after a minute


def serve_args_from_mapping(flags: dict[str, Any]) -> argparse.Namespace:
    """``fpedit serve`` flags given as a mapping (a Ray Serve config file's ``args``: ``{model: /models/sd15,
    device: cuda, cache-gib: 8}``), judged by the same parser as the command line."""
    argv: list[str] = []
    for key, value in flags.items():
        flag = "--" + str(key).replace("_", "-")
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is True:
                argv.append(flag)
            elif item is not False and item is not None:
                argv += [flag, str(item)]
    parser = FpeditParser(prog="fpedit serve")
    add_serve_arguments(parser)
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed what is wrong
        raise InvalidInputError("args", f"not valid `fpedit serve` flags: {argv}") from exc


# --- local blending (issue 27) ----------------------------------------------------------------------------------

#: Blend fields -> the flags of ``edit`` and ``generate``.
BLEND_FLAGS = {
    "mask": "--mask",
    "mask_grow": "--mask-grow",
    "blend_words": "--blend",
    "blend_start": "--blend-start",
    "blend_threshold": "--blend-threshold",
    "save_mask": "--save-mask",
}


def add_blend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mask``, ``--blend WORD`` and their settings: edit only inside a mask (docs/design.md, local
    blending)."""
    from fpedit.engine.blend import DEFAULT_BLEND_START, DEFAULT_BLEND_THRESHOLD

    group = parser.add_argument_group("local blending (edit only inside a mask; the rest stays the source's)")
    group.add_argument(
        "--mask", type=Path, metavar="FILE", help="image whose white (non-zero) part may change; any size"
    )
    group.add_argument(
        "--mask-grow", type=int, default=0, metavar="K", help="grow the mask by K latent cells (8 px each)"
    )
    group.add_argument(
        "--blend",
        action="append",
        default=[],
        metavar="WORD",
        help="a prompt word whose cross-attention marks what may change (repeatable; torch backend)",
    )
    group.add_argument(
        "--blend-start",
        type=float,
        default=DEFAULT_BLEND_START,
        metavar="F",
        help=f"blend from step int(steps*F) on (default {DEFAULT_BLEND_START:g})",
    )
    group.add_argument(
        "--blend-threshold",
        type=float,
        default=DEFAULT_BLEND_THRESHOLD,
        metavar="F",
        help=f"word maps keep cells above F of their maximum (default {DEFAULT_BLEND_THRESHOLD:g})",
    )
    group.add_argument(
        "--save-mask",
        type=Path,
        metavar="FILE",
        help="also write the mask the edit used, at the output's size, as a PNG (several prompts: use {i})",
    )


def blend_from_args(args: argparse.Namespace) -> Any:
    """The blend flags as a :class:`~fpedit.engine.blend.Blend` (``None`` without ``--mask`` or ``--blend``),
    judged before any model loads."""
    from fpedit.engine.blend import Blend

    if args.mask is not None:
        check_input_image(args.mask, "mask")
    if args.mask is None and not args.blend:
        if args.mask_grow:
            raise InvalidInputError("mask_grow", "grows a mask; give --mask FILE")
        if args.save_mask is not None:
            raise InvalidInputError("save_mask", "writes the blend's mask; give --mask FILE or --blend WORD")
        return None
    if args.save_mask is not None and args.save_mask.suffix.lower() != ".png":
        raise InvalidInputError("save_mask", f"{args.save_mask} must end in .png")
    return Blend(
        mask=None if args.mask is None else str(args.mask),
        mask_grow=args.mask_grow,
        words=tuple(args.blend),
        start=args.blend_start,
        threshold=args.blend_threshold,
    )


def mask_picture(mask: Any, size: tuple[int, int]) -> Any:
    """A latent-grid bool mask as a black-and-white PIL image of ``size`` (nearest: each cell a block)."""
    import numpy as np
    from PIL import Image

    cells = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return cells.resize(size, Image.Resampling.NEAREST)
