"""Algorithm 3: null-text inversion against the independent reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from reference import (
    reference_conditional_inversion,
    reference_null_optimization,
    rel_l2,
)

from fpedit.engine import CancelledError, InvalidInputError
from fpedit.engine.null_text import (
    DenoiseStep,
    check_null_text_options,
    float32_unet,
    optimize_null_embeddings,
)

SOURCE = "a photo of a disc"
STEPS, GUIDANCE, INNER = 4, 7.5, 10


def pixels(image) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(image, dtype=np.float64) / 127.5 - 1.0
    return torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1)[None]


def reference_steps(reference, steps: int) -> list[DenoiseStep]:
    """Denoising steps from the reference's own float64 alphas (no engine schedule code)."""
    r = reference.T // steps
    return [DenoiseStep(t, reference._alpha(t), reference._alpha(t - r)) for t in reference.timesteps(steps)]


@pytest.fixture(scope="module")
def ref_run(reference):
    """The reference's conditional inversion and null optimisation of the test image."""
    from conftest import make_image

    z0 = reference.encode(pixels(make_image()))
    traj = reference_conditional_inversion(reference, z0, SOURCE, STEPS)
    nulls, iterations = reference_null_optimization(reference, traj, SOURCE, STEPS, GUIDANCE, INNER)
    return {"z0": z0, "traj": traj, "nulls": nulls, "iterations": iterations}


def test_optimisation_matches_reference(engine, reference, ref_run):
    traj = torch.cat(ref_run["traj"])
    done = []
    result = optimize_null_embeddings(
        engine.backend._unet,
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
        assert rel_l2(result.embeddings[i], ref_run["nulls"][i]) < 1e-3, i
    # The optimisation moved the embeddings: the comparison above is not between two copies of "".
    assert rel_l2(ref_run["nulls"][-1], reference.embed("")[0]) > 1e-2
    assert done == [(i + 1, STEPS) for i in range(STEPS)]
    # Per step: one conditional row, one forward+backward per iteration, one unconditional row to advance.
    assert result.unet_backwards == sum(result.iterations)
    assert result.unet_forwards == sum(result.iterations) + 2 * STEPS


def test_no_autograd_state_leaks(engine, reference, ref_run):
    unet = engine.backend._unet
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

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(CancelledError):
        optimize_null_embeddings(
            engine.backend._unet,
            torch.cat(ref_run["traj"]),
            reference.embed(SOURCE),
            reference.embed(""),
            GUIDANCE,
            reference_steps(reference, STEPS),
            inner_steps=INNER,
            epsilon=0.0,
            cancelled=cancelled,
        )
    assert len(polls) == 4
    assert torch.is_grad_enabled()


def test_fp16_unet_gets_one_float32_copy(raw_modules):
    import copy

    half = copy.deepcopy(raw_modules["unet"]).half()
    first, second = float32_unet(half), float32_unet(half)
    assert first is second and first is not half
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in first.parameters())
    assert next(half.parameters()).dtype == torch.float16  # the serving module is untouched
    fp32 = raw_modules["unet"]
    assert float32_unet(fp32) is fp32
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
