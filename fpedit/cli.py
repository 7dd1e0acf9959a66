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
import unicodedata
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

from fpedit import args as cli_args
from fpedit.args import (
    BLEND_FLAGS,
    COMMON_FLAGS,
    EDIT_FLAGS,
    EXIT_USER_ERROR,
    GENERATE_FLAGS,
    MISSING_EXTRAS,
    OUTPUT_FORMATS,
    FpeditParser,
    add_blend_arguments,
    add_edit_arguments,
    add_generate_arguments,
    add_inversion_arguments,
    add_run_arguments,
    blend_from_args,
    describe_error,
    edit_options_from_args,
    inversion_options_from_args,
    parse_layers,
    parse_output_size,
    source_output_path,
)
from fpedit.engine import flags as engine_flags
from fpedit.engine.errors import FpeditError, InvalidInputError
from fpedit.engine.flags import (
    add_checkpoint_arguments,
    add_model_arguments,
    checkpoint_options,
    engine_config_from_args,
    quiet_libraries,
)
from fpedit.engine.paths import check_distinct_outputs, check_input_image, check_output_path

__all__ = ["build_parser", "edit_outputs", "main", "parse_layers", "parse_output_size", "prompt_slug"]

log = logging.getLogger("fpedit.cli")

#: Modules that add subcommands: each has ``add_commands(subparsers)``. Missing extras only hide them.
SUBSYSTEMS = ("fpedit.export.cli", "fpedit.server.cli", "fpedit.benchmarks.cli", "fpedit.eval.cli")


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


def _save(image: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=OUTPUT_FORMATS[path.suffix.lower()])
    print(f"wrote {path}", file=sys.stderr)


def _print_stats(args: argparse.Namespace, stats: dict[str, Any]) -> None:
    if args.stats:
        print(json.dumps(stats, indent=2, default=str))


OUTPUT_PLACEHOLDERS = ("i", "prompt")


def prompt_slug(prompt: str, limit: int = 48) -> str:
    """A prompt as a file-name piece: lower-case ASCII letters and digits joined by '-' (accents are dropped
    from their letters, "Ünïcode" is "unicode", rather than the letters from the name)."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:limit].strip("-")
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
    from fpedit.engine.options import refuse_inversion_options
    from fpedit.engine.saved import read_metadata

    if args.inversion_file is None:
        if args.image is None:
            raise InvalidInputError("image", "give an input image, or --inversion-file FILE")
        return None
    if args.image is not None:
        raise InvalidInputError("inversion_file", "edits a saved inversion: leave out IMAGE")
    refuse_inversion_options(cli_args.inversion_fields_given(args))
    if args.save_inversion is not None:
        raise InvalidInputError(
            "save_inversion", "the inversion is saved already (--inversion-file); leave it out"
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
    args.steps = cli_args.PAPER_OPTIONS.steps if args.steps is None else args.steps
    args.guidance = cli_args.PAPER_OPTIONS.guidance_scale if args.guidance is None else args.guidance
    inversion = None if saved is not None else inversion_options_from_args(args)
    options = edit_options_from_args(args)  # validate before loading anything
    options = options.replace(blend=blend_from_args(args))
    masks = [] if args.save_mask is None else edit_outputs(args.save_mask, args.prompt)
    for mask_path in masks:
        check_output_path(mask_path, "--save-mask")
    config = engine_config_from_args(args, show_progress=not args.no_progress)
    engine = engine_flags.engine_from_config(config)
    source = args.image if saved is None else engine.load_inversion(args.inversion_file)
    log.info(
        "editing %s (%s inversion, %d steps, %d prompts)",
        args.image or args.inversion_file,
        (saved or {}).get("method") or (inversion.method if inversion else "ddim"),
        options.steps,
        len(args.prompt),
    )
    edits = []
    for i, (prompt, output) in enumerate(zip(args.prompt, outputs, strict=True)):
        result = engine.edit_real(source, prompt, options=options, output_size=args.size, inversion=inversion)
        _log_stats("edit done" if len(outputs) == 1 else f"edit {i + 1}/{len(outputs)} done", result.stats)
        if i == 0:
            source, inversion = result.inversion, None  # every later prompt re-edits the same inversion
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
        if masks:
            _save(cli_args.mask_picture(result.blend_mask, result.edited_image.size), masks[i])
        edits.append({"prompt": prompt, "output": str(output), **result.stats})
    _print_stats(args, edits[0] if len(edits) == 1 else {"edits": edits})
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fpedit.engine.options import check_prompt

    source_path = source_output_path(args.output, args.source_output)
    check_output_path(args.output, "-o/--output")
    check_output_path(args.source_output, "--source-output")
    check_distinct_outputs((args.output, "-o/--output"), (source_path, "--source-output"))
    options = edit_options_from_args(args).replace(blend=blend_from_args(args))
    check_output_path(args.save_mask, "--save-mask")
    check_prompt(args.source_prompt, "source_prompt", allow_empty=True)
    check_prompt(args.target_prompt, "target_prompt", allow_empty=False)
    engine = engine_flags.engine_from_config(
        engine_config_from_args(args, show_progress=not args.no_progress)
    )
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
    if args.save_mask is not None:
        _save(cli_args.mask_picture(result.blend_mask, result.edited_image.size), args.save_mask)
    _print_stats(args, result.stats)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import fpedit

    engine = engine_flags.engine_from_config(engine_config_from_args(args))
    print(json.dumps({"fpedit": fpedit.__version__, **engine.info()}, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from fpedit.engine.conversion import convert

    quiet_libraries()
    out = convert(
        args.src,
        args.dst,
        **checkpoint_options(args),
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
    inversion = add_inversion_arguments(edit)
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
    add_blend_arguments(edit)
    add_run_arguments(edit)
    # None = not given: with --inversion-file the file's values apply, else EditOptions' defaults (cmd_edit).
    edit.set_defaults(
        func=cmd_edit, flags={**COMMON_FLAGS, **EDIT_FLAGS, **BLEND_FLAGS}, steps=None, guidance=None
    )

    gen = sub.add_parser("generate", help="generate from a source prompt and edit toward a target prompt")
    add_generate_arguments(gen)
    add_model_arguments(gen)
    add_edit_arguments(gen)
    add_blend_arguments(gen)
    add_run_arguments(gen)
    gen.set_defaults(func=cmd_generate, flags={**COMMON_FLAGS, **GENERATE_FLAGS, **BLEND_FLAGS})

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
