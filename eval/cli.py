"""``fpedit score``, ``fpedit eval`` and ``fpedit maps`` (registered by fpedit/cli.py's subsystem list)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from fpedit.engine.errors import InvalidInputError
from fpedit.engine.options import EditOptions

METRIC_FLAGS = {
    "clip": "--clip",
    "dino": "--dino",
    "lpips_weights": "--lpips-weights",
    "source": "--source",
    "edited": "--edited",
    "mask": "--mask",
    "dataset": "DATASET",
    "images": "--images",
    "limit": "--limit",
    "resolution": "--resolution",
    "components": "--components",
    "prompt": "-p/--prompt",
    "image": "--image",
    "window": "--window",
    "sweep_windows": "--sweep-windows",
    "method": "--inversion",
    "blend": "--blend",
    "sweep_blends": "--sweep-blends",
}


def _messages(scorer: Any) -> None:
    for line in scorer.messages():
        print(f"fpedit: {line}", file=sys.stderr)


def _scorer(args: argparse.Namespace) -> Any:
    from fpedit.engine.flags import quiet_libraries

    from .metrics import Scorer

    quiet_libraries()
    for name in ("clip", "dino"):
        folder = getattr(args, name)
        if folder is not None and not Path(folder).is_dir():
            raise InvalidInputError(name, f"no such folder: {folder}")
    if args.lpips_weights is not None and not Path(args.lpips_weights).is_file():
        raise InvalidInputError("lpips_weights", f"no such file: {args.lpips_weights}")
    scorer = Scorer(clip=args.clip, dino=args.dino, lpips_weights=args.lpips_weights, device=args.device)
    _messages(scorer)
    return scorer


def _add_metric_models(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metric models (local folders; nothing is downloaded)")
    group.add_argument(
        "--clip", type=Path, help="CLIP model folder (e.g. openai/clip-vit-large-patch14): CS, CDS"
    )
    group.add_argument(
        "--dino", type=Path, help="ViT model folder (e.g. facebook/dino-vitb8): structure_distance"
    )
    group.add_argument(
        "--lpips-weights", type=Path, help="torchvision squeezenet1_1 weights file: LPIPS (needs torchvision)"
    )


# --- score ----------------------------------------------------------------------------------------------------


def cmd_score(args: argparse.Namespace) -> int:
    from fpedit.engine.paths import check_input_image

    from .masks import load_mask_image, resize_mask
    from .metrics import as_uint8

    check_input_image(args.source, "--source")
    check_input_image(args.edited, "--edited")
    mask = load_mask_image(args.mask) if args.mask is not None else None
    from PIL import Image

    images = []
    for path, field in ((args.source, "source"), (args.edited, "edited")):
        try:
            with Image.open(path) as image:
                images.append(as_uint8(image))
        except OSError as exc:
            raise InvalidInputError(field, f"{path} is not a readable image ({exc})") from None
    source, edited = images
    if mask is not None and mask.shape != source.shape[:2]:
        mask = resize_mask(mask, (source.shape[1], source.shape[0]))
    scorer = _scorer(args)
    scores = scorer.score(source, edited, args.source_prompt, args.target_prompt, mask)
    if args.json:
        print(json.dumps({k: (None if math.isnan(v) else v) for k, v in scores.items()}))
    else:
        width = max(len(k) for k in scores) if scores else 0
        for name, value in scores.items():
            print(f"{name:<{width}}  {value:.6g}")
    return 0


# --- eval -----------------------------------------------------------------------------------------------------


def parse_windows(text: str) -> list[tuple[float, float]]:
    """``"0-0.4,0-0.8"`` -> [(0.0, 0.4), (0.0, 0.8)]."""
    windows = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            start, end = (float(x) for x in part.split("-", 1))
            windows.append((start, end))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected windows such as '0-0.4,0-0.8', got {text!r}") from None
    if not windows:
        raise argparse.ArgumentTypeError("name at least one window")
    return windows


def parse_layer_sets(text: str) -> list[Any]:
    """``"paper;resolution;4-10"`` -> each parsed like --layers (``;`` separates sets)."""
    from fpedit.args import parse_layers

    return [parse_layers(part) for part in text.split(";") if part.strip()]


def _layers_name(layers: Any) -> str:
    """``(4, 5, 6, 9)`` -> ``"4-6,9"``: short folder and column names."""
    if isinstance(layers, str):
        return layers
    parts: list[str] = []
    numbers = sorted(layers)
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(parts)


def parse_blends(text: str) -> list[str]:
    """``"none,mask"`` -> ["none", "mask"] (each one of BLEND_MODES)."""
    from .runner import BLEND_MODES

    modes = [part.strip() for part in text.split(",") if part.strip()]
    wrong = [m for m in modes if m not in BLEND_MODES]
    if wrong or not modes:
        raise argparse.ArgumentTypeError(f"expected modes from {', '.join(BLEND_MODES)}, got {text!r}")
    return list(dict.fromkeys(modes))


def cmd_eval(args: argparse.Namespace) -> int:
    from fpedit.args import edit_options_from_args
    from fpedit.engine.flags import engine_config_from_args, engine_from_config
    from fpedit.engine.options import InversionOptions

    from .datasets import load_dataset
    from .runner import RunConfig, Setting, contact_sheet, inversion_kwargs, run

    base = edit_options_from_args(args)
    if args.limit is not None and args.limit < 1:
        raise InvalidInputError("limit", f"must be a positive integer, got {args.limit}")
    fmt, items = load_dataset(args.dataset, args.images, seed=args.seed)
    items = items[: args.limit] if args.limit else items
    missing = [str(item.image) for item in items if item.image is not None and not item.image.is_file()]
    if missing and len(missing) == sum(item.image is not None for item in items):  # a wrong folder, surely
        raise InvalidInputError(
            "images", f"{len(missing)} image(s) not found, e.g. {missing[0]} (point --images at the folder)"
        )
    if missing:  # some: those items fail (recorded in results.csv), the others run
        print(f"fpedit: warning: {len(missing)} image(s) not found, e.g. {missing[0]}", file=sys.stderr)
    inversion: dict[str, Any] = {"method": args.inversion}
    if args.inversion == "null-text":
        inversion.update(null_text_steps=args.null_text_steps, null_text_epsilon=args.null_text_epsilon)
    for item in items:  # each real item's inversion, judged by the engine's rules before any model loads
        if item.image is not None:
            try:
                InversionOptions(**inversion_kwargs(inversion, item))
            except InvalidInputError as exc:
                raise InvalidInputError(exc.field, f"item {item.id}: {exc.reason}") from None
    blends = args.sweep_blends if args.sweep and args.sweep_blends else [args.blend]
    if args.sweep_blends and not args.sweep:
        raise InvalidInputError("sweep_blends", "compares blend modes in a sweep; add --sweep")
    if fmt != "pie" and set(blends) - {"none"}:
        raise InvalidInputError(
            "blend",
            "FPE prompt pairs carry no masks nor blended words; mask and words need PIE-Bench's mapping",
        )
    if set(blends) - {"none"}:  # judged by the engine's rules before any model loads (field names as flags)
        from fpedit.engine.blend import Blend

        Blend(words=("?",), start=args.blend_start, threshold=args.blend_threshold)
    settings = [Setting("default", base, blend=args.blend)]
    if args.sweep:
        settings = []
        for layers in args.sweep_layers:
            for window in args.sweep_windows:
                options = base.replace(layers=layers, replace_window=window)
                name = f"layers_{_layers_name(layers)}__window_{window[0]:g}-{window[1]:g}"
                for blend in blends:  # no suffix without a blend: a sweep's folders keep their names
                    settings.append(
                        Setting(name + ("" if blend == "none" else f"__blend_{blend}"), options, blend)
                    )
    if args.output.exists() and not args.output.is_dir():
        raise InvalidInputError("output", f"{args.output} is a file; give a folder")
    engine_config = engine_config_from_args(args)
    scorer = _scorer(args)
    engine = engine_from_config(engine_config)
    if "words" in blends and not engine.backend.supports_cross_probs:
        raise InvalidInputError(
            "blend", f"words need cross-attention probabilities; the {args.backend} graphs have none"
        )
    describe = {
        "model": str(args.model),
        "backend": args.backend,
        "dataset": str(args.dataset),
        "format": fmt,
    }
    config = RunConfig(
        items=items,
        out=args.output,
        settings=settings,
        inversion=inversion,
        describe=describe,
        blend={"start": args.blend_start, "threshold": args.blend_threshold},
        progress=not args.no_progress,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    summaries = run(engine, scorer, config)
    for setting in settings:
        folder = args.output / setting.name if args.sweep else args.output
        print((folder / "summary.md").read_text())
        print(f"wrote {folder / 'results.csv'}, {folder / 'summary.json'}", file=sys.stderr)
    if args.sweep:
        sheet = contact_sheet(args.output, items, settings)
        print(f"wrote {args.output / 'sweep.md'}" + (f", {sheet}" if sheet else ""), file=sys.stderr)
    failed = sum(summary["failed"] for summary in summaries.values())
    if failed:
        print(
            f"fpedit: warning: {failed} edit(s) failed (the error column of results.csv says why); "
            "run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0 if summaries else 2


# --- maps -----------------------------------------------------------------------------------------------------


def cmd_maps(args: argparse.Namespace) -> int:
    from fpedit.engine.flags import engine_config_from_args, engine_from_config
    from fpedit.engine.options import EditOptions, check_prompt
    from fpedit.engine.paths import check_input_image

    from .pictures import save_cross_attention, save_self_attention

    check_prompt(args.prompt, "prompt", allow_empty=False)
    EditOptions(steps=args.steps, guidance_scale=args.guidance, replace_window=tuple(args.window))
    if args.image is not None:
        check_input_image(args.image, "--image")
    if args.output.exists() and not args.output.is_dir():
        raise InvalidInputError("output", f"{args.output} is a file; give a folder")
    engine_config = engine_config_from_args(args)
    if engine_config.backend != "torch":
        raise InvalidInputError("backend", "attention maps need the torch backend")
    engine = engine_from_config(engine_config)
    result = engine.attention_maps(
        args.prompt,
        image=args.image,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance,
        window=tuple(args.window),
        resolution=args.resolution,
        components=args.components,
        height=args.height,
        width=args.width,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    result.to_npz(args.output / "maps.npz")
    save_cross_attention(result, args.output / "cross_attention.png")
    save_self_attention(result, args.output / "self_attention.png")
    result.image.save(args.output / "image.png")
    for name in ("cross_attention.png", "self_attention.png", "maps.npz", "image.png"):
        print(f"wrote {args.output / name}", file=sys.stderr)
    return 0


# --- registration ---------------------------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    from fpedit.args import (
        BLEND_FLAGS,
        COMMON_FLAGS,
        add_blend_arguments,
        add_edit_arguments,
        add_run_arguments,
        parse_seed,
        parse_side,
    )
    from fpedit.engine.flags import add_model_arguments
    from fpedit.engine.options import INVERSION_METHODS

    flags = {**COMMON_FLAGS, **METRIC_FLAGS, **BLEND_FLAGS}

    score = sub.add_parser(
        "score", help="score one edit: CLIP score/direction, background PSNR/SSIM/..., structure"
    )
    score.add_argument("--source", type=Path, required=True, help="source image")
    score.add_argument("--edited", type=Path, required=True, help="edited image (same size as the source)")
    score.add_argument("--source-prompt", required=True, help="prompt describing the source image")
    score.add_argument("--target-prompt", required=True, help="prompt the edit moved toward")
    score.add_argument(
        "--mask", type=Path, help="edit mask image (white = edited): background metrics outside it"
    )
    _add_metric_models(score)
    score.add_argument("--device", default="cpu", help="device for the metric models (default cpu)")
    score.add_argument(
        "--json", action="store_true", help="print one JSON object (metric -> value) on stdout"
    )
    score.set_defaults(func=cmd_score, flags=flags)

    ev = sub.add_parser("eval", help="edit and score a benchmark (PIE-Bench mapping_file.json or FPE pairs)")
    ev.add_argument("dataset", type=Path, help="PIE-Bench mapping_file.json or an FPE prompt-pair JSON list")
    ev.add_argument(
        "--output", "-o", type=Path, required=True, help="output folder (resumed if it has results)"
    )
    ev.add_argument("--images", type=Path, help="folder the dataset's image paths are relative to")
    ev.add_argument("--limit", type=int, help="only the first N items")
    ev.add_argument(
        "--seed", type=parse_seed, default=0, help="generated items: item i uses seed SEED+i (default 0)"
    )
    ev.add_argument(
        "--inversion",
        choices=INVERSION_METHODS,
        default="ddim",
        help="real images: ddim (default), null-text or negative-prompt (with each item's source prompt)",
    )
    ev.add_argument(
        "--null-text-steps", type=int, default=10, help="Adam iterations per step (null-text; default 10)"
    )
    ev.add_argument(
        "--null-text-epsilon", type=float, default=1e-5, help="early-stop loss (null-text; default 1e-5)"
    )
    ev.add_argument("--sweep", action="store_true", help="run every --sweep-layers x --sweep-windows setting")
    ev.add_argument(
        "--sweep-layers",
        type=parse_layer_sets,
        default=["paper", "resolution"],
        help="layer sets separated by ';' (default 'paper;resolution')",
    )
    ev.add_argument(
        "--sweep-windows",
        type=parse_windows,
        default=[(0.0, 0.4), (0.0, 0.8), (0.4, 0.8)],
        help="replacement windows (default '0-0.4,0-0.8,0.4-0.8')",
    )
    ev.add_argument(
        "--blend",
        choices=("none", "mask", "words"),
        default="none",
        help="local blending per PIE-Bench item: inside its edit mask, or where its blended_word attends "
        "(docs/design.md §11); default none",
    )
    ev.add_argument(
        "--sweep-blends",
        type=parse_blends,
        help="blend modes the sweep compares, e.g. 'none,mask,words' (default: --blend alone)",
    )
    add_blend_arguments(ev, settings_only=True)
    _add_metric_models(ev)
    add_model_arguments(ev)
    add_edit_arguments(ev)
    add_run_arguments(ev)
    ev.set_defaults(func=cmd_eval, flags=flags)

    maps = sub.add_parser(
        "maps", help="cross-attention per token and self-attention SVD components (Figure 3)"
    )
    maps.add_argument("--prompt", "-p", "--source-prompt", "-s", dest="prompt", required=True, help="prompt")
    maps.add_argument("--image", type=Path, help="a real image (inverted first); default: a generated one")
    maps.add_argument("--output", "-o", type=Path, required=True, help="output folder")
    maps.add_argument("--seed", type=parse_seed, default=0, help="generated image's seed (default 0)")
    maps.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    maps.add_argument(
        "--guidance",
        type=float,
        default=EditOptions.guidance_scale,
        help=f"guidance scale (default {EditOptions.guidance_scale})",
    )
    maps.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("START", "END"),
        help="average the maps of steps int(steps*START) <= i < int(steps*END) (default all: 0 1)",
    )
    maps.add_argument("--resolution", type=int, help="map grid side (default: latent side / 4, 16 at 512 px)")
    maps.add_argument("--components", type=int, default=6, help="SVD components per layer (default 6)")
    maps.add_argument("--height", type=parse_side, help="generated image height (default: model's)")
    maps.add_argument("--width", type=parse_side, help="generated image width (default: model's)")
    add_model_arguments(maps)
    maps.set_defaults(func=cmd_maps, flags=flags)
