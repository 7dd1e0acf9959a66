"""One prepared GPU run: latency of the full SD 1.5 architecture (random weights) and CUDA correctness.

    python benchmarks/gpu.py --json out/gpu.json        # on a machine with an NVIDIA GPU (about 4-5 min, H200)
    python benchmarks/gpu.py --dry-run                  # the same code on the CPU: tiny model, 2 steps

What it measures (512x512, 50 steps, guidance 7.5 unless told otherwise):

1. per-call UNet time (CUDA events, median) for batch 1, 2, 3 and the capture batch, for the plain, capture
   and inject variants, with CUDA graphs, plus eager plain calls for comparison;
2. end-to-end latency of a real edit (invert + edit), a re-edit of the same inversion and a generated edit;
   then cross-request batching: edits/s and p50/p95 at 1, 2, 4 and 8 concurrent clients, batching off and
   on, real edits and re-edits (the dry run: 1 and 2 clients); with ``--compile`` also the ``compile_unet``
   flag against the plain UNet (time and fp16 agreement; off by default: it recompiles per graph key);
3. correctness: fp16 on CUDA against float32 (the CPU engine on the tiny model and on the SD 1.5
   architecture at a reduced size; CUDA float32 without TF32 at full size): PSNR of decoded images and
   relative L2 error of the final latents.

On the GPU the tiny model's check runs first, then the timings (1, 2), then the SD 1.5 float32 references
(3), and ``--compile`` last: a run cut short by ``timeout`` keeps the timings, and its JSON names the section
that was cut under ``errors`` (SIGTERM is turned into an orderly exit).

Latency does not depend on weight values, so random weights give real timings; image quality does not
mean anything with them. Every backend importable there is reported; the TensorRT path needs built engines
and is skipped when TensorRT is absent.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
}


def log(message: str) -> None:
    print(message, flush=True)


def sd15_random_modules(device: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The SD 1.5 UNet, VAE and CLIP text encoder with seeded random weights, created on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval()}


def make_engine(modules: dict[str, Any], device: str, dtype: torch.dtype, **backend_options: Any) -> Any:
    """An EditEngine over in-memory modules (a byte-level tokenizer: token ids < 514 fit CLIP's vocabulary)."""
    import tempfile

    from fpedit.engine import EditEngine, ModelSpec
    from fpedit.engine.backends.torch_backend import TorchBackend
    from fpedit.engine.loading import load_tokenizer
    from fpedit.engine.schedule import SD1_BETAS
    from fpedit.engine.tiny import write_tiny_tokenizer

    text_config = modules["text_encoder"].config.to_dict()
    spec = ModelSpec.from_configs(
        dict(modules["unet"].config), dict(modules["vae"].config), text_config, SD1_BETAS
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(write_tiny_tokenizer(Path(tmp) / "tok"))
    backend = TorchBackend(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        spec=spec,
        device=device,
        dtype=dtype,
        **backend_options,
    )
    return EditEngine(backend, tokenizer, source="sd15-architecture-random")


def synthetic_image(size: int) -> Any:
    from fpedit.benchmarks.bench import test_image

    return test_image(size)


def psnr(a: Any, b: Any) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-12))


def compare(fast: Any, ref: Any) -> dict[str, float]:
    out = {
        "edited_psnr_db": psnr(fast.edited_image, ref.edited_image),
        "edited_latent_rel_l2": rel_l2(fast.edited_latents, ref.edited_latents),
        "source_psnr_db": psnr(fast.source_image, ref.source_image),
        "source_latent_rel_l2": rel_l2(fast.source_latents, ref.source_latents),
    }
    out["finite"] = bool(np.isfinite(fast.edited_latents).all() and np.isfinite(fast.source_latents).all())
    return out


def run_pair(fast: Any, ref: Any, steps: int, size: int) -> dict[str, Any]:
    """Real and generated edits on two engines with identical inputs."""
    from fpedit.engine import EditOptions

    opts = EditOptions(steps=steps)
    image = synthetic_image(size)
    real = compare(
        fast.edit_real(image, "a photo of a red car", options=opts),
        ref.edit_real(image, "a photo of a red car", options=opts),
    )
    gen = compare(
        fast.edit_generated(
            "a photo of a cat", "a photo of a dog", seed=0, height=size, width=size, options=opts
        ),
        ref.edit_generated(
            "a photo of a cat", "a photo of a dog", seed=0, height=size, width=size, options=opts
        ),
    )
    return {"real_edit": real, "generated_edit": gen, "steps": steps, "size": size}


def time_unet(engine: Any, size: int, batches: list[int], repeat: int) -> dict[str, Any]:
    """Median ms per UNet call for each variant and batch (events on CUDA, wall clock on the CPU)."""
    from fpedit.engine import PAPER_LAYERS
    from fpedit.engine.calls import UNetCall
    from fpedit.engine.maps import Injection

    backend = engine.backend
    spec = backend.spec
    cuda = backend.device.type == "cuda"
    lh = size // spec.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {}

    def measure(fn) -> float:
        for _ in range(3):
            fn()
        samples = []
        for _ in range(repeat):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    for batch in batches:
        sample = torch.randn((batch, 4, lh, lh), generator=g).to(backend.device)
        t = torch.full((batch,), 501.0, device=backend.device)
        ctx = torch.randn((batch, 77, spec.text_hidden_size), generator=g).to(backend.device)
        maps = backend.unet(UNetCall(sample, t, ctx, capture=PAPER_LAYERS)).maps
        rows = [batch - 1] * batch
        gate = [r == batch - 1 for r in range(batch)]
        inject = Injection.for_rows(maps.rows(rows), gate, PAPER_LAYERS)
        calls = {
            "plain": UNetCall(sample, t, ctx),
            "capture": UNetCall(sample, t, ctx, capture=PAPER_LAYERS),
            "capture_only": UNetCall(sample, t, ctx, capture=PAPER_LAYERS, need_noise_pred=False),
            "inject": UNetCall(sample, t, ctx, inject=inject),
        }
        entry = {name: measure(lambda c=call: backend.unet(c)) for name, call in calls.items()}
        if backend.graphs is not None:
            graphs, backend.graphs = backend.graphs, None
            try:
                entry["plain_eager"] = measure(lambda c=calls["plain"]: backend.unet(c))
            finally:
                backend.graphs = graphs
        results[str(batch)] = entry
        log(f"  UNet batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in entry.items()))
    return results


def time_edits(engine: Any, steps: int, size: int, repeat: int) -> dict[str, Any]:
    from fpedit.engine import EditOptions

    opts = EditOptions(steps=steps)
    image = synthetic_image(size)
    sync = engine.backend.synchronize
    kinds: dict[str, list[float]] = {"real_edit": [], "re_edit": [], "generated_edit": []}
    stages: dict[str, dict[str, float]] = {}
    rows: dict[str, int] = {}

    def timed(name: str, fn) -> Any:
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        kinds[name].append((time.perf_counter() - t0) * 1e3)
        stages[name] = result.stats["stages_ms"]
        rows[name] = result.stats["unet_rows"]
        return result

    for i in range(repeat + 1):  # the first round captures the CUDA graphs and is not counted
        red, blue, dog = (f"a photo of a red car {i}", f"a photo of a blue car {i}", f"a photo of a dog {i}")
        real = timed("real_edit", lambda p=red: engine.edit_real(image, p, options=opts))
        timed("re_edit", lambda inv=real.inversion, p=blue: engine.edit_real(inv, p, options=opts))
        timed(
            "generated_edit",
            lambda p=dog, seed=i: engine.edit_generated(
                "a photo of a cat", p, seed=seed, height=size, width=size, options=opts
            ),
        )
        if i == 0:
            for values in kinds.values():
                values.clear()
    out = {
        name: {
            "median_ms": statistics.median(v),
            "min_ms": min(v),
            "runs": len(v),
            "unet_rows": rows[name],
            "stages_ms": stages[name],
        }
        for name, v in kinds.items()
    }
    for name, r in out.items():
        log(f"  {name}: median {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}), {r['unet_rows']} UNet rows")
    return out


def concurrency(engine: Any, steps: int, size: int, levels: list[int], rounds: int) -> dict[str, Any]:
    """Cross-request batching: edits/s and p50/p95 per request at each client count, batching off (the
    engine as built) and on (a second engine over the same backend and CUDA graphs), real edits and
    re-edits; plus the issue's targets at 4 clients."""
    from fpedit.benchmarks.bench import concurrency_markdown, concurrency_table
    from fpedit.engine import EditEngine

    batched = EditEngine(engine.backend, engine.tokenizer, source=engine.source, batching=True)
    try:
        table = concurrency_table(
            {"off": engine, "on": batched}, levels, steps=steps, size=size, rounds=rounds
        )
    finally:
        batched.close()
    rows = {(r["batching"], r["kind"], r["concurrency"]): r for r in table["rows"]}
    if 1 in levels and 4 in levels:
        lone, off4, on4 = (
            rows[("off", "real_edit", 1)],
            rows[("off", "real_edit", 4)],
            rows[("on", "real_edit", 4)],
        )
        table["targets"] = {
            "real_edit_4_clients_speedup": on4["edits_per_s"] / off4["edits_per_s"],  # target >= 1.6
            "real_edit_4_clients_p95_over_lone": on4["p95_ms"] / lone["p50_ms"],  # target <= 2.2
            "real_edit_1_client_on_over_off": rows[("on", "real_edit", 1)]["p50_ms"] / lone["p50_ms"],
        }
    for line in concurrency_markdown(table):
        log(f"  {line}")
    log(f"  targets: {table.get('targets')}")
    return table


def compile_check(modules: dict[str, Any], fast: Any, steps: int, size: int) -> dict[str, Any]:
    """The ``compile_unet`` backend flag: UNet call time and end-to-end latency beside the engine without
    it, and its fp16 results against it (keep the flag only if it is faster and within fp16 tolerance)."""
    from fpedit.engine import EditOptions

    compiled = make_engine(modules, "cuda", torch.float16, compile_unet=True)
    t0 = time.perf_counter()
    compiled.edit_real(synthetic_image(size), "warm-up", options=EditOptions(steps=2))
    out: dict[str, Any] = {"first_call_s": time.perf_counter() - t0}
    out["unet_ms"] = {
        "compiled": time_unet(compiled, size, [1, 2], repeat=20),
        "plain": time_unet(fast, size, [1, 2], repeat=20),
    }
    out["latency"] = {
        "compiled": time_edits(compiled, steps, size, 2),
        "plain": time_edits(fast, steps, size, 2),
    }
    out["compiled_vs_plain"] = run_pair(compiled, fast, steps, size)
    log(f"  {json.dumps(out, default=str)}")
    return out


def vae_check(engine: Any, size: int) -> dict[str, Any]:
    """Decode and encode time of the engine's VAE, and bfloat16 against float32 on the same latents."""
    from fpedit.engine.images import image_to_tensor, tensor_to_images

    backend = engine.backend
    vae = backend.vae_module
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(1)).cuda()
    pixels = image_to_tensor(synthetic_image(size)).cuda()
    out: dict[str, Any] = {}
    images = {}
    original = backend.vae_dtype
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        vae.decoder.to(dtype)
        vae.post_quant_conv.to(dtype)
        backend.vae_dtype = dtype
        for _ in range(2):
            decoded = backend.decode_latents(latents)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            decoded = backend.decode_latents(latents)
        torch.cuda.synchronize()
        out[f"{name}_decode_ms"] = (time.perf_counter() - t0) / 5 * 1e3
        images[name] = tensor_to_images(decoded)[0]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        backend.encode_image(pixels)
    torch.cuda.synchronize()
    out["float32_encode_ms"] = (time.perf_counter() - t0) / 5 * 1e3
    vae.decoder.to(original)
    vae.post_quant_conv.to(original)
    backend.vae_dtype = original
    out["bfloat16_vs_float32_decode_psnr_db"] = psnr(images["bfloat16"], images["float32"])
    log(f"  {out}")
    return out


def backends_present() -> dict[str, Any]:
    found: dict[str, Any] = {"torch": torch.__version__}
    try:
        import onnxruntime as ort

        found["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        found["onnxruntime"] = None
    try:
        import tensorrt

        found["tensorrt"] = tensorrt.__version__
    except ImportError:
        found["tensorrt"] = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fpedit GPU latency and correctness run")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps: checks the script")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--vae-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="default: the backend's (bf16 on CUDA)",
    )
    parser.add_argument("--skip-cpu-reference", action="store_true")
    parser.add_argument("--skip-fp32-reference", action="store_true", help="skip the CUDA float32 comparison")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure compile_unet (off by default: max-autotune recompiles per graph key, which can "
        "take the whole device budget)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from fpedit.benchmarks.machine import machine_facts
    from fpedit.engine import EditEngine
    from fpedit.engine.backends import parse_dtype

    report: dict[str, Any] = {
        "machine": machine_facts(),
        "backends": backends_present(),
        "args": vars(args).copy(),
    }
    report["args"]["json"] = str(args.json) if args.json else None
    vae_dtype = parse_dtype(args.vae_dtype) if args.vae_dtype else None
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            log("no CUDA device: running the dry run instead")
        device, steps, size, repeat = "cpu", 2, 64, 1
        fast = EditEngine.from_pretrained("tiny", device="cpu")
        ref = EditEngine.from_pretrained("tiny", device="cpu")
        report["mode"] = "dry-run"
        report["correctness"] = {"tiny_cpu_vs_cpu": run_pair(fast, ref, steps, size)}
        report["unet_ms"] = time_unet(fast, size, [1, 2], repeat=2)
        report["latency"] = time_edits(fast, steps, size, repeat)
        report["concurrency"] = concurrency(fast, steps, size, levels=[1, 2], rounds=1)
    else:
        device, steps, size, repeat = "cuda", args.steps, args.size, args.repeat
        report["mode"] = "gpu"
        report["correctness"] = {}
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

        def section(name: str, fn) -> Any:
            """Run one part; a failure is recorded and the run goes on (the lease is short)."""
            log(name)
            t0 = time.perf_counter()
            try:
                return fn()
            except Exception as exc:  # recorded, not hidden
                import traceback

                report.setdefault("errors", {})[name] = traceback.format_exc()
                log(f"FAILED {name}: {exc!r}")
                return None
            except BaseException as exc:  # SIGTERM from `timeout` (see __main__): say where it stopped
                report.setdefault("errors", {})[name] = f"interrupted ({type(exc).__name__}: {exc})"
                raise
            finally:
                log(f"  ({time.perf_counter() - t0:.1f} s)")
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(report, indent=2, default=str))

        def tiny_check() -> None:
            fast_tiny = EditEngine.from_pretrained("tiny", device="cuda", dtype="float16")
            ref_tiny = EditEngine.from_pretrained("tiny", device="cpu")  # float32 throughout
            result = run_pair(fast_tiny, ref_tiny, 20, 128)
            report["correctness"]["tiny_cuda_fp16_vs_cpu_fp32"] = result
            log(json.dumps(result))

        section("correctness: tiny model, CUDA fp16 (graphs) vs CPU float32, 128 px, 20 steps", tiny_check)
        modules = section(
            "building the SD 1.5 architecture with random weights on the GPU",
            lambda: sd15_random_modules("cuda"),
        )
        cpu_modules = None
        if modules is not None and not args.skip_cpu_reference:
            cpu_modules = {k: copy.deepcopy(v).to("cpu") for k, v in modules.items()}
        fp32_modules = None
        if modules is not None and not args.skip_fp32_reference:
            fp32_modules = {k: copy.deepcopy(v) for k, v in modules.items()}
        fast = section(
            "fp16 engine", lambda: make_engine(modules, "cuda", torch.float16, vae_dtype=vae_dtype)
        )

        # Timings first, the float32 references after: a run cut by the lease's clock keeps the newest figures.
        if fast is not None:
            report["unet_ms"] = section(
                "UNet per call (CUDA graphs; plain_eager without)",
                lambda: time_unet(fast, size, sorted({1, 2, 3, fast.capture_batch}), repeat=20),
            )
            report["latency"] = section(
                f"end to end: {size} px, {steps} steps", lambda: time_edits(fast, steps, size, repeat)
            )
            report["concurrency"] = section(
                f"concurrency: batching off vs on, {size} px, {steps} steps",
                lambda: concurrency(fast, steps, size, levels=[1, 2, 4, 8], rounds=2),
            )
            report["cuda_graphs_captured"] = len(fast.backend.graphs or ())
            report["vae"] = section("VAE precision and time", lambda: vae_check(fast, size))
        if fast is not None and cpu_modules is not None:

            def cpu_check() -> None:
                cpu_ref = make_engine(cpu_modules, "cpu", torch.float32, vae_dtype=torch.float32)
                result = run_pair(fast, cpu_ref, 10, 256)
                report["correctness"]["sd15_cuda_fp16_vs_cpu_fp32_256px_10steps"] = result
                log(json.dumps(result))

            section(
                "correctness: SD 1.5 architecture, CUDA fp16 vs CPU float32 (256 px, 10 steps)", cpu_check
            )
            del cpu_modules
        if fast is not None and fp32_modules is not None:

            def cuda32_check() -> None:
                ref32 = make_engine(
                    fp32_modules, "cuda", torch.float32, cuda_graphs=False, vae_dtype=torch.float32
                )
                result = run_pair(fast, ref32, steps, size)
                report["correctness"]["sd15_cuda_fp16_vs_cuda_fp32"] = result
                log(json.dumps(result))

            section(
                f"correctness: SD 1.5 architecture, CUDA fp16 vs CUDA float32 (no TF32), {size} px, {steps} steps",
                cuda32_check,
            )
            del fp32_modules
            torch.cuda.empty_cache()
        if fast is not None:
            if modules is not None and args.compile:
                report["compile_unet"] = section(
                    "compile_unet: torch.compile'd UNet vs the plain one",
                    lambda: compile_check(modules, fast, steps, size),
                )
            report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    report["device"] = device
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {args.json}")
    lat = report.get("latency") or {}
    if not lat:
        log("SUMMARY: no latency figures (see errors)")
        return 1
    card = (report["machine"].get("gpu") or {}).get("name", "cpu")
    log(
        f"SUMMARY {report['mode']} {card}: real edit {lat['real_edit']['median_ms']:.0f} ms, "
        f"re-edit {lat['re_edit']['median_ms']:.0f} ms, generated {lat['generated_edit']['median_ms']:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    # this script's folder: map an uninstalled checkout to `fpedit`; record a cut by `timeout` in the JSON
    from gpu_smoke import ensure_fpedit, terminate_on_sigterm

    ensure_fpedit()
    terminate_on_sigterm()
    sys.exit(main())
