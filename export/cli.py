"""``fpedit export``, ``fpedit verify-export`` and ``fpedit build-engines``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fpedit.engine.contract import GRAPHS, MAP_FORMATS, ShapeRange


def _range(field: str):
    def parse(text: str) -> ShapeRange:
        from fpedit.engine.errors import InvalidInputError

        try:
            return ShapeRange.parse(text, field)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _progress(name: str) -> None:
    print(f"  {name} ...", flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    from fpedit.engine.flags import checkpoint_options, quiet_libraries

    from .onnx_export import export_onnx

    quiet_libraries()
    print(f"exporting {args.model} to {args.out} (tracing on {args.device})")
    manifest = export_onnx(
        args.model,
        args.out,
        layers=args.layers,
        map_format=args.map_format,
        opset=args.opset,
        fp16=args.fp16,
        batch=args.batch,
        image_size=args.image_size,
        external_data=args.external_data,
        graphs=args.graphs or GRAPHS,
        device=args.device,
        **checkpoint_options(args),
        progress=_progress,
    )
    print(
        f"wrote {args.out}: layers {list(manifest.layers)}, {manifest.map_format}, {manifest.precision}, "
        f"opset {manifest.opset}, {manifest.source_hash}"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import default_tolerance, format_table, verify_export

    tolerance = args.tolerance if args.tolerance is not None else default_tolerance(args.export_dir)
    errors = verify_export(
        args.export_dir,
        args.model,
        batch=args.batch,
        image_side=args.image_side,
        allow_pickle=args.allow_pickle,
    )
    print(format_table(errors))
    if args.json:
        args.json.write_text(json.dumps([e.to_dict() for e in errors], indent=2))
    worst = max(e.max_rel for e in errors)
    if worst > tolerance:
        print(f"FAIL: max relative error {worst:.3e} > {tolerance:.1e}")
        return 1
    print(f"OK: max relative error {worst:.3e} <= {tolerance:.1e}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .tensorrt_build import build_engines

    manifest = build_engines(
        args.onnx,
        args.out,
        batch=args.batch,
        image_size=args.image_size,
        timing_cache=args.timing_cache,
        workspace_gib=args.workspace_gib,
        builder_optimization_level=args.opt_level,
        refittable=args.refittable,
        progress=_progress,
    )
    print(f"wrote {args.out}: {sorted(manifest.files)} (TensorRT {manifest.extra.get('tensorrt_version')})")
    return 0


def add_commands(sub: Any) -> None:
    from fpedit.args import parse_layers
    from fpedit.engine.flags import add_checkpoint_arguments, parse_device

    export = sub.add_parser("export", help="export UNet variants with map I/O, text encoder and VAE to ONNX")
    export.add_argument(
        "--model", required=True, help="diffusers SD 1.x/2.x folder, SD 1.x .safetensors file, or 'tiny'"
    )
    export.add_argument("--out", required=True, type=Path, help="output directory")
    export.add_argument(
        "--layers", type=parse_layers, default="paper", help="layers with map I/O (default 4-14)"
    )
    export.add_argument(
        "--map-format", default="qk", choices=MAP_FORMATS, help="how maps travel between graphs (default qk)"
    )
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export.add_argument(
        "--fp16", action="store_true", help="float16 UNet and text encoder (VAE stays float32)"
    )
    export.add_argument("--batch", type=_range("batch"), help="UNet rows MIN:OPT:MAX (default 1:2:8)")
    export.add_argument(
        "--image-size",
        type=_range("image_size"),
        help="image sides in px, MIN:OPT:MAX, or one value for static spatial axes (default: half..double the "
        "model's native size)",
    )
    export.add_argument(
        "--external-data",
        default="auto",
        choices=("auto", "always", "never"),
        help="auto (default): the UNet graphs share one weights file (unet.weights), other graphs embed "
        "theirs below 2 GB; always: every graph's weights in a file; never: embed (three UNet copies)",
    )
    export.add_argument(
        "--device",
        default="cpu",
        type=parse_device,
        help="where the tracer runs the model once: cpu or cuda[:N] (default cpu); the graphs are the same",
    )
    export.add_argument("--graphs", nargs="+", choices=GRAPHS, help="export only these graphs")
    export.add_argument(
        "--allow-pickle", action="store_true", help="allow pickled (.bin/.ckpt) weights; only trusted files"
    )
    add_checkpoint_arguments(export)
    export.set_defaults(func=cmd_export)

    verify = sub.add_parser("verify-export", help="compare an ONNX export with the torch backend")
    verify.add_argument("export_dir", type=Path, help="directory written by `fpedit export`")
    verify.add_argument("--model", help="source model (default: the one named in the manifest)")
    verify.add_argument("--batch", type=int, default=2, help="rows per test input (default 2)")
    verify.add_argument("--image-side", type=int, help="test image side in px (default: the export's opt)")
    verify.add_argument(
        "--tolerance",
        type=float,
        help="fail above this max relative error (default: 1e-3 for a float32 export, 1e-2 for --fp16)",
    )
    verify.add_argument("--json", type=Path, help="also write the errors as JSON")
    verify.add_argument(
        "--allow-pickle", action="store_true", help="allow pickled (.bin/.ckpt) weights; only trusted files"
    )
    verify.set_defaults(func=cmd_verify)

    build = sub.add_parser(
        "build-engines",
        help="build TensorRT 10/11 engines from an ONNX export (NVIDIA GPU); precision is the export's",
        description="Build one strongly typed TensorRT engine per graph of an ONNX export. Precision comes "
        "from the ONNX graphs: export with --fp16 for fp16 UNet and text encoder engines (the VAE stays "
        "float32).",
    )
    build.add_argument("--onnx", required=True, type=Path, help="directory written by `fpedit export`")
    build.add_argument("--out", required=True, type=Path, help="output directory (written when complete)")
    build.add_argument(
        "--batch", type=_range("batch"), help="profile rows MIN:OPT:MAX (default: the export's range)"
    )
    build.add_argument(
        "--image-size", type=_range("image_size"), help="profile sides MIN:OPT:MAX px (default: the export's)"
    )
    build.add_argument("--timing-cache", type=Path, help="timing cache file (default OUT/timing.cache)")
    build.add_argument("--workspace-gib", type=float, help="builder workspace limit (default: TensorRT's)")
    build.add_argument("--opt-level", type=int, help="builder optimization level 0..5 (default: TensorRT's)")
    build.add_argument(
        "--refittable",
        action="store_true",
        help="build engines whose weights TensorRT can refit in place, e.g. to swap a LoRA of the same model "
        "without a rebuild (fpedit does not refit them itself yet; default: off)",
    )
    build.set_defaults(func=cmd_build)
