"""The ``fpedit`` command line: edit, generate and info here; other subsystems register their own commands.

User mistakes (bad options, unreadable images, missing models) print one ``fpedit: error: ...`` line and exit
with status 2; nothing is written unless the edit succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

from fpedit.engine.contract import LAYER_PRESETS, MAP_FORMATS
from fpedit.engine.errors import FpeditError, InvalidInputError

EXIT_USER_ERROR = 2

#: Modules that add subcommands: each has ``add_commands(subparsers)``. Missing extras only hide them.
SUBSYSTEMS = ("fpedit.export.cli", "fpedit.server.cli", "fpedit.benchmarks.cli")


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default="tiny", help="diffusers SD 1.x folder, export dir, or 'tiny' (default)"
    )
    group.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"))
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    group.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="UNet/text precision (default: fp16 on CUDA)",
    )
    group.add_argument(
        "--vae-dtype", choices=("float32", "float16", "bfloat16"), help="VAE precision (torch)"
    )
    group.add_argument("--no-cuda-graphs", action="store_true", help="torch on CUDA: run eagerly")
    group.add_argument("--compile", action="store_true", help="torch: torch.compile the UNet (experimental)")
    group.add_argument(
        "--provider", action="append", dest="providers", help="ONNX Runtime provider (repeatable)"
    )
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickled (.bin/.ckpt) weights; only for trusted files",
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
    group.add_argument("--map-format", default="qk", choices=MAP_FORMATS)
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--stats", action="store_true", help="print timing statistics as JSON")


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

    backend_options: dict[str, Any] = {}
    if args.backend == "torch":
        backend_options["vae_dtype"] = args.vae_dtype
        if args.no_cuda_graphs:
            backend_options["cuda_graphs"] = False
        if args.compile:
            backend_options["compile_unet"] = True
    return EditEngine.from_pretrained(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        providers=args.providers,
        backend_options=backend_options,
        **kwargs,
    )


def _save(image: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"wrote {path}")


def _print_stats(args: argparse.Namespace, stats: dict[str, Any]) -> None:
    if args.stats:
        print(json.dumps(stats, indent=2, default=str))


def cmd_edit(args: argparse.Namespace) -> int:
    options = options_from_args(args)  # validate before loading anything
    if not args.image.is_file():
        raise InvalidInputError("image", f"no such file: {args.image}")
    engine = engine_from_args(args, show_progress=not args.no_progress)
    result = engine.edit_real(args.image, args.prompt, options=options)
    _save(result.edited_image, args.output)
    if args.reconstruction:
        _save(result.reconstruction_image, args.reconstruction)
    _print_stats(args, result.stats)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    engine = engine_from_args(args, show_progress=not args.no_progress)
    result = engine.edit_generated(
        args.source_prompt,
        args.target_prompt,
        options=options,
        seed=args.seed,
        height=args.height,
        width=args.width,
    )
    source_path = args.source_output or args.output.with_name(
        f"{args.output.stem}.source{args.output.suffix}"
    )
    _save(result.source_image, source_path)
    _save(result.edited_image, args.output)
    _print_stats(args, result.stats)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import fpedit

    engine = engine_from_args(args)
    print(json.dumps({"fpedit": fpedit.__version__, **engine.info()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpedit", description="Free-Prompt-Editing for Stable Diffusion 1.x"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edit = sub.add_parser("edit", help="edit a real image toward a target prompt (invert + FPE)")
    edit.add_argument("image", type=Path, help="input image (PNG, JPEG, WebP, ...)")
    edit.add_argument("--prompt", "-p", required=True, help="target prompt")
    edit.add_argument("--output", "-o", type=Path, required=True, help="edited image file")
    edit.add_argument("--reconstruction", type=Path, help="also write the inversion's reconstruction here")
    add_model_arguments(edit)
    add_edit_arguments(edit)
    edit.set_defaults(func=cmd_edit)

    gen = sub.add_parser("generate", help="generate from a source prompt and edit toward a target prompt")
    gen.add_argument("--source-prompt", "-s", required=True)
    gen.add_argument("--target-prompt", "-t", required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--output", "-o", type=Path, required=True, help="edited image file")
    gen.add_argument("--source-output", type=Path, help="source image file (default: OUTPUT.source.EXT)")
    add_model_arguments(gen)
    add_edit_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="describe a model and backend as JSON")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InvalidInputError as exc:
        print(f"fpedit: error: {exc}", file=sys.stderr)
    except FpeditError as exc:
        print(f"fpedit: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"fpedit: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("fpedit: interrupted", file=sys.stderr)
        return 130
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
