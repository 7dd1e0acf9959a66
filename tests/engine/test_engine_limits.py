"""The engine's own limits: cancellation between every stage, bounded caches, an inversion's true size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CancelAt

from fpedit import EditEngine, EditOptions
from fpedit.engine.errors import CancelledError, InvalidInputError
from fpedit.engine.schedule import ScheduleCache


def count_calls(monkeypatch, obj, name: str) -> list[int]:
    seen = [0]
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        seen[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return seen


@pytest.mark.parametrize(
    ("cancel_at", "unet_calls", "decoded"),
    # checks: text "", text source, text target, 4 UNet steps, VAE decode
    [(1, 0, 0), (4, 0, 0), (5, 1, 0), (8, 4, 0), (9, 4, 1)],
)
def test_cancel_check_stops_a_generated_edit_at_once(engine, monkeypatch, cancel_at, unet_calls, decoded):
    decodes = count_calls(monkeypatch, engine.backend, "decode_latents")
    before = engine.counters()["unet_calls"]
    check = CancelAt(cancel_at)
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    if cancel_at > 8:  # past the last check: the edit completes
        engine.edit_generated("a cat", "a dog", latents=z, options=EditOptions(steps=4), cancel_check=check)
    else:
        with pytest.raises(CancelledError):
            engine.edit_generated(
                "a cat", "a dog", latents=z, options=EditOptions(steps=4), cancel_check=check
            )
    assert engine.counters()["unet_calls"] - before == unet_calls
    assert decodes[0] == decoded


def test_cancel_check_runs_before_encode_and_each_capture_call(model_dir, image, monkeypatch):
    engine = EditEngine.from_pretrained(model_dir, capture_batch=2)
    encodes = count_calls(monkeypatch, engine.backend, "encode_image")
    with pytest.raises(CancelledError):
        engine.invert(image, options=EditOptions(steps=4), cancel_check=CancelAt(1))
    assert encodes[0] == 0 and engine.counters()["unet_calls"] == 0

    inversion = engine.invert(image, options=EditOptions(steps=4))
    calls = engine.counters()["unet_calls"]
    # checks: text "", text target, then capture calls of 2 rows for the 3 replaced steps (2 calls)
    with pytest.raises(CancelledError):
        engine.edit_real(inversion, "a red car", options=EditOptions(steps=4), cancel_check=CancelAt(4))
    assert engine.counters()["unet_calls"] - calls == 1  # the first capture call ran, the second did not


def test_inversion_nbytes_counts_every_byte_it_keeps(engine, image):
    inv = engine.invert(image, options=EditOptions(steps=4))
    trajectory = inv.trajectory.numel() * 4
    pixels = 128 * 128 * 3
    assert inv.nbytes == trajectory + pixels  # the working-size image counts
    result = engine.edit_real(inv, "a red car", options=EditOptions(steps=4))
    maps = sum(t.numel() * t.element_size() for m in inv._maps.values() for t in m.tensors.values())
    assert maps > 0
    reconstruction = np.asarray(result.reconstruction_image).nbytes
    assert inv.nbytes == trajectory + pixels + reconstruction + maps
    assert result.stats["inversion_bytes"] == inv.nbytes


def test_text_cache_is_keyed_by_token_ids_and_bounded(model_dir, monkeypatch):
    from fpedit.engine import text

    monkeypatch.setattr(text, "TEXT_CACHE_SIZE", 3)
    engine = EditEngine.from_pretrained(model_dir)
    encodes = count_calls(monkeypatch, engine.backend, "encode_text")
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    opts = EditOptions(steps=1)
    engine.edit_generated("", "a cat", latents=z, options=opts)
    engine.edit_generated("", "a  cat ", latents=z, options=opts)  # same tokens: no new encode
    assert encodes[0] == 2
    for word in ("dog", "cow", "yak", "owl"):
        engine.edit_generated("", f"a {word}", latents=z, options=opts)
    assert len(engine.text) == 3
    assert all(
        isinstance(key, tuple) and len(key) == engine.spec.text_max_length
        for key in engine.text.cached_keys()
    )


def test_prompt_limit_is_refused_before_any_work(model_dir):
    engine = EditEngine.from_pretrained(model_dir, max_prompt_chars=10)
    with pytest.raises(InvalidInputError) as info:
        engine.edit_generated("", "a very long prompt", options=EditOptions(steps=1), height=64, width=64)
    assert info.value.field == "target_prompt"
    assert engine.counters()["unet_calls"] == 0


def test_schedule_cache_is_bounded():
    cache = ScheduleCache({}, max_entries=3)
    first = cache(10)
    for steps in (11, 12, 10, 13):
        cache(steps)
    assert len(cache) == 3
    assert cache(10) is first  # recently used: kept
    assert cache(11) is not cache(12) and len(cache) == 3
