"""Attention maps as arrays (the paper's Figure 3): per-token cross-attention and the top SVD components of
self-attention, for a generated image or a real one (inverted first). Torch backend only.

The capture is a separate hook: for the duration of one call, every attention processor of the UNet is
wrapped by a :class:`_Recorder` that computes the layer's softmax probabilities beside the unchanged
processor, and only for forwards that carry this call's own state object, so requests served concurrently by
the same engine neither record nor change. The serving processors are restored afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .backends.attention import CallState
from .backends.capture import CAPTURE_GATE
from .backends.torch_backend import TorchBackend
from .errors import InvalidInputError
from .images import initial_latents
from .options import EditOptions
from .programs import guide
from .real import check_inversion

if TYPE_CHECKING:
    from .images import ImageInput
    from .pipeline import EditEngine
    from .results import Inversion

#: Figure 3 shows the top 6 components.
DEFAULT_COMPONENTS = 6
_CAPTURE_LOCK = threading.Lock()


@dataclass
class AttentionMapResult:
    """``cross_attention``: (tokens, h, w), one map per prompt token (start/end tokens left out), averaged
    over heads, the chosen steps and the cross-attention layers at the resolution. ``self_attention_components``:
    (layers, k, h, w), per self-attention layer at the resolution the top-k right singular vectors of its
    row-centred map (averaged over heads and steps), sign fixed so the largest entry is positive."""

    tokens: list[str]
    cross_attention: np.ndarray
    self_attention_components: np.ndarray
    singular_values: np.ndarray  # (layers, k)
    layers: list[int]
    resolution: tuple[int, int]
    steps: list[int]
    image: Image.Image

    def to_npz(self, path: Any) -> None:
        np.savez_compressed(
            path,
            cross_attention=self.cross_attention.astype(np.float32),
            self_attention_components=self.self_attention_components.astype(np.float32),
            singular_values=self.singular_values.astype(np.float32),
            tokens=np.array(self.tokens),
            layers=np.array(self.layers, dtype=np.int64),
            steps=np.array(self.steps, dtype=np.int64),
        )


@dataclass
class _Sums:
    state: CallState
    row: int
    tokens: int  # grid cells at the chosen resolution
    cross: dict[int, torch.Tensor] = field(default_factory=dict)
    self_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, kind: str, layer: int, probs: torch.Tensor) -> None:
        store = self.cross if kind == "cross" else self.self_maps
        store[layer] = store[layer] + probs if layer in store else probs
        self.counts[(kind, layer)] = self.counts.get((kind, layer), 0) + 1


class _Recorder:
    """Wraps one attention processor; adds the head-averaged probabilities of the recorded row."""

    def __init__(self, inner: Any, kind: str, layer: int, sums: _Sums) -> None:
        self.inner, self.kind, self.layer, self.sums = inner, kind, layer, sums

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, fpe=None
    ):
        sums = self.sums
        if fpe is sums.state and hidden_states.ndim == 3 and hidden_states.shape[1] == sums.tokens:
            x = hidden_states[sums.row : sums.row + 1]
            context = x
            if self.kind == "cross":
                context = encoder_hidden_states[sums.row : sums.row + 1]
                if attn.norm_cross:
                    context = attn.norm_encoder_hidden_states(context)
            q, k = attn.to_q(x), attn.to_k(context)
            heads = attn.heads
            q = q.view(1, q.shape[1], heads, -1).transpose(1, 2).float()
            k = k.view(1, k.shape[1], heads, -1).transpose(1, 2).float()
            probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1).mean(dim=1)[0]
            sums.add(self.kind, self.layer, probs)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, fpe=fpe)


@contextmanager
def _recording(backend: Any, sums: _Sums, layers: Sequence[int]) -> Iterator[None]:
    unet = backend.unet_module
    spec = backend.spec
    original = dict(unet.attn_processors)
    wrapped = dict(original)
    for layer in layers:
        path = spec.layer(layer).module_path
        wrapped[f"{path}.processor"] = _Recorder(original[f"{path}.processor"], "self", layer, sums)
        cross = path.removesuffix("attn1") + "attn2"
        if f"{cross}.processor" in original:
            wrapped[f"{cross}.processor"] = _Recorder(original[f"{cross}.processor"], "cross", layer, sums)
    with _CAPTURE_LOCK:
        unet.set_attn_processor(wrapped)
        try:
            yield
        finally:
            unet.set_attn_processor(dict(original))


def prompt_tokens(tokenizer: Any, prompt: str, max_length: int) -> list[str]:
    """The prompt's tokens as text, without the start and end tokens (their maps are left out)."""
    ids = tokenizer(prompt, truncation=True, max_length=max_length).input_ids[1:-1]
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]


def top_components(maps: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` right singular vectors (k, N) and singular values of the row-centred (N, N) map."""
    centred = maps.double() - maps.double().mean(dim=1, keepdim=True)
    _, s, vh = torch.linalg.svd(centred)
    vh = vh[:k]
    signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
    return (vh * signs).numpy(), s[:k].numpy()


def compute_attention_maps(
    engine: EditEngine,
    prompt: str,
    *,
    image: ImageInput | Inversion | None = None,
    seed: int = 0,
    steps: int = EditOptions.steps,
    guidance_scale: float = EditOptions.guidance_scale,
    window: tuple[float, float] = (0.0, 1.0),
    resolution: int | None = None,
    components: int = DEFAULT_COMPONENTS,
    height: int | None = None,
    width: int | None = None,
    progress: Any = None,
    cancel_check: Any = None,
) -> AttentionMapResult:
    """See :meth:`EditEngine.attention_maps`."""
    from .results import Inversion

    backend = engine.backend
    if not isinstance(backend, TorchBackend):
        raise InvalidInputError("backend", "attention maps need the torch backend")
    prompt = engine.check_prompt(prompt, "prompt", allow_empty=False)
    options = EditOptions(steps=steps, guidance_scale=guidance_scale, replace_window=window)
    chosen = list(options.replaced_steps())
    if not chosen:
        raise InvalidInputError("window", f"selects none of the {steps} steps")
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise InvalidInputError("components", f"must be a positive integer, got {components!r}")

    run = engine.request_run(progress, cancel_check)
    with torch.inference_mode():
        if image is None:
            z, _ = initial_latents(engine.spec, engine.max_side, seed, None, height, width)
            inversion = None
        elif isinstance(image, Inversion):  # a kept inversion (a server's cache): no inverting again
            check_inversion(image, options, engine.engine_id)
            inversion = image
            z = inversion.latent(steps)
        else:
            inversion = engine.invert(image, options=options, progress=progress, cancel_check=cancel_check)
            z = inversion.latent(steps)
        latent_h, latent_w = int(z.shape[-2]), int(z.shape[-1])
        downsamples = sorted({layer.downsample for layer in engine.spec.layers})
        if resolution is None:
            downsample = 4 if 4 in downsamples else downsamples[len(downsamples) // 2]
        else:
            by_side = {latent_h // d: d for d in downsamples if latent_h % d == 0}
            if resolution not in by_side:
                raise InvalidInputError(
                    "resolution", f"must be one of {sorted(by_side)} at this image size, got {resolution}"
                )
            downsample = by_side[resolution]
        grid = (latent_h // downsample, latent_w // downsample)
        layers = [layer.index for layer in engine.spec.layers if layer.downsample == downsample]
        tokens = prompt_tokens(engine.tokenizer, prompt, engine.spec.text_max_length)
        if not tokens:
            raise InvalidInputError("prompt", "has no tokens")

        uncond = engine.text.embed("", run)
        cond = engine.text.embed(prompt, run)
        schedule = engine.schedules(steps)
        device, dtype = backend.device, backend.dtype
        state = CallState()
        sums = _Sums(state=state, row=0, tokens=grid[0] * grid[1])
        with _recording(backend, sums, layers):
            if inversion is None:  # Algorithm 1's source branch: record the conditional row
                sums.row = 1
                context = torch.cat([uncond, cond]).to(device, dtype)
                z = z.to(device)
                for i, t in enumerate(schedule.timesteps):
                    run.check()
                    recording = i in chosen
                    sample = z.expand(2, *z.shape[1:]).to(dtype)
                    # UNet forwards outside the backend's entry points: never beside a graph capture.
                    with CAPTURE_GATE.shared():
                        noise = backend.forward(
                            sample,
                            torch.full((2,), t, device=device),
                            context,
                            state if recording else CallState(),
                        )
                    z = schedule.step(guide(noise.float(), guidance_scale), i, z)
                (picture,) = engine.decode(z, run)
            else:  # the real image's trajectory with the prompt as condition
                context = cond.to(device, dtype)
                for i in chosen:
                    run.check()
                    latent = inversion.latent(steps - i).to(device, dtype)
                    t = schedule.timesteps[i]
                    with CAPTURE_GATE.shared():
                        backend.forward(latent, torch.full((1,), t, device=device), context, state)
                picture = inversion.image

    n = len(tokens)
    cross = torch.stack([sums.cross[layer] / sums.counts[("cross", layer)] for layer in layers]).mean(dim=0)
    cross = cross[:, 1 : 1 + n].T.reshape(n, *grid).cpu().numpy()
    comps, values = [], []
    for layer in layers:
        mean_map = (sums.self_maps[layer] / sums.counts[("self", layer)]).cpu()
        vh, s = top_components(mean_map, min(components, mean_map.shape[0]))
        comps.append(vh.reshape(-1, *grid))
        values.append(s)
    return AttentionMapResult(
        tokens=tokens,
        cross_attention=cross,
        self_attention_components=np.stack(comps),
        singular_values=np.stack(values),
        layers=layers,
        resolution=grid,
        steps=chosen,
        image=picture,
    )
