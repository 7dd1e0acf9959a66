"""Cross-request batching: concurrent requests on one engine share backend calls and each gets exactly the
result of its lone run; one request's failing call fails that request only."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_image
from helpers import BATCH_SHAPE_TOL, run_concurrently
from reference import rel_l2

from fpedit import EditEngine, EditOptions


@pytest.fixture(scope="module")
def batching(model_dir) -> EditEngine:
    # A short wait lets the first call of each round pick up the other threads' calls on a busy CPU.
    engine = EditEngine.from_pretrained(model_dir, batching=True, max_wait_ms=30)
    yield engine
    engine.close()


def latents(seed: int, hw: int = 16) -> torch.Tensor:
    return torch.randn((1, 4, hw, hw), generator=torch.Generator().manual_seed(seed))


def requests(engine: EditEngine, cached: Any) -> list[Callable[[], Any]]:
    """Real and generated edits, other layers, windows, map formats, step counts, two image sizes, a cached
    and a fresh inversion, and a lone inversion."""
    big, small = make_image(128, 128, seed=1), make_image(64, 64, seed=2)
    return [
        lambda: engine.edit_generated("a cat", "a dog", latents=latents(1), options=EditOptions(steps=4)),
        lambda: engine.edit_generated(
            "",
            "a red car",
            latents=latents(2, 8),
            options=EditOptions(steps=5, map_format="probs", layers=(2, 7, 12), replace_window=(0.2, 0.9)),
        ),
        lambda: engine.edit_generated(
            "a house", "a castle", latents=latents(3), options=EditOptions(steps=3, layers=(4, 5, 6, 14))
        ),
        lambda: engine.edit_real(big, "a blue car", options=EditOptions(steps=4)),
        lambda: engine.edit_real(
            small, "a bus", options=EditOptions(steps=5, map_format="probs", replace_window=(0.0, 0.6))
        ),
        lambda: engine.edit_real(cached, "a green bus", options=EditOptions(steps=4, layers=(3, 4, 13))),
        lambda: engine.invert(small, options=EditOptions(steps=3)),
    ]


def outcome(result: Any) -> list[torch.Tensor]:
    if hasattr(result, "edited_latents"):
        return [torch.as_tensor(result.source_latents), torch.as_tensor(result.edited_latents)]
    return [result.trajectory]


def test_concurrent_requests_equal_their_lone_runs(engine, batching):
    image = make_image(128, 128, seed=3)
    opts = EditOptions(steps=4, layers=(3, 4, 13))
    lone_inv, batched_inv = engine.invert(image, options=opts), batching.invert(image, options=opts)
    # One earlier edit leaves source maps on each inversion: the concurrent edit below reuses them.
    engine.edit_real(lone_inv, "a car", options=opts)
    batching.edit_real(batched_inv, "a car", options=opts)

    lone = [job() for job in requests(engine, lone_inv)]
    before = batching.counters()
    together = run_concurrently(requests(batching, batched_inv))
    after = batching.counters()

    for i, (a, b) in enumerate(zip(lone, together, strict=True)):
        assert not isinstance(b, Exception), (i, b)
        generated = i < 3
        for x, y in zip(outcome(a), outcome(b), strict=True):
            assert rel_l2(y, x) < (BATCH_SHAPE_TOL if generated else 1e-3), i
    assert together[5].stats["source_maps_cached"] == 3  # the cached inversion's maps were used
    rows = after["unet_rows"] - before["unet_rows"]
    calls = after["unet_calls"] - before["unet_calls"]
    assert rows == sum(r.stats["unet_rows"] for r in lone)
    assert calls < sum(r.stats["unet_calls"] for r in lone)
    assert max(after["batch_rows"]) > 4  # some call carried rows of several requests


def test_a_failing_call_fails_only_its_request(batching, monkeypatch):
    """A call the backend rejects, merged with healthy ones, fails its own request; the others finish and
    the device loop goes on serving."""
    backend = batching.backend
    real_unet = backend.unet

    def picky_unet(call):
        if bool((call.sample.abs() > 1e3).any()):
            raise RuntimeError("poisoned rows")
        return real_unet(call)

    monkeypatch.setattr(backend, "unet", picky_unet)
    opts = EditOptions(steps=3)
    results = run_concurrently(
        [
            lambda: batching.edit_generated("a cat", "a dog", latents=latents(1) * 1e4, options=opts),
            lambda: batching.edit_generated("a cat", "a dog", latents=latents(1), options=opts),
            lambda: batching.edit_generated("a cow", "a yak", latents=latents(2), options=opts),
        ]
    )
    assert isinstance(results[0], RuntimeError) and "poisoned" in str(results[0])
    assert all(hasattr(r, "edited_latents") for r in results[1:]), results[1:]
    again = batching.edit_generated("a cat", "a dog", latents=latents(1), options=opts)
    # Alone now, merged with other requests' rows then: equal up to the rounding of another batch shape.
    assert rel_l2(again.edited_latents, results[1].edited_latents) < BATCH_SHAPE_TOL
    assert rel_l2(again.edited_latents, results[2].edited_latents) >= 10 * BATCH_SHAPE_TOL


class OneCallerTokenizer:
    """A tokenizer that fails a call made while another thread is inside it: Hugging Face fast tokenizers set
    padding and truncation on the shared object per call, so overlapping calls can swap settings (seen as an
    unpadded prompt of 9 ids merged with 77-id ones). The sleep widens the window a real overlap needs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.inside = 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.inside += 1
            self.calls += 1
            overlapping = self.inside > 1
        try:
            if overlapping:
                raise RuntimeError("two threads inside the tokenizer at once")
            time.sleep(0.02)
            return self.tokenizer(*args, **kwargs)
        finally:
            with self.lock:
                self.inside -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("batched", [False, True], ids=["engine", "batching"])
def test_concurrent_requests_tokenize_one_at_a_time(batched, engine):
    """Four requests with new prompts at once, alone and batched: each prompt is tokenized while no other
    thread is in the tokenizer, and every request finishes."""
    guard = OneCallerTokenizer(engine.tokenizer)
    guarded = EditEngine(engine.backend, guard, batching=batched, max_wait_ms=30)
    try:
        results = tokenize_concurrently(guarded)
    finally:
        guarded.close()
    assert all(hasattr(r, "edited_latents") for r in results), results
    assert guard.calls >= 4 * 3  # "", source and target prompts of each request


def tokenize_concurrently(engine: EditEngine) -> list[Any]:
    opts = EditOptions(steps=1)
    return run_concurrently(
        [
            (
                lambda i=i: engine.edit_generated(
                    f"a {i} cat", f"a {i} dog", latents=latents(i, 8), options=opts
                )
            )
            for i in range(4)
        ]
    )


def test_exported_graphs_batch_without_mixing_capture_and_inject(ort_engine, engine):
    """ONNX Runtime's variants are plain, capture and inject: merged calls never mix the last two (the
    backend refuses such a call), and every request still equals its lone run."""
    from fpedit.engine.calls import UNetCall

    lone = ort_engine
    shared = EditEngine(lone.backend, lone.tokenizer, batching=True, max_wait_ms=30)
    image = make_image(64, 64, seed=4)
    opts = EditOptions(steps=3)

    def jobs(engine: EditEngine) -> list[Callable[[], Any]]:
        return [
            lambda: engine.edit_generated("a cat", "a dog", latents=latents(1, 8), options=opts),
            lambda: engine.edit_generated("a cow", "a yak", latents=latents(2, 8), options=opts),
            lambda: engine.edit_real(image, "a red car", options=opts),
        ]

    alone = [job() for job in jobs(lone)]
    before = shared.counters()
    together = run_concurrently(jobs(shared))
    try:
        for a, b in zip(alone, together, strict=True):
            assert not isinstance(b, Exception), b
            assert rel_l2(b.edited_latents, a.edited_latents) < 1e-4
        assert shared.counters()["unet_calls"] - before["unet_calls"] < sum(
            r.stats["unet_calls"] for r in alone
        )
    finally:
        shared.close()
    sample = torch.randn((1, 4, 8, 8))
    capture_only = UNetCall(
        sample, torch.tensor([500.0]), torch.zeros((1, 77, 32)), capture=(4,), need_noise_pred=False
    )
    result = lone.backend.unet(capture_only)
    assert result.noise is None and result.maps.layers == (4,)
    from fpedit.engine.maps import Injection

    plain = UNetCall(sample, torch.tensor([500.0]), torch.zeros((1, 77, 32)))
    injecting = UNetCall(
        plain.sample, plain.timesteps, plain.context, inject=Injection.for_rows(result.maps, [True], (4,))
    )
    assert lone.backend.can_share_call(capture_only, plain) and lone.backend.can_share_call(injecting, plain)
    assert not lone.backend.can_share_call(capture_only, injecting)
    assert engine.backend.can_share_call(capture_only, injecting)  # torch runs any mix in one call


def test_bench_concurrency_flag_parses_client_counts():
    import argparse

    from fpedit.benchmarks.cli import client_counts

    assert client_counts("8,1,2,4,2") == [1, 2, 4, 8]
    for bad in ("", "0,2", "two", "1,-4"):
        with pytest.raises(argparse.ArgumentTypeError):
            client_counts(bad)
