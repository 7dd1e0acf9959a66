"""The full-size SD 1.5 architecture through export and both CPU backends: time, disk and peak memory.

Real size needs no real weights: the UNet, VAE and text encoder are built from the SD 1.x configs the package
ships (``fpedit/engine/configs/sd1``) with seeded random weights, which have the true parameter count, memory,
disk and export behaviour. Nothing is downloaded. The run

1. writes that model as a diffusers folder (kept in ``--work`` and reused by later runs);
2. exports it with ``fpedit export`` (float32, and float16 unless ``--no-fp16``): seconds, peak RSS, bytes on
   disk against the bytes of one UNet + VAE + text encoder at that precision;
3. runs the same real-image edit with ``fpedit edit`` on the torch backend and on ONNX Runtime (float32):
   seconds, peak RSS, their ratio, and how far the two edited images are apart.

Each step runs in its own process, so each peak RSS is that step's alone. It takes about a quarter of an
hour on 2 CPU cores and needs ~12 GB of disk; it is not part of the test suite.

    python -m fpedit.benchmarks.real_size --work /tmp/fpedit-real --json benchmarks/results/real-size-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[1] / "engine" / "configs" / "sd1"
MODULES = ("unet", "vae", "text_encoder")
SEED = 1505
PROMPT = "a photo of a red car"


def build_model(folder: Path, seed: int = SEED) -> None:
    """Write the SD 1.5 architecture with seeded random weights as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fpedit.engine.components import read_json

    torch.manual_seed(seed)
    stage = folder.with_name(folder.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    UNet2DConditionModel.from_config(read_json(CONFIGS / "unet" / "config.json")).save_pretrained(
        stage / "unet"
    )
    AutoencoderKL.from_config(read_json(CONFIGS / "vae" / "config.json")).save_pretrained(stage / "vae")
    text_config = CLIPTextConfig.from_json_file(str(CONFIGS / "text_encoder" / "config.json"))
    CLIPTextModel(text_config).save_pretrained(stage / "text_encoder")
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(CONFIGS / part, stage / part)
    shutil.copy(CONFIGS / "model_index.json", stage / "model_index.json")
    stage.replace(folder)


def write_image(path: Path, side: int) -> None:
    """A smooth, seeded test photo (gradients and a disc): something an edit can keep the layout of."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side] / side
    disc = ((x - 0.5) ** 2 + (y - 0.55) ** 2 < 0.08).astype(float)
    rgb = np.stack([0.2 + 0.7 * x * (1 - disc) + disc, 0.3 + 0.5 * y, 0.6 - 0.4 * disc], axis=-1)
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype("uint8")).save(path)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def parameter_counts(model: Path) -> dict[str, int]:
    """Values stored per module of a diffusers folder (read from the safetensors headers only)."""
    from safetensors import safe_open

    counts = {}
    for module in MODULES:
        counts[module] = 0
        for file in (model / module).glob("*.safetensors"):
            with safe_open(str(file), "np") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    counts[module] += math.prod(f.get_slice(key).get_shape())
    return counts


def one_copy_bytes(model: Path, precision: str) -> int:
    """Bytes of one copy of the weights an export at ``precision`` holds (its VAE is always float32)."""
    counts = parameter_counts(model)
    width = 2 if precision == "float16" else 4
    return (counts["unet"] + counts["text_encoder"]) * width + counts["vae"] * 4


def run_step(argv: list[str]) -> dict[str, Any]:
    """Run ``fpedit ARGV`` in a child process; its wall time, exit status and peak RSS."""
    code = (
        "import json, resource, sys\n"
        "from fpedit.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print('FPEDIT_STEP ' + json.dumps({'rc': rc, 'peak_rss_bytes': peak}), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = [line for line in done.stderr.splitlines() if line.startswith("FPEDIT_STEP ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"fpedit {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("FPEDIT_STEP "))
    return {"seconds": round(seconds, 1), "peak_rss_bytes": result["peak_rss_bytes"]}


def image_difference(a: Path, b: Path) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    return {"mean_abs_levels": float(np.abs(x - y).mean()), "max_abs_levels": float(np.abs(x - y).max())}


def fp16_edits(work: Path, model: Path, side: int, steps: int) -> dict[str, Any]:
    """The same edit at ``side`` px in float16 on ONNX Runtime (the --fp16 export) and torch."""
    photo = work / f"photo-{side}.png"
    write_image(photo, side)
    edit = ["edit", str(photo), "-p", PROMPT, "--steps", str(steps)]
    runs = {
        "onnxruntime": ["--model", str(work / "onnx-float16")],
        "torch": ["--model", str(model), "--dtype", "float16"],
    }
    result: dict[str, Any] = {"size": side}
    for backend, flags in runs.items():
        print(f"fpedit edit on {backend}, float16 ({side}px, {steps} steps) ...", flush=True)
        result[backend] = run_step([*edit, "-o", str(work / f"edit16-{backend}.png"), *flags])
        print(
            f"  {result[backend]['seconds']} s, peak RSS {gib(result[backend]['peak_rss_bytes'])}", flush=True
        )
    result["onnxruntime_over_torch_peak_rss"] = round(
        result["onnxruntime"]["peak_rss_bytes"] / result["torch"]["peak_rss_bytes"], 3
    )
    result["difference"] = image_difference(work / "edit16-torch.png", work / "edit16-onnxruntime.png")
    return result


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, exports and images")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--size", type=int, default=512, help="edited image side in px (default 512)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the edit (default 2)")
    parser.add_argument("--no-fp16", action="store_true", help="skip the float16 export")
    parser.add_argument(
        "--fp16-edit-size",
        type=int,
        default=0,
        help="also run the edit in float16 (ONNX Runtime on the --fp16 export, torch --dtype float16) at this "
        "side in px (default 0: skip; torch's float16 convolutions on a CPU take many minutes at 512)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the exports (the model is always kept)")
    args = parser.parse_args(argv)

    from .machine import machine_facts

    work = args.work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model = work / "sd15-random"
    if not model.is_dir():
        print(f"writing the SD 1.5 architecture with seeded random weights to {model} ...", flush=True)
        build_model(model)
    image = work / "photo.png"
    write_image(image, args.size)
    results: dict[str, Any] = {"machine": machine_facts(), "size": args.size, "steps": args.steps}
    edit = ["edit", str(image), "-p", PROMPT, "--steps", str(args.steps)]

    precisions = ["float32"] if args.no_fp16 else ["float32", "float16"]
    for precision in precisions:
        out = work / f"onnx-{precision}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"fpedit export ({precision}) ...", flush=True)
        step = run_step(
            [
                "export",
                "--model",
                str(model),
                "--out",
                str(out),
                *(["--fp16"] if precision == "float16" else []),
            ]
        )
        disk = folder_bytes(out)
        one_copy = one_copy_bytes(model, precision)
        results[f"export_{precision}"] = {
            **step,
            "disk_bytes": disk,
            "one_copy_bytes": one_copy,
            "disk_over_one_copy": round(disk / one_copy, 3),
            "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
        }
        print(
            f"  {step['seconds']} s, peak RSS {gib(step['peak_rss_bytes'])}, {gib(disk)} on disk "
            f"({disk / one_copy:.2f}x one copy of the weights)",
            flush=True,
        )
    if "export_float16" in results:
        results["fp16_over_fp32_export_time"] = round(
            results["export_float16"]["seconds"] / results["export_float32"]["seconds"], 2
        )

    edits = {"torch": str(model), "onnxruntime": str(work / "onnx-float32")}
    for backend, source in edits.items():
        print(f"fpedit edit on {backend} ({args.size}px, {args.steps} steps) ...", flush=True)
        step = run_step([*edit, "-o", str(work / f"edit-{backend}.png"), "--model", source])
        results[f"edit_{backend}"] = step
        print(f"  {step['seconds']} s, peak RSS {gib(step['peak_rss_bytes'])}", flush=True)
    results["onnxruntime_over_torch_peak_rss"] = round(
        results["edit_onnxruntime"]["peak_rss_bytes"] / results["edit_torch"]["peak_rss_bytes"], 3
    )
    results["onnxruntime_over_torch_seconds"] = round(
        results["edit_onnxruntime"]["seconds"] / results["edit_torch"]["seconds"], 3
    )
    results["edit_difference"] = image_difference(work / "edit-torch.png", work / "edit-onnxruntime.png")
    if args.fp16_edit_size and "export_float16" in results:
        results["fp16_edit"] = fp16_edits(work, model, args.fp16_edit_size, args.steps)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        for precision in precisions:
            shutil.rmtree(work / f"onnx-{precision}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
