"""Attention maps as arrays (the paper's Figure 3): per-token cross-attention and the top SVD components of
self-attention, for a generated image or a real one (inverted first).

The UNet work is a step program (:func:`~.programs.generated_attention_maps`,
:func:`~.programs.pinned_attention_maps`) run by the engine's executor like the edits: its calls ask for
``qk`` captures and ``cross_probs`` of the layers at the chosen resolution, so they batch with other
requests, stop on cancellation and count in the request's statistics. Backends without cross-attention
outputs (:attr:`~.backends.base.Backend.supports_cross_probs`) refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from . import programs
from .errors import InvalidInputError
from .images import initial_latents
from .options import EditOptions
from .real import check_inversion

if TYPE_CHECKING:
    from .images import ImageInput
    from .pipeline import EditEngine
    from .results import Inversion

#: Figure 3 shows the top 6 components.
DEFAULT_COMPONENTS = 6


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
    if not backend.supports_cross_probs:
        raise InvalidInputError(
            "backend",
            "attention maps need the torch backend (cross-attention probabilities, which this "
            f"{backend.name} model's graphs do not output)",
        )
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
        heads = {layer.index: layer.heads for layer in engine.spec.layers if layer.downsample == downsample}
        layers = list(heads)
        tokens = prompt_tokens(engine.tokenizer, prompt, engine.spec.text_max_length)
        if not tokens:
            raise InvalidInputError("prompt", "has no tokens")

        uncond = engine.text.embed("", run)
        cond = engine.text.embed(prompt, run)
        schedule = engine.schedules(steps)
        if inversion is None:  # Algorithm 1's source branch: the conditional row's maps
            program = programs.generated_attention_maps(
                z.to(backend.device), schedule, torch.cat([uncond, cond]), guidance_scale, chosen, heads
            )
            z, sums = engine.executor.run(program, run)
            (picture,) = engine.decode(z, run)
        else:  # the real image's trajectory with the prompt as condition
            trajectory = inversion
            program = programs.pinned_attention_maps(
                lambda i: trajectory.latent(steps - i), schedule, cond, chosen, heads
            )
            sums = engine.executor.run(program, run)
            picture = inversion.image

    n = len(tokens)
    cross = torch.stack([sums.cross[layer] / sums.steps for layer in layers]).mean(dim=0)
    cross = cross[:, 1 : 1 + n].T.reshape(n, *grid).cpu().numpy()
    comps, values = [], []
    for layer in layers:
        mean_map = (sums.self_maps[layer] / sums.steps).cpu()
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
