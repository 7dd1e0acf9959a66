"""What every command shares: the parser that reports usage mistakes, flag names in messages, the edit,
inversion and generate flags and their parsers, and their mapping to the request's options
(:class:`~fpedit.engine.options.EditOptions`, :class:`~fpedit.engine.options.InversionOptions`).

Each subsystem owns the flags of its own config next to it: the model flags and engine loading in
:mod:`fpedit.engine.flags` (:class:`~fpedit.engine.config.EngineConfig`), ``fpedit serve``'s in
:mod:`fpedit.server.config` (:class:`~fpedit.server.config.ServerConfig`). ``fpedit/cli.py`` and each
subsystem's ``cli.py`` build their commands from these; nothing below the command line imports this module.
Importing it costs no torch (``fpedit --help`` and ``fpedit client`` stay fast).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any, NoReturn

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
from fpedit.engine.paths import check_input_image

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
    "adapter_batching": "--adapter-batching",
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
#: Image formats results may be written as, by file extension (what PIL writes and the service returns).
OUTPUT_FORMATS = IMAGE_FILE_FORMATS
#: What the generate commands use without --seed: runs repeat, locally and on a server.
DEFAULT_SEED = 0
#: The paper's edit options: the local commands' flag defaults (a client's unset flag takes the server's).
PAPER_OPTIONS = EditOptions()


class FpeditParser(argparse.ArgumentParser):
    """Usage mistakes end in one ``fpedit: error: ...`` line (status 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"fpedit: error: {message} (see `{self.prog} --help`)\n")


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


# --- outputs --------------------------------------------------------------------------------------------------


def source_output_path(output: Path, source_output: Path | None) -> Path:
    """Where ``generate`` writes the source image: ``--source-output``, else ``OUTPUT.source.EXT``."""
    return source_output or output.with_name(f"{output.stem}.source{output.suffix}")


# --- flag groups ----------------------------------------------------------------------------------------------


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
    group = parser.add_argument_group("inversion (see docs/inversion.md)")
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


def add_blend_arguments(parser: argparse.ArgumentParser, *, settings_only: bool = False) -> None:
    """``--mask``, ``--blend WORD`` and their settings: edit only inside a mask (docs/design.md, local
    blending). ``settings_only``: ``--blend-start`` and ``--blend-threshold`` alone (``fpedit eval`` takes
    its masks and words from the dataset)."""
    from fpedit.engine.blend import DEFAULT_BLEND_START, DEFAULT_BLEND_THRESHOLD

    group = parser.add_argument_group("local blending (edit only inside a mask; the rest stays the source's)")
    if not settings_only:
        _add_blend_sources(group)
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
    if not settings_only:
        group.add_argument(
            "--save-mask",
            type=Path,
            metavar="FILE",
            help="also write the mask the edit used, at the output's size, as a PNG (several prompts: use {i})",
        )


def _add_blend_sources(group: Any) -> None:
    """``--mask``, ``--mask-grow`` and ``--blend WORD``: where a command's blend comes from."""
    group.add_argument(
        "--mask", type=Path, metavar="FILE", help="image whose white (non-zero) part may change; any size"
    )
    group.add_argument(
        "--mask-grow",
        type=int,
        default=0,
        metavar="K",
        help="grow the mask by K latent cells (8 px each; default 0)",
    )
    group.add_argument(
        "--blend",
        action="append",
        default=[],
        metavar="WORD",
        help="a prompt word whose cross-attention marks what may change (repeatable; torch backend)",
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
