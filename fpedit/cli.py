"""The ``fpedit`` command line: edit, generate and info here; other subsystems register their own commands.

User mistakes (bad options, unreadable images, missing models, unwritable outputs) print one
``fpedit: error: ...`` line naming the flag the user typed and exit with status 2, before any model is loaded
where the mistake can be seen that early; nothing is written unless the edit succeeded. Results go to files,
``--stats`` JSON alone to stdout, everything else to stderr. This module imports no torch until a command
needs an engine, so ``fpedit --help`` and ``fpedit client ...`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any, NoReturn

from fpedit.engine.contract import LAYER_PRESETS, MAP_FORMATS
from fpedit.engine.errors import FpeditError, InvalidInputError

EXIT_USER_ERROR = 2
log = logging.getLogger("fpedit.cli")

#: Modules that add subcommands: each has ``add_commands(subparsers)``. Missing extras only hide them.
SUBSYSTEMS = ("fpedit.export.cli", "fpedit.server.cli", "fpedit.benchmarks.cli", "fpedit.eval.cli")


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
    "seed": "--seed",
    "height": "--height",
    "width": "--width",
    "out": "--out",
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
BACKEND_BY_FORMAT = {"fpedit-onnx": "onnxruntime", "fpedit-tensorrt": "tensorrt"}
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
#: Image formats results may be written as, by file extension (what PIL writes and the service returns).
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class FpeditParser(argparse.ArgumentParser):
    """Usage mistakes end in one ``fpedit: error: ...`` line (status 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"fpedit: error: {message} (see `{self.prog} --help`)\n")


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


def resolve_backend(args: argparse.Namespace) -> None:
    """Pick the backend an export or engine folder was made for, and refuse an explicit mismatch early."""
    folder = Path(args.model).expanduser()
    manifest = folder / "manifest.json"
    made_for = None
    if manifest.is_file():
        try:
            made_for = BACKEND_BY_FORMAT.get(json.loads(manifest.read_text()).get("format"))
        except (OSError, ValueError, AttributeError):
            made_for = None
    if args.backend is None:
        args.backend = made_for or "torch"
    elif made_for and args.backend != made_for:
        raise InvalidInputError(
            "backend",
            f"{folder} was made for --backend {made_for}; add --backend {made_for} (or leave it out)",
        )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (default, the embedded toy model), a diffusers SD 1.x folder, or a folder written by "
        "`fpedit export` / `fpedit build-engines` (then the backend is read from its manifest)",
    )
    group.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "tensorrt"),
        help="runtime (default: torch, or what the --model folder's manifest was made for)",
    )
    group.add_argument(
        "--device", default="cpu", type=parse_device, help="cpu, cuda or cuda:N (default: cpu)"
    )
    group.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="UNet/text precision (default: float16 on CUDA, float32 on CPU; an export's own precision)",
    )
    group.add_argument(
        "--vae-dtype",
        choices=("float32", "float16", "bfloat16"),
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


def add_checkpoint_arguments(group: Any) -> None:
    """Flags describing a single-file checkpoint (README 'Your own model')."""
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


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("edit options (defaults follow the paper)")
    group.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    group.add_argument(
        "--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)"
    )
    group.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(0.0, 0.8),
        metavar=("START", "END"),
        help="replace step i when int(steps*START) <= i < int(steps*END) (default 0.0 0.8)",
    )
    group.add_argument(
        "--layers",
        type=parse_layers,
        default="paper",
        help="self-attention layers 1..16 in execution order: '4-14' (paper, default), 'resolution' (<=32x32 "
        "tokens, the authors' code), or a list such as '3,5,7-9'",
    )
    group.add_argument(
        "--map-format",
        default="qk",
        choices=MAP_FORMATS,
        help="how maps travel: qk (projected Q and K, default) or probs (explicit softmax probabilities)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    group.add_argument(
        "--stats",
        action="store_true",
        help="print timing statistics as JSON on stdout (messages go to stderr; default: off)",
    )


def options_from_args(args: argparse.Namespace) -> Any:
    from fpedit.engine import EditOptions

    return EditOptions(
        steps=args.steps,
        guidance_scale=args.guidance,
        replace_window=tuple(args.window),
        layers=args.layers,
        map_format=args.map_format,
    )


def engine_from_args(args: argparse.Namespace, **kwargs: Any) -> Any:
    from fpedit.engine import EditEngine

    _quiet_libraries()

    backend_options: dict[str, Any] = {}
    if args.backend in ("torch", "tensorrt") and args.no_cuda_graphs:
        backend_options["cuda_graphs"] = False
    if args.backend == "torch":
        backend_options["vae_dtype"] = args.vae_dtype
        if args.compile:
            backend_options["compile_unet"] = True
    log.info("loading model %s (backend %s, device %s)", args.model, args.backend, args.device)
    started = time.perf_counter()
    engine = EditEngine.from_pretrained(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        providers=args.providers,
        backend_options=backend_options,
        model_config=getattr(args, "model_config", None),
        prediction_type=getattr(args, "prediction_type", None),
        loras=getattr(args, "loras", None) or (),
        **kwargs,
    )
    described = engine.info()
    log.info(
        "model loaded in %.2f s: backend %s on %s, %s",
        time.perf_counter() - started,
        described.get("backend"),
        described.get("device"),
        described.get("dtype"),
    )
    return engine


def _log_stats(what: str, stats: dict[str, Any]) -> None:
    """``-v``: each stage's time and the UNet work, so a slow run shows where its time went."""
    stages = stats.get("stages_ms") or {}
    log.info(
        "%s in %.0f ms: %s; %s UNet rows in %s calls",
        what,
        stats.get("total_ms", 0.0),
        ", ".join(f"{stage} {ms:.0f} ms" for stage, ms in stages.items()) or "no stages",
        stats.get("unet_rows"),
        stats.get("unet_calls"),
    )


def _quiet_libraries() -> None:
    """diffusers/transformers advice (accelerate, fp16 on CPU, token-length notes) is noise to a CLI user;
    fpedit reports what matters itself (e.g. one warning for a truncated prompt). ``-v`` keeps it."""
    # The engine logs a truncated prompt and also raises a Python warning for library callers; on the command
    # line the log line alone says it once.
    warnings.filterwarnings("ignore", message=r"prompt has \d+ tokens; truncated", category=UserWarning)
    if logging.getLogger().isEnabledFor(logging.INFO):
        return
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def _save(image: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=OUTPUT_FORMATS[path.suffix.lower()])
    print(f"wrote {path}", file=sys.stderr)


def _print_stats(args: argparse.Namespace, stats: dict[str, Any]) -> None:
    if args.stats:
        print(json.dumps(stats, indent=2, default=str))


def _check_model_and_device(args: argparse.Namespace) -> None:
    resolve_backend(args)


def _check_source_prompt_is_used(args: argparse.Namespace) -> None:
    """DDIM inversion takes no source prompt: refuse one rather than drop it without a word."""
    if (args.inversion or "ddim") == "ddim" and args.source_prompt.strip():
        raise InvalidInputError(
            "source_prompt",
            "DDIM inversion (the default) does not use a source prompt; add --inversion negative-prompt or "
            "--inversion null-text to use it, or leave it out",
        )


def _inversion_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The inversion flags as EditEngine keywords, judged before the model loads."""
    from fpedit.engine.null_text import check_null_text_options
    from fpedit.engine.options import check_prompt

    method = args.inversion or "ddim"
    source_prompt = check_prompt(args.source_prompt, "source_prompt", allow_empty=True)
    if method != "ddim" and not source_prompt.strip():
        raise InvalidInputError("source_prompt", f"must describe the image: --inversion {method} needs one")
    steps, epsilon = check_null_text_options(
        10 if args.null_text_steps is None else args.null_text_steps,
        1e-5 if args.null_text_epsilon is None else args.null_text_epsilon,
    )
    return {
        "source_prompt": source_prompt,
        "method": method,
        "null_text_steps": steps,
        "null_text_epsilon": epsilon,
    }


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


OUTPUT_PLACEHOLDERS = ("i", "prompt")


def prompt_slug(prompt: str, limit: int = 48) -> str:
    """A prompt as a file-name piece: lower-case ASCII letters and digits joined by '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-")
    return slug or "prompt"


def edit_outputs(template: Path, prompts: Sequence[str]) -> list[Path]:
    """One output path per prompt from ``-o``: ``{i}`` is the prompt's 0-based index, ``{prompt}`` its slug
    (``{{``/``}}`` for literal braces). Several prompts need a placeholder, and the paths must differ."""
    import string

    text = str(template)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise InvalidInputError("output", f"{text}: {exc} (write {{{{ and }}}} for literal braces)") from None
    unknown = sorted(fields - set(OUTPUT_PLACEHOLDERS))
    if unknown:
        raise InvalidInputError(
            "output", f"{text}: unknown placeholder {{{unknown[0]}}}; use {{i}} or {{prompt}}"
        )
    if len(prompts) > 1 and not fields:
        raise InvalidInputError(
            "output",
            f"{len(prompts)} prompts need a placeholder in {text}, e.g. out/{{i}}.png ({{i}}: 0, 1, ...; "
            "{prompt}: the prompt as a file name)",
        )
    try:
        paths = [Path(text.format(i=i, prompt=prompt_slug(p))) for i, p in enumerate(prompts)]
    except (ValueError, IndexError, KeyError) as exc:
        raise InvalidInputError("output", f"{text}: {exc}") from None
    seen: dict[Path, int] = {}
    for i, path in enumerate(paths):
        resolved = path.expanduser().resolve()
        if resolved in seen:
            raise InvalidInputError(
                "output",
                f"prompts {seen[resolved]} and {i} would both write {path}; use {{i}} to tell them apart",
            )
        seen[resolved] = i
    return paths


def _saved_inversion_from_args(args: argparse.Namespace) -> dict[str, str] | None:
    """With ``--inversion-file``: its metadata (read without loading a model); the inversion flags and an
    image do not apply, and ``--steps``/``--guidance`` default to the file's."""
    from fpedit.engine.saved import read_metadata

    if args.inversion_file is None:
        if args.image is None:
            raise InvalidInputError("image", "give an input image, or --inversion-file FILE")
        return None
    if args.image is not None:
        raise InvalidInputError("inversion_file", "edits a saved inversion: leave out IMAGE")
    given = [
        flag
        for flag, value in (
            ("--inversion", args.inversion),
            ("--source-prompt", args.source_prompt or None),
            ("--null-text-steps", args.null_text_steps),
            ("--null-text-epsilon", args.null_text_epsilon),
            ("--save-inversion", args.save_inversion),
        )
        if value is not None
    ]
    if given:
        raise InvalidInputError(
            "inversion_file", f"the saved inversion has its own settings; leave out {given[0]}"
        )
    metadata = read_metadata(args.inversion_file)
    steps = int(metadata.get("steps", 0))
    if args.steps is not None and args.steps != steps:
        raise InvalidInputError(
            "steps",
            f"{args.inversion_file} was inverted with {steps} steps; leave out --steps or give {steps}",
        )
    args.steps = steps
    guidance = metadata.get("guidance_scale", "null")
    if args.guidance is None and metadata.get("method") == "null-text" and guidance != "null":
        args.guidance = float(guidance)  # null-text embeddings were optimised for this guidance
    return metadata


def cmd_edit(args: argparse.Namespace) -> int:
    from fpedit.engine.options import check_prompt
    from fpedit.engine.saved import check_save_path

    # Paths first: these checks import nothing heavy, so a typo fails in a fraction of a second.
    saved = _saved_inversion_from_args(args)
    if saved is None:
        check_input_image(args.image)
    for prompt in args.prompt:
        check_prompt(prompt, "target_prompt", allow_empty=False)
    outputs = edit_outputs(args.output, args.prompt)
    for output in outputs:
        check_output_path(output, "-o/--output")
    check_output_path(args.reconstruction, "--reconstruction")
    check_distinct_outputs(
        *((output, "-o/--output") for output in outputs), (args.reconstruction, "--reconstruction")
    )
    if args.save_inversion is not None:
        check_save_path(args.save_inversion, "save_inversion")
    if saved is None:
        _check_source_prompt_is_used(args)
    args.steps = 50 if args.steps is None else args.steps
    args.guidance = 7.5 if args.guidance is None else args.guidance
    options = options_from_args(args)  # validate before loading anything
    inversion = {} if saved is not None else _inversion_from_args(args)
    _check_model_and_device(args)
    engine = engine_from_args(args, show_progress=not args.no_progress)
    source = args.image if saved is None else engine.load_inversion(args.inversion_file)
    log.info(
        "editing %s (%s inversion, %d steps, %d prompts)",
        args.image or args.inversion_file,
        (saved or {}).get("method") or args.inversion or "ddim",
        options.steps,
        len(args.prompt),
    )
    edits = []
    for i, (prompt, output) in enumerate(zip(args.prompt, outputs, strict=True)):
        result = engine.edit_real(source, prompt, options=options, output_size=args.size, **inversion)
        _log_stats("edit done" if len(outputs) == 1 else f"edit {i + 1}/{len(outputs)} done", result.stats)
        if i == 0:
            source, inversion = result.inversion, {}  # every later prompt re-edits the same inversion
            if args.save_inversion is not None:
                engine.save_inversion(source, args.save_inversion)
                print(f"wrote {args.save_inversion}", file=sys.stderr)
            if args.reconstruction:
                _save(result.reconstruction_image, args.reconstruction)
        if len(outputs) > 1:
            what = "inversion included" if i == 0 and saved is None else "re-edit" if i else "from the file"
            seconds = result.stats.get("total_ms", 0.0) / 1000
            print(f"edit {i + 1}/{len(outputs)} {prompt!r}: {seconds:.2f} s ({what})", file=sys.stderr)
        _save(result.edited_image, output)
        edits.append({"prompt": prompt, "output": str(output), **result.stats})
    _print_stats(args, edits[0] if len(edits) == 1 else {"edits": edits})
    return 0


def source_output_path(output: Path, source_output: Path | None) -> Path:
    """Where ``generate`` writes the source image: ``--source-output``, else ``OUTPUT.source.EXT``."""
    return source_output or output.with_name(f"{output.stem}.source{output.suffix}")


def cmd_generate(args: argparse.Namespace) -> int:
    from fpedit.engine.options import check_prompt

    source_path = source_output_path(args.output, args.source_output)
    check_output_path(args.output, "-o/--output")
    check_output_path(args.source_output, "--source-output")
    check_distinct_outputs((args.output, "-o/--output"), (source_path, "--source-output"))
    options = options_from_args(args)
    check_prompt(args.source_prompt, "source_prompt", allow_empty=True)
    check_prompt(args.target_prompt, "target_prompt", allow_empty=False)
    _check_model_and_device(args)
    engine = engine_from_args(args, show_progress=not args.no_progress)
    log.info("generating and editing (seed %d, %d steps)", args.seed, options.steps)
    result = engine.edit_generated(
        args.source_prompt,
        args.target_prompt,
        options=options,
        seed=args.seed,
        height=args.height,
        width=args.width,
    )
    _log_stats("generate done", result.stats)
    _save(result.source_image, source_path)
    _save(result.edited_image, args.output)
    _print_stats(args, result.stats)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import fpedit

    _check_model_and_device(args)
    engine = engine_from_args(args)
    print(json.dumps({"fpedit": fpedit.__version__, **engine.info()}, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from fpedit.engine.single_file import convert

    _quiet_libraries()
    out = convert(
        args.src,
        args.dst,
        model_config=args.model_config,
        prediction_type=args.prediction_type,
        allow_pickle=args.allow_pickle,
        loras=args.loras or (),
    )
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fpedit import __version__

    parser = FpeditParser(prog="fpedit", description="Free-Prompt-Editing for Stable Diffusion 1.x")
    parser.add_argument("--version", action="version", version=f"fpedit {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log stages, model load and timings at INFO level"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edit = sub.add_parser("edit", help="edit a real image toward target prompts (invert once + FPE)")
    edit.add_argument(
        "image",
        type=Path,
        nargs="?",
        help="input image (PNG, JPEG, WebP, ...); leave out with --inversion-file",
    )
    edit.add_argument(
        "--prompt",
        "-p",
        required=True,
        action="append",
        help="target prompt (what the image should show); repeat it for several edits of one inversion",
    )
    edit.add_argument(
        "--output",
        "-o",
        type=Path,
        required=True,
        help="edited image file (.png, .jpg or .webp); with several prompts it needs {i} (0, 1, ...) or "
        "{prompt} (the prompt as a file name), e.g. out/{i}.png",
    )
    edit.add_argument(
        "--reconstruction",
        type=Path,
        help="also write the inversion's reconstruction here (default: not written)",
    )
    edit.add_argument(
        "--size",
        type=parse_output_size,
        default="input",
        help="size of the written images: input (default: the input's width and height), working (the "
        "multiple-of-64 size the edit ran at) or WIDTHxHEIGHT",
    )
    inversion = edit.add_argument_group("inversion (see the README's 'Inversion methods')")
    inversion.add_argument(
        "--inversion",
        choices=("ddim", "null-text", "negative-prompt"),
        help="method: ddim (default; no source prompt), null-text (optimised null embeddings; torch "
        "backend; several times slower) or negative-prompt (the source prompt as null embedding; free)",
    )
    inversion.add_argument(
        "--source-prompt",
        default="",
        help="what the image shows; needed by null-text and negative-prompt, refused with ddim (default: none)",
    )
    inversion.add_argument("--null-text-steps", type=int, help="Adam iterations per step (default 10)")
    inversion.add_argument("--null-text-epsilon", type=float, help="early-stop loss threshold (default 1e-5)")
    inversion.add_argument(
        "--save-inversion",
        type=Path,
        metavar="FILE",
        help="also write the inversion to FILE (.safetensors) to edit it again later with --inversion-file",
    )
    inversion.add_argument(
        "--inversion-file",
        type=Path,
        metavar="FILE",
        help="edit an inversion saved by --save-inversion instead of IMAGE (same model and settings; "
        "--steps, and --guidance for null-text, default to the file's)",
    )
    add_model_arguments(edit)
    add_edit_arguments(edit)
    # None = not given: with --inversion-file the file's values apply, else 50 and 7.5 (cmd_edit).
    edit.set_defaults(func=cmd_edit, flags={**COMMON_FLAGS, **EDIT_FLAGS}, steps=None, guidance=None)

    gen = sub.add_parser("generate", help="generate from a source prompt and edit toward a target prompt")
    gen.add_argument("--source-prompt", "-s", required=True, help="prompt the source image is generated from")
    gen.add_argument("--target-prompt", "-t", required=True, help="prompt the edited image moves toward")
    gen.add_argument(
        "--seed", type=parse_seed, default=0, help="seed of the shared initial noise z_T (default 0)"
    )
    gen.add_argument(
        "--height", type=parse_side, help="image height in px, a multiple of 64 (default: model's)"
    )
    gen.add_argument(
        "--width", type=parse_side, help="image width in px, a multiple of 64 (default: model's)"
    )
    gen.add_argument(
        "--output", "-o", type=Path, required=True, help="edited image file (.png, .jpg or .webp)"
    )
    gen.add_argument("--source-output", type=Path, help="source image file (default: OUTPUT.source.EXT)")
    add_model_arguments(gen)
    add_edit_arguments(gen)
    gen.set_defaults(func=cmd_generate, flags={**COMMON_FLAGS, **GENERATE_FLAGS})

    convert = sub.add_parser(
        "convert",
        help="single-file checkpoint -> diffusers folder, or diffusers folder -> single .safetensors file",
    )
    convert.add_argument("src", type=Path, help="a .safetensors checkpoint or a diffusers folder")
    convert.add_argument("dst", type=Path, help="a new folder, or a new .safetensors file")
    convert.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a pickled (.ckpt) source; only trusted files (default: safetensors only)",
    )
    add_checkpoint_arguments(convert)
    convert.set_defaults(func=cmd_convert)

    info = sub.add_parser(
        "info", help="describe a model and backend as JSON (the keys `fpedit client info` uses too)"
    )
    add_model_arguments(info)
    info.set_defaults(func=cmd_info)

    for module_name in SUBSYSTEMS:
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("fpedit"):
                continue
            raise
        module.add_commands(sub)
    _accept_verbose_everywhere(parser)
    return parser


def _accept_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` works before or after the subcommand (``fpedit -v edit ...`` or ``fpedit edit ... -v``)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in set(action.choices.values()):
            if "-v" not in child._option_string_actions:
                child.add_argument(
                    "-v",
                    "--verbose",
                    action="store_true",
                    default=argparse.SUPPRESS,
                    help="log at INFO level",
                )
            _accept_verbose_everywhere(child)


def describe_error(exc: InvalidInputError, args: argparse.Namespace) -> str:
    """``--window (replace_window): ...``: the flag the user typed, then the API field it maps to."""
    flags = {**COMMON_FLAGS, **getattr(args, "flags", {})}
    flag = flags.get(exc.field)
    if flag is None or flag == exc.field:
        return str(exc)
    if flag.lstrip("-") == exc.field.replace("_", "-") or flag.isupper():
        return f"{flag}: {exc.reason}"
    return f"{flag} ({exc.field}): {exc.reason}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",  # timestamps: serve logs are read later
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InvalidInputError as exc:
        print(f"fpedit: error: {describe_error(exc, args)}", file=sys.stderr)
    except FpeditError as exc:
        print(f"fpedit: error: {exc}", file=sys.stderr)
    except ModuleNotFoundError as exc:
        extra = MISSING_EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"fpedit: error: this command needs {exc.name}: pip install 'fpedit[{extra}]'", file=sys.stderr)
    except OSError as exc:
        print(f"fpedit: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("fpedit: interrupted", file=sys.stderr)
        return 130
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
