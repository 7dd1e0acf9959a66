"""``EditEngine.attention_maps`` and ``fpedit maps``: shapes, per-token maps that differ, the generated image
equal to the engine's own generation, the serving processors untouched, readable pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image
from helpers import CancelAt
from PIL import Image

from fpedit.cli import main
from fpedit.engine import EditOptions
from fpedit.engine.errors import CancelledError, InvalidInputError


def test_generated_maps_shapes_tokens_and_image(engine):
    before = dict(engine.backend._unet.attn_processors)
    result = engine.attention_maps("a red cat", seed=3, steps=2, resolution=4, components=3)
    ids = engine.tokenizer("a red cat").input_ids
    assert result.tokens == [t.replace("</w>", "") for t in engine.tokenizer.convert_ids_to_tokens(ids[1:-1])]
    n = len(ids) - 2
    layers = [layer.index for layer in engine.spec.layers if layer.downsample == 2]  # 8x8 latent -> 4x4
    assert result.layers == layers
    assert result.cross_attention.shape == (n, 4, 4)
    assert result.self_attention_components.shape == (len(layers), 3, 4, 4)
    # Probabilities over the 77 context tokens: the prompt's share is positive and below 1 everywhere.
    total = result.cross_attention.sum(axis=0)
    assert np.all(total > 0) and np.all(total < 1)
    # Maps of different tokens differ (beyond rounding), relative to their size.
    a, b = result.cross_attention[0], result.cross_attention[2]
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
    # SVD components are unit vectors, mutually orthogonal.
    flat = result.self_attention_components[0].reshape(3, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(3), atol=1e-5)
    # The image is the engine's own generation of the prompt with that seed (a plain source branch).
    reference = engine.edit_generated("a red cat", "a red cat", options=EditOptions(steps=2), seed=3)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(reference.source_image))
    assert dict(engine.backend._unet.attn_processors) == before


def test_real_image_maps_and_bad_resolution(engine):
    result = engine.attention_maps("a disc", image=make_image(64, 64), steps=2, resolution=4, components=2)
    assert result.cross_attention.shape == (len(result.tokens), 4, 4)
    assert result.self_attention_components.shape[1:] == (2, 4, 4)
    with pytest.raises(InvalidInputError, match="resolution"):
        engine.attention_maps("a disc", steps=2, resolution=5)


def test_maps_cli_writes_npz_and_readable_pictures(model_dir, tmp_path):
    out = tmp_path / "maps"
    argv = [
        "maps",
        "-p",
        "a white horse",
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--resolution",
        "4",
        "--components",
        "4",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    data = np.load(out / "maps.npz")
    tokens = list(data["tokens"])
    assert data["cross_attention"].shape == (len(tokens), 4, 4)
    assert data["self_attention_components"].shape == (len(data["layers"]), 4, 4, 4)
    for name in ("cross_attention.png", "self_attention.png"):
        with Image.open(out / name) as picture:
            assert picture.width > 100 and picture.height > 100
            assert np.asarray(picture.convert("L")).std() > 10  # not blank


# --- the executor path against the hand-written loop it replaced ---------------------------------------------
#
# A frozen copy of the loop ``compute_attention_maps`` ran before it became a program on the executor
# (commit aef39e0): recording processors wrapped around the serving ones, UNet forwards called directly. It
# reads only public engine surface that the program does not use (``backend.forward``, ``unet_module``), so
# it is an independent expectation of the arrays.


class FrozenRecorder:
    def __init__(self, inner, kind, layer, sums):
        self.inner, self.kind, self.layer, self.sums = inner, kind, layer, sums

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, fpe=None
    ):
        sums = self.sums
        if fpe is sums["state"] and hidden_states.ndim == 3 and hidden_states.shape[1] == sums["tokens"]:
            row = sums["row"]
            x = hidden_states[row : row + 1]
            context = x
            if self.kind == "cross":
                context = encoder_hidden_states[row : row + 1]
                if attn.norm_cross:
                    context = attn.norm_encoder_hidden_states(context)
            q, k = attn.to_q(x), attn.to_k(context)
            heads = attn.heads
            q = q.view(1, q.shape[1], heads, -1).transpose(1, 2).float()
            k = k.view(1, k.shape[1], heads, -1).transpose(1, 2).float()
            probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1).mean(dim=1)[0]
            store = sums[self.kind]
            store[self.layer] = store[self.layer] + probs if self.layer in store else probs
            sums["counts"][(self.kind, self.layer)] = sums["counts"].get((self.kind, self.layer), 0) + 1
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, fpe=fpe)


def frozen_attention_maps(engine, prompt, *, inversion=None, seed=0, steps=2, resolution=4, components=3):
    """The old loop's arrays: (cross_attention, self_attention_components, singular_values)."""
    from fpedit.engine.attention_maps import prompt_tokens, top_components
    from fpedit.engine.backends.attention import CallState
    from fpedit.engine.images import initial_latents
    from fpedit.engine.programs import guide

    backend = engine.backend
    options = EditOptions(steps=steps, replace_window=(0.0, 1.0))
    chosen = list(options.replaced_steps())
    run = engine.request_run(None, None)
    with torch.inference_mode():
        if inversion is None:
            z, _ = initial_latents(engine.spec, engine.max_side, seed, None, None, None)
        else:
            z = inversion.latent(steps)
        latent_h = int(z.shape[-2])
        downsample = next(
            d for d in {la.downsample for la in engine.spec.layers} if latent_h // d == resolution
        )
        grid = (latent_h // downsample, int(z.shape[-1]) // downsample)
        layers = [la.index for la in engine.spec.layers if la.downsample == downsample]
        tokens = prompt_tokens(engine.tokenizer, prompt, engine.spec.text_max_length)
        uncond, cond = engine.text.embed("", run), engine.text.embed(prompt, run)
        schedule = engine.schedules(steps)
        device, dtype = backend.device, backend.dtype
        state = CallState()
        sums = {"state": state, "row": 0, "tokens": grid[0] * grid[1], "cross": {}, "self": {}, "counts": {}}
        unet = backend.unet_module
        original = dict(unet.attn_processors)
        wrapped = dict(original)
        for layer in layers:
            path = engine.spec.layer(layer).module_path
            wrapped[f"{path}.processor"] = FrozenRecorder(original[f"{path}.processor"], "self", layer, sums)
            cross = path.removesuffix("attn1") + "attn2"
            wrapped[f"{cross}.processor"] = FrozenRecorder(
                original[f"{cross}.processor"], "cross", layer, sums
            )
        unet.set_attn_processor(wrapped)
        try:
            if inversion is None:
                sums["row"] = 1
                context = torch.cat([uncond, cond]).to(device, dtype)
                z = z.to(device)
                for i, t in enumerate(schedule.timesteps):
                    sample = z.expand(2, *z.shape[1:]).to(dtype)
                    ts = torch.full((2,), t, device=device)
                    noise = backend.forward(sample, ts, context, state if i in chosen else CallState())
                    z = schedule.step(guide(noise.float(), 7.5), i, z)
            else:
                context = cond.to(device, dtype)
                for i in chosen:
                    latent = inversion.latent(steps - i).to(device, dtype)
                    t = schedule.timesteps[i]
                    backend.forward(latent, torch.full((1,), t, device=device), context, state)
        finally:
            unet.set_attn_processor(dict(original))
    n = len(tokens)
    cross = torch.stack([sums["cross"][la] / sums["counts"][("cross", la)] for la in layers]).mean(dim=0)
    cross = cross[:, 1 : 1 + n].T.reshape(n, *grid).cpu().numpy()
    comps, values = [], []
    for layer in layers:
        mean_map = (sums["self"][layer] / sums["counts"][("self", layer)]).cpu()
        vh, s = top_components(mean_map, min(components, mean_map.shape[0]))
        comps.append(vh.reshape(-1, *grid))
        values.append(s)
    return cross, np.stack(comps), np.stack(values)


def assert_same_arrays(result, expected):
    cross, comps, values = expected
    np.testing.assert_allclose(result.cross_attention, cross, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.singular_values, values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.self_attention_components, comps, rtol=1e-4, atol=1e-5)


def test_generated_maps_equal_the_frozen_loop(engine):
    result = engine.attention_maps("a red cat", seed=3, steps=4, resolution=4, components=3)
    assert_same_arrays(result, frozen_attention_maps(engine, "a red cat", seed=3, steps=4))


def test_real_image_maps_equal_the_frozen_loop(engine):
    inversion = engine.invert(make_image(64, 64), options=EditOptions(steps=4))
    result = engine.attention_maps("a disc", image=inversion, steps=4, resolution=4, components=3)
    assert_same_arrays(result, frozen_attention_maps(engine, "a disc", inversion=inversion, steps=4))


@pytest.mark.parametrize(
    ("cancel_at", "unet_calls"),
    # checks: text "", text prompt, then one before each of the 4 UNet steps
    [(1, 0), (3, 0), (4, 1), (6, 3)],
)
def test_cancel_stops_maps_within_one_step(engine, cancel_at, unet_calls):
    """The maps run on the executor: a cancelled request stops before its next UNet call, and the calls it
    made count in the engine's figures."""

    before = engine.counters()["unet_calls"]
    with pytest.raises(CancelledError):
        engine.attention_maps("a red cat", seed=3, steps=4, resolution=4, cancel_check=CancelAt(cancel_at))
    assert engine.counters()["unet_calls"] - before == unet_calls


def test_maps_run_on_the_executor_with_progress(engine):
    before = engine.counters()["unet_calls"]
    events = []
    engine.attention_maps("a red cat", seed=3, steps=4, resolution=4, components=2, progress=events.append)
    assert engine.counters()["unet_calls"] - before == 4
    assert [(e.stage, e.step) for e in events] == [("denoise", k) for k in range(1, 5)]


def test_backend_without_cross_attention_outputs_is_refused(engine, monkeypatch):
    monkeypatch.setattr(engine.backend, "supports_cross_probs", False)
    before = engine.counters()["unet_calls"]
    with pytest.raises(InvalidInputError, match="attention maps need the torch backend"):
        engine.attention_maps("a red cat", steps=2, resolution=4)
    assert engine.counters()["unet_calls"] == before
