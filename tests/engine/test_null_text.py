"""Algorithm 3: null-text inversion against the independent reference (tests/reference.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import decoded_pixels, make_image, model_input, png_bytes
from reference import (
    reference_conditional_inversion,
    reference_edit_with_nulls,
    reference_null_optimization,
    rel_l2,
)

from fpedit.engine import CancelledError, EditOptions, InvalidInputError
from fpedit.engine.null_text import DenoiseStep, optimize_null_embeddings
from fpedit.engine.options import check_null_text_options

SOURCE = "a photo of a disc"
STEPS, GUIDANCE, INNER = 4, 7.5, 10


def reference_steps(reference, steps: int) -> list[DenoiseStep]:
    """Denoising steps from the reference's own float64 alphas (no engine schedule code)."""
    r = reference.T // steps
    return [DenoiseStep(t, reference._alpha(t), reference._alpha(t - r)) for t in reference.timesteps(steps)]


@pytest.fixture(scope="module")
def ref_run(reference):
    """The reference's conditional inversion and null optimisation of the test image."""
    z0 = reference.encode(model_input(make_image()))
    traj = reference_conditional_inversion(reference, z0, SOURCE, STEPS)
    nulls, iterations = reference_null_optimization(reference, traj, SOURCE, STEPS, GUIDANCE, INNER)
    return {"z0": z0, "traj": traj, "nulls": nulls, "iterations": iterations}


def test_optimisation_matches_reference(engine, reference, ref_run):
    traj = torch.cat(ref_run["traj"])
    done = []
    result = optimize_null_embeddings(
        engine.backend.differentiable_unet(),
        traj,
        reference.embed(SOURCE),
        reference.embed(""),
        GUIDANCE,
        reference_steps(reference, STEPS),
        inner_steps=INNER,
        progress=lambda i, n: done.append((i, n)),
    )
    assert result.embeddings.shape == ref_run["nulls"].shape
    assert result.iterations == ref_run["iterations"]
    for i in range(STEPS):
        assert rel_l2(result.embeddings[i], ref_run["nulls"][i]) < 1e-4, i
    # The optimisation moved the embeddings: the comparison above is not between two copies of "".
    assert rel_l2(ref_run["nulls"][-1], reference.embed("")[0]) > 1e-2
    assert done == [(i + 1, STEPS) for i in range(STEPS)]
    # Per step: one conditional row, one forward+backward per iteration, one unconditional row to advance.
    assert result.unet_backwards == sum(result.iterations)
    assert result.unet_forwards == sum(result.iterations) + 2 * STEPS


def test_no_autograd_state_leaks(engine, reference, ref_run):
    unet = engine.backend.differentiable_unet()
    traj = torch.cat(ref_run["traj"])
    args = (
        unet,
        traj,
        reference.embed(SOURCE),
        reference.embed(""),
        GUIDANCE,
        reference_steps(reference, STEPS),
    )
    with torch.inference_mode():
        inner = optimize_null_embeddings(*args, inner_steps=1)
        assert not torch.is_grad_enabled()
    with torch.no_grad():
        optimize_null_embeddings(*args, inner_steps=1)
        assert not torch.is_grad_enabled()
    outer = optimize_null_embeddings(*args, inner_steps=1)
    assert torch.is_grad_enabled()
    for result in (inner, outer):
        assert not result.embeddings.requires_grad and result.embeddings.grad_fn is None
    assert all(not p.requires_grad and p.grad is None for p in unet.parameters())


def test_cancellation_between_iterations(engine, reference, ref_run):
    polls = []

    def cancel_check() -> None:
        polls.append(1)
        if len(polls) > 3:
            raise CancelledError("client went away")

    with pytest.raises(CancelledError):
        optimize_null_embeddings(
            engine.backend.differentiable_unet(),
            torch.cat(ref_run["traj"]),
            reference.embed(SOURCE),
            reference.embed(""),
            GUIDANCE,
            reference_steps(reference, STEPS),
            inner_steps=INNER,
            epsilon=0.0,
            cancel_check=cancel_check,
        )
    assert len(polls) == 4
    assert torch.is_grad_enabled()


def test_fp16_backend_owns_one_float32_copy(engine, model_dir):
    from fpedit.engine.backends.torch_backend import TorchBackend
    from fpedit.engine.loading import load_components

    parts = load_components(model_dir)
    backend = TorchBackend(
        unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, spec=parts.spec, dtype=torch.float16
    )
    half = backend.unet_module
    first, second = backend.differentiable_unet(), backend.differentiable_unet()
    assert first is second and first is not half
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in first.parameters())
    assert next(half.parameters()).dtype == torch.float16  # the serving module is untouched
    # The copy has the serving module's weights, in float32.
    for (name, p32), (_, p16) in zip(first.named_parameters(), half.named_parameters(), strict=True):
        assert torch.equal(p32, p16.float()), name
    # A float32 backend differentiates through its serving module: no copy.
    assert engine.backend.differentiable_unet() is engine.backend.unet_module
    with pytest.raises(ValueError, match="float32"):
        optimize_null_embeddings(
            half,
            torch.zeros(2, 4, 8, 8),
            torch.zeros(1, 77, 32),
            torch.zeros(1, 77, 32),
            7.5,
            [DenoiseStep(0, 0.99, 0.99)],
        )


@pytest.mark.parametrize(
    ("steps", "epsilon", "field"),
    [
        (0, 1e-5, "null_text_steps"),
        (2.5, 1e-5, "null_text_steps"),
        (True, 1e-5, "null_text_steps"),
        (10, -1.0, "null_text_epsilon"),
        (10, float("nan"), "null_text_epsilon"),
        (10, "1", "null_text_epsilon"),
    ],
)
def test_bad_options_name_the_field(steps, epsilon, field):
    with pytest.raises(InvalidInputError) as info:
        check_null_text_options(steps, epsilon)
    assert info.value.field == field


# --- through the engine: EditEngine.invert(method=...) and edit_real ------------------------------------

TARGET = "a photo of a blue square"
WINDOW, LAYERS = (0.0, 0.8), tuple(range(4, 15))


def options(**changes) -> EditOptions:
    base = {"steps": STEPS, "guidance_scale": GUIDANCE, "replace_window": WINDOW, "layers": LAYERS}
    return EditOptions(**{**base, **changes})


@pytest.fixture(scope="module")
def engine_null_text(engine):
    """The engine's null-text inversion of the test image, with the progress events it reported."""
    events = []
    inv = engine.invert(
        make_image(), options=options(), source_prompt=SOURCE, method="null-text", progress=events.append
    )
    return inv, events


def test_engine_inversion_matches_reference(engine_null_text, ref_run, reference):
    inv, events = engine_null_text
    assert (inv.method, inv.source_prompt, inv.guidance_scale) == ("null-text", SOURCE, GUIDANCE)
    assert inv.null_embeddings.dtype == torch.float32
    assert inv.null_embeddings.shape == ref_run["nulls"].shape
    for k in range(STEPS + 1):  # the conditional-only trajectory
        assert rel_l2(inv.latent(k), ref_run["traj"][k]) < 1e-4, k
    # Adam normalises each gradient component, so the trajectory's rounding (the engine skips the t = 0
    # identity step) reaches the embeddings a little amplified: still 40x below how far they moved.
    for i in range(STEPS):
        assert rel_l2(inv.null_embeddings[i], ref_run["nulls"][i]) < 5e-3, i
    assert inv.stats["null_text_iterations"] == sum(ref_run["iterations"])
    assert inv.stats["unet_backward_rows"] == sum(ref_run["iterations"])
    # Rows: N-1 inversion (t = 0 skipped) + per step 1 cond + iterations + 1 advance.
    assert inv.stats["unet_rows"] == (STEPS - 1) + 2 * STEPS + sum(ref_run["iterations"])
    assert [e.step for e in events if e.stage == "null_text"] == list(range(1, STEPS + 1))
    assert "null_text" in inv.stats["stages_ms"]
    assert inv.nbytes >= inv.trajectory.numel() * 4 + inv.null_embeddings.numel() * 4


def test_engine_edit_matches_reference(engine, engine_null_text, ref_run, reference):
    """Given the reference's embeddings and trajectory, the engine's Algorithm-3 edit is the reference's;
    with its own embeddings it matches too."""
    inv, _ = engine_null_text
    given = dataclasses.replace(
        inv,
        trajectory=torch.cat(ref_run["traj"]).clone(),
        null_embeddings=ref_run["nulls"].clone(),
        _maps={},
        _source_latent=None,
        _reconstruction=None,
    )
    result = engine.edit_real(given, TARGET, options=options())
    ref_src, ref_tgt = reference_edit_with_nulls(
        reference, ref_run["traj"][STEPS], SOURCE, TARGET, ref_run["nulls"], STEPS, GUIDANCE, WINDOW, LAYERS
    )
    assert rel_l2(result.source_latents, ref_src) < 3e-3
    assert rel_l2(result.edited_latents, ref_tgt) < 3e-3
    # The comparison can fail: without the map replacement the reference's target is far from the engine's.
    _, ref_off = reference_edit_with_nulls(
        reference,
        ref_run["traj"][STEPS],
        SOURCE,
        TARGET,
        ref_run["nulls"],
        STEPS,
        GUIDANCE,
        (0.0, 0.0),
        LAYERS,
    )
    assert rel_l2(result.edited_latents, ref_off) >= 10 * 3e-3
    own = engine.edit_real(inv, TARGET, options=options())
    assert rel_l2(own.source_latents, ref_src) < 3e-3
    assert rel_l2(own.edited_latents, ref_tgt) < 3e-3
    assert own.reconstruction_image is own.source_image and own.stats["method"] == "null-text"


def test_reconstruction_improves_like_the_reference(engine, engine_null_text, ref_run, reference):
    """The source branch's error vs z_0 drops from plain "" embeddings by >= 75% of the reference's drop."""
    inv, _ = engine_null_text
    z0, z_T = ref_run["z0"], ref_run["traj"][STEPS]
    plain = reference.embed("").expand(STEPS, -1, -1)
    plain_src, _ = reference_edit_with_nulls(
        reference, z_T, SOURCE, TARGET, plain, STEPS, GUIDANCE, WINDOW, LAYERS
    )
    ref_src, _ = reference_edit_with_nulls(
        reference, z_T, SOURCE, TARGET, ref_run["nulls"], STEPS, GUIDANCE, WINDOW, LAYERS
    )
    engine_src = engine.edit_real(inv, TARGET, options=options()).source_latents
    err_plain, err_ref, err_engine = rel_l2(plain_src, z0), rel_l2(ref_src, z0), rel_l2(engine_src, z0)
    assert err_ref < err_plain
    assert err_plain - err_engine >= 0.75 * (err_plain - err_ref)


def test_reedit_equals_fresh_edit_and_runs_target_only(engine, image):
    opts = options()
    inv = engine.invert(image, options=opts, source_prompt=SOURCE, method="null-text")
    first = engine.edit_real(inv, TARGET, options=opts)
    second = engine.edit_real(inv, "a photo of a green tree", options=opts)
    fresh = engine.edit_real(
        image, "a photo of a green tree", options=opts, source_prompt=SOURCE, method="null-text"
    )
    np.testing.assert_array_equal(second.edited_latents, fresh.edited_latents)
    np.testing.assert_array_equal(second.source_latents, fresh.source_latents)
    np.testing.assert_array_equal(np.asarray(second.edited_image), np.asarray(fresh.edited_image))
    assert first.stats["unet_rows"] == 2 * STEPS + 2 * STEPS  # source (2 rows) + target (2 rows) per step
    assert second.stats["unet_rows"] == 2 * STEPS  # the target branch alone
    assert second.stats["source_maps_cached"] == len(opts.replaced_steps())
    assert fresh.stats["unet_rows"] == inv.stats["unet_rows"] + first.stats["unet_rows"]


def test_negative_prompt_uses_the_source_embedding_every_step(engine, reference, image):
    inv = engine.invert(image, options=options(), source_prompt=SOURCE, method="negative-prompt")
    e_s = reference.embed(SOURCE)
    assert inv.null_embeddings.shape == (STEPS, *e_s.shape[1:])
    for i in range(STEPS):
        assert rel_l2(inv.null_embeddings[i], e_s[0]) < 1e-5, i
    assert "null_text" not in inv.stats["stages_ms"] and inv.stats["unet_rows"] == STEPS - 1
    result = engine.edit_real(inv, TARGET, options=options())
    traj = reference_conditional_inversion(reference, reference.encode(model_input(image)), SOURCE, STEPS)
    ref_src, ref_tgt = reference_edit_with_nulls(
        reference, traj[STEPS], SOURCE, TARGET, e_s.expand(STEPS, -1, -1), STEPS, GUIDANCE, WINDOW, LAYERS
    )
    assert rel_l2(result.source_latents, ref_src) < 3e-3
    assert rel_l2(result.edited_latents, ref_tgt) < 3e-3
    # The source's two rows (null == cond) are one: 1 source row + 2 target rows per step.
    assert result.stats["unet_rows"] == 3 * STEPS


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "null-text", "source_prompt": ""}, "source_prompt"),
        ({"method": "negative-prompt", "source_prompt": "   "}, "source_prompt"),
        ({"method": "null-text"}, "source_prompt"),
        ({"method": "nul-text", "source_prompt": SOURCE}, "method"),
        ({"method": None, "source_prompt": SOURCE}, "method"),
        ({"method": "null-text", "source_prompt": 7}, "source_prompt"),
        ({"method": "null-text", "source_prompt": SOURCE, "null_text_steps": 0}, "null_text_steps"),
        ({"method": "null-text", "source_prompt": SOURCE, "null_text_epsilon": -1}, "null_text_epsilon"),
    ],
)
def test_bad_inversion_requests_name_the_field(engine, image, kwargs, field):
    with pytest.raises(InvalidInputError) as info:
        engine.invert(image, options=options(), **kwargs)
    assert info.value.field == field


def test_edit_refuses_mismatched_requests(engine, engine_null_text, image):
    inv, _ = engine_null_text
    with pytest.raises(InvalidInputError) as info:
        engine.edit_real(inv, TARGET, options=options(guidance_scale=5.0))
    assert info.value.field == "guidance_scale"
    with pytest.raises(InvalidInputError) as info:
        engine.edit_real(inv, TARGET, options=options(), method="ddim")
    assert info.value.field == "method"


def test_null_text_needs_gradients_so_exported_backends_refuse_it(engine):
    from fpedit.engine.backends.onnx_backend import OnnxRuntimeBackend
    from fpedit.engine.null_text import check_method

    onnx = object.__new__(OnnxRuntimeBackend)  # the capability is declared on the class: no export needed
    assert onnx.differentiable_unet() is None and not onnx.supports_gradients
    with pytest.raises(InvalidInputError, match="negative-prompt") as info:
        check_method("null-text", SOURCE, onnx)
    assert info.value.field == "method"
    assert check_method("negative-prompt", SOURCE, onnx) == "negative-prompt"
    assert check_method("null-text", SOURCE, engine.backend) == "null-text"


def test_engine_cancellation_stops_the_optimisation(engine, image):
    calls = []

    def cancel_check() -> None:
        calls.append(1)
        if len(calls) > 12:
            raise CancelledError("deadline")

    with pytest.raises(CancelledError):
        engine.invert(
            image, options=options(), source_prompt=SOURCE, method="null-text", cancel_check=cancel_check
        )
    assert torch.is_grad_enabled()


def test_exported_backend_serves_negative_prompt_and_refuses_null_text(ort_engine, engine, image):
    """On ONNX Runtime the per-step embeddings are ordinary context inputs: negative-prompt edits match the
    torch engine's; null-text inversion (gradients) is refused naming the field."""
    onnx_engine = ort_engine
    with pytest.raises(InvalidInputError) as info:
        onnx_engine.invert(image, options=options(), source_prompt=SOURCE, method="null-text")
    assert info.value.field == "method"
    inv = onnx_engine.invert(image, options=options(), source_prompt=SOURCE, method="negative-prompt")
    exported = onnx_engine.edit_real(inv, TARGET, options=options())
    torch_run = engine.edit_real(
        image, TARGET, options=options(), source_prompt=SOURCE, method="negative-prompt"
    )
    assert rel_l2(exported.source_latents, torch_run.source_latents) < 3e-3
    assert rel_l2(exported.edited_latents, torch_run.edited_latents) < 3e-3
    again = onnx_engine.edit_real(inv, TARGET, options=options())
    assert again.stats["unet_rows"] == 2 * STEPS
    np.testing.assert_array_equal(again.edited_latents, exported.edited_latents)


# --- service and command line ------------------------------------------------------------------------------


def test_grpc_invert_and_edit_by_id_with_inversion_methods(model_dir, engine, image, capsys, tmp_path):
    """A real server on 127.0.0.1: Invert takes the method and source prompt, an edit by id equals the
    in-process engine's, null-text's guidance carries over to edits by id, and bad fields are named."""
    import grpc

    from fpedit import EditEngine
    from fpedit.cli import main
    from fpedit.server.app import build_server
    from fpedit.server.client import EditClient, edit_options
    from fpedit.server.service import ServerConfig

    server = build_server(EditEngine.from_pretrained(model_dir), ServerConfig(port=0, workers=1, max_queue=4))
    try:
        with EditClient(f"127.0.0.1:{server.port}", timeout=600) as client:
            inv = client.invert(
                png_bytes(image),
                options=edit_options(steps=STEPS),
                source_prompt=SOURCE,
                inversion_method="negative-prompt",
            )
            response = client.edit(TARGET, inversion_id=inv.inversion_id, options=edit_options(steps=STEPS))
            local = engine.edit_real(
                image,
                TARGET,
                options=EditOptions(steps=STEPS),
                source_prompt=SOURCE,
                method="negative-prompt",
            )
            served = decoded_pixels(response.edited_image)
            assert np.abs(served - np.asarray(local.edited_image, np.int16)).max() <= 1

            nt = client.invert(
                png_bytes(image),
                options=edit_options(steps=2, guidance_scale=5.0),
                source_prompt=SOURCE,
                inversion_method="null-text",
                null_text_steps=1,
            )
            assert "null_text" in nt.stats.stages_ms
            # No guidance given: the edit takes the one the embeddings were optimised for.
            by_id = client.edit(TARGET, inversion_id=nt.inversion_id, options=edit_options(steps=2))
            assert by_id.edited_image

            for call, field in (
                (lambda: client.invert(png_bytes(image), inversion_method="null-text"), "source_prompt"),
                (
                    lambda: client.edit(TARGET, inversion_id=inv.inversion_id, source_prompt=SOURCE),
                    "source_prompt",
                ),
                (
                    lambda: client.invert(
                        png_bytes(image),
                        source_prompt=SOURCE,
                        inversion_method="null-text",
                        null_text_steps=0,
                    ),
                    "null_text_steps",
                ),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert field in info.value.details()

        src = tmp_path / "in.png"
        image.save(src)
        code = main(
            [
                "client",
                "invert",
                str(src),
                "--target",
                f"127.0.0.1:{server.port}",
                "--steps",
                "2",
                "--inversion",
                "negative-prompt",
                "--source-prompt",
                SOURCE,
            ]
        )
        assert code == 0 and '"inversion_id"' in capsys.readouterr().out
    finally:
        server.drain(5)


def test_cli_edit_with_inversion_methods(tmp_path, capsys, image):
    from fpedit.cli import main

    src = tmp_path / "in.png"
    image.save(src)
    out = tmp_path / "out.png"
    base = ["edit", str(src), "-p", TARGET, "-o", str(out), "--steps", "2", "--no-progress"]
    assert main([*base, "--inversion", "negative-prompt", "--source-prompt", SOURCE]) == 0
    assert out.exists()
    out.unlink()
    capsys.readouterr()
    for extra, flag in (
        (["--inversion", "null-text"], "--source-prompt"),
        (
            ["--inversion", "null-text", "--source-prompt", SOURCE, "--null-text-steps", "0"],
            "--null-text-steps",
        ),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fpedit: error:") and flag in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
