"""An independent, unshortened implementation of the semantics in docs/design.md, used as ground truth by the tests.

It shares no code with ``fpedit.engine``: its own attention processor (explicit softmax probabilities), its
own DDIM arithmetic (alphas in float64), and the reference schedule of UNet rows:

* generated edit: rows [src_u, src_c, tgt_u, tgt_c] every step, all 4 in one call; in replaced layers and
  steps row 3 takes row 1's self-attention probabilities;
* inversion: rows [uncond, cond] with prompt "" and guidance g, every step including t = 0;
* real edit: rows [src_u, src_c, tgt_u, tgt_c] every step with the source pinned to the trajectory
  (prompt ""), the source's noise prediction computed and thrown away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Control:
    layers: set[int] = field(default_factory=set)
    replace: bool = False
    unet_rows: int = 0
    #: When a list, every cross-attention appends its probabilities (B, heads, queries, 77) here.
    cross: list | None = None


class _RefAttn:
    """Explicit attention; in self-attention layer ``layer`` row 3 may take row 1's probabilities."""

    def __init__(self, control: _Control, layer: int | None) -> None:
        self.control, self.layer = control, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        h = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = q.shape[-1] // h
        q = q.reshape(b, n, h, d).permute(0, 2, 1, 3)
        k = k.reshape(b, -1, h, d).permute(0, 2, 1, 3)
        v = v.reshape(b, -1, h, d).permute(0, 2, 1, 3)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        if encoder_hidden_states is not None and self.control.cross is not None:
            self.control.cross.append(probs.detach().clone())
        if self.layer is not None and self.control.replace and self.layer in self.control.layers:
            probs = probs.clone()
            probs[3] = probs[1]
        out = (probs @ v).permute(0, 2, 1, 3).reshape(b, n, h * d)
        return attn.to_out[1](attn.to_out[0](out))


def self_attention_paths(unet) -> list[str]:
    """attn1 module paths in execution order: down blocks, then mid, then up blocks."""
    paths = []
    for prefix, blocks in (("down_blocks", unet.down_blocks), ("up_blocks", unet.up_blocks)):
        part = []
        for bi, block in enumerate(blocks):
            for ai, _ in enumerate(getattr(block, "attentions", None) or []):
                part.append(f"{prefix}.{bi}.attentions.{ai}.transformer_blocks.0.attn1")
        paths.append(part)
    mid = ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    return paths[0] + mid + paths[1]


class ReferenceFPE:
    """Reference FPE over raw diffusers/transformers modules (float32, CPU)."""

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",
    ) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.control = _Control()
        layer_of = {p: i + 1 for i, p in enumerate(self_attention_paths(unet))}
        assert len(layer_of) == 16
        processors = {}
        for name in unet.attn_processors:
            processors[name] = _RefAttn(self.control, layer_of.get(name.removesuffix(".processor")))
        unet.set_attn_processor(processors)
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.T = num_train_timesteps
        assert prediction_type in ("epsilon", "v_prediction")
        self.prediction_type = prediction_type
        self.scale = vae.config.scaling_factor

    # -- pieces ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.text_encoder.config.max_position_embeddings,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids)[0]

    def timesteps(self, n: int) -> list[int]:
        r = self.T // n
        return [r * (n - 1 - i) for i in range(n)]

    def _alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else float(self.alphas_cumprod[0])

    def ddim(self, z, out, t_from: int, t_to: int):
        """Deterministic DDIM move of z from noise level t_from to t_to (either direction); ``out`` is the
        model's (guided) prediction for z. A v prediction (v = sqrt(a) eps - sqrt(1 - a) x0, with
        z = sqrt(a) x0 + sqrt(1 - a) eps) is solved for x0 and eps at the level z is at, t_from:
        x0 = sqrt(a) z - sqrt(1 - a) v and eps = sqrt(1 - a) z + sqrt(a) v."""
        a, b = self._alpha(t_from), self._alpha(t_to)
        if self.prediction_type == "v_prediction":
            x0 = math.sqrt(a) * z - math.sqrt(1 - a) * out
            eps = math.sqrt(1 - a) * z + math.sqrt(a) * out
        else:
            eps = out
            x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return math.sqrt(b) * x0 + math.sqrt(1 - b) * eps

    @torch.no_grad()
    def _unet(self, rows, t, context, replace: bool):
        self.control.replace = replace
        self.control.unet_rows += rows.shape[0]
        ts = torch.full((rows.shape[0],), float(t))
        return self.unet(rows, ts, encoder_hidden_states=context).sample

    @staticmethod
    def _cfg(u, c, g):
        return u + g * (c - u)

    def _window(self, n, window):
        return range(int(n * window[0]), int(n * window[1]))

    # -- algorithms -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def edit_generated(self, src_prompt, tgt_prompt, z_T, steps, guidance, window, layers):
        self.control.layers = set(layers)
        e_u, e_s, e_t = self.embed(""), self.embed(src_prompt), self.embed(tgt_prompt)
        ctx = torch.cat([e_u, e_s, e_u, e_t])
        zs = zt = z_T.clone()
        replaced = self._window(steps, window)
        r = self.T // steps
        for i, t in enumerate(self.timesteps(steps)):
            eps = self._unet(torch.cat([zs, zs, zt, zt]), t, ctx, i in replaced)
            zs = self.ddim(zs, self._cfg(eps[0:1], eps[1:2], guidance), t, t - r)
            zt = self.ddim(zt, self._cfg(eps[2:3], eps[3:4], guidance), t, t - r)
        return zs, zt

    @torch.no_grad()
    def encode(self, image_tensor):
        return self.vae.encode(image_tensor).latent_dist.mean * self.scale

    @torch.no_grad()
    def invert(self, z0, steps, guidance):
        e_u = self.embed("")
        ctx = torch.cat([e_u, e_u])
        r = self.T // steps
        traj = [z0]
        z = z0
        for t in reversed(self.timesteps(steps)):
            eps = self._unet(torch.cat([z, z]), t, ctx, False)
            z = self.ddim(z, self._cfg(eps[0:1], eps[1:2], guidance), t - r, t)
            traj.append(z)
        return traj

    @torch.no_grad()
    def edit_real(self, z0, tgt_prompt, steps, guidance, window, layers):
        traj = self.invert(z0, steps, guidance)
        self.control.layers = set(layers)
        e_u, e_t = self.embed(""), self.embed(tgt_prompt)
        ctx = torch.cat([e_u, e_u, e_u, e_t])
        replaced = self._window(steps, window)
        r = self.T // steps
        zt = traj[steps]
        zs = traj[steps]
        for i, t in enumerate(self.timesteps(steps)):
            zs = traj[steps - i]
            eps = self._unet(torch.cat([zs, zs, zt, zt]), t, ctx, i in replaced)
            zt = self.ddim(zt, self._cfg(eps[2:3], eps[3:4], guidance), t, t - r)
        zs = traj[0]  # the source branch stays pinned to the trajectory through the last step
        return traj, zs, zt

    @torch.no_grad()
    def decode(self, z):
        return self.vae.decode(z / self.scale).sample


def rel_l2(a, b) -> float:
    a = torch.as_tensor(np.asarray(a.detach() if torch.is_tensor(a) else a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b.detach() if torch.is_tensor(b) else b), dtype=torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# -- Algorithm 3: null-text inversion (the authors' notebook, after prompt-to-prompt) ------------------------
#
# Unshortened: conditional-only inversion runs the t = 0 step too; every Adam iteration recomputes nothing
# it could reuse except the conditional prediction (as the authors do); the advance after a step's
# optimisation runs both rows [null, cond] in one call; the edit runs rows [src_u, src_c, tgt_u, tgt_c]
# every step. Adam is written out here (no torch.optim) so that it shares nothing with the engine.


class ReferenceAdam:
    """Adam (Kingma & Ba) on one tensor, with torch's default hyper-parameters."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m: torch.Tensor | float = 0.0
        self.v: torch.Tensor | float = 0.0
        self.k = 0

    def update(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        self.k += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad * grad
        m_hat = self.m / (1 - self.beta1**self.k)
        v_hat = self.v / (1 - self.beta2**self.k)
        return param - self.lr * m_hat / (torch.sqrt(v_hat) + self.eps)


def _unet_grad(ref: ReferenceFPE, z, t: int, context):
    """One UNet row that lets gradients reach ``context`` (no map replacement)."""
    ref.control.replace = False
    return ref.unet(z, torch.full((z.shape[0],), float(t)), encoder_hidden_states=context).sample


@torch.no_grad()
def reference_conditional_inversion(ref: ReferenceFPE, z0, source_prompt: str, steps: int) -> list:
    """DDIM inversion with the source prompt's conditional embedding only (no guidance): z_0 .. z_N."""
    e_c = ref.embed(source_prompt)
    r = ref.T // steps
    traj = [z0]
    z = z0
    for t in reversed(ref.timesteps(steps)):
        eps = ref._unet(z, t, e_c, False)
        z = ref.ddim(z, eps, t - r, t)
        traj.append(z)
    return traj


def reference_null_optimization(
    ref: ReferenceFPE,
    traj: list,
    source_prompt: str,
    steps: int,
    guidance: float,
    inner_steps: int = 10,
    epsilon: float = 1e-5,
) -> tuple[torch.Tensor, list[int]]:
    """Per-step null embeddings (steps, L, D) and the Adam iterations each step took."""
    e_c = ref.embed(source_prompt)
    null = ref.embed("")
    r = ref.T // steps
    z = traj[steps]
    nulls, iterations = [], []
    for i, t in enumerate(ref.timesteps(steps)):
        with torch.no_grad():
            eps_c = _unet_grad(ref, z, t, e_c)
        goal = traj[steps - i - 1]
        adam = ReferenceAdam(lr=1e-2 * (1.0 - i / 100.0))
        done = 0
        for _ in range(inner_steps):
            emb = null.detach().requires_grad_(True)
            with torch.enable_grad():
                eps_u = _unet_grad(ref, z, t, emb)
                z_prev = ref.ddim(z, eps_u + guidance * (eps_c - eps_u), t, t - r)
                loss = ((z_prev - goal) ** 2).mean()
                (grad,) = torch.autograd.grad(loss, emb)
            null = adam.update(null.detach(), grad)
            done += 1
            if loss.item() < epsilon + i * 2e-5:
                break
        nulls.append(null.detach().clone())
        iterations.append(done)
        with torch.no_grad():
            eps = ref._unet(torch.cat([z, z]), t, torch.cat([null, e_c]), False)
            z = ref.ddim(z, eps[0:1] + guidance * (eps[1:2] - eps[0:1]), t, t - r)
    return torch.cat(nulls), iterations


@torch.no_grad()
def reference_edit_with_nulls(
    ref: ReferenceFPE,
    z_T,
    source_prompt: str,
    target_prompt: str,
    nulls: torch.Tensor,
    steps: int,
    guidance: float,
    window,
    layers,
):
    """Algorithm 3's edit: both branches from z_T, step i's null embedding in both uncond rows, the source
    generated (not pinned) with the source prompt, replacement as in Algorithm 1. Returns (z_src, z_tgt)."""
    ref.control.layers = set(layers)
    e_s, e_t = ref.embed(source_prompt), ref.embed(target_prompt)
    replaced = ref._window(steps, window)
    r = ref.T // steps
    zs = zt = z_T.clone()
    for i, t in enumerate(ref.timesteps(steps)):
        null = nulls[i : i + 1]
        ctx = torch.cat([null, e_s, null, e_t])
        eps = ref._unet(torch.cat([zs, zs, zt, zt]), t, ctx, i in replaced)
        zs = ref.ddim(zs, ref._cfg(eps[0:1], eps[1:2], guidance), t, t - r)
        zt = ref.ddim(zt, ref._cfg(eps[2:3], eps[3:4], guidance), t, t - r)
    return zs, zt


# -- Local blending (issue 27): user masks, LocalBlend word masks, and the blend step ------------------------
#
# Written from the semantics alone: numpy cell means and pooling, words found by splitting the prompt
# on spaces (as Prompt-to-Prompt does), the cross-attention recorded by the processor above, and the edit
# loops of this module (every step runs all four rows) with the blend after each step from the start step on.


def reference_user_mask(mask_image, working_size: tuple[int, int], grow: int = 0) -> np.ndarray:
    """(h, w) bool: the mask image at the working size (Lanczos when it differs), brightest channel / 255,
    mean over 8x8 cells > 0.5, dilated by ``grow`` cells (square window)."""
    from PIL import Image

    img = mask_image.convert("RGB")
    if img.size != tuple(working_size):
        img = img.resize(tuple(working_size), Image.Resampling.LANCZOS)
    px = np.asarray(img, dtype=np.float64).max(axis=2) / 255.0
    h, w = px.shape[0] // 8, px.shape[1] // 8
    cells = px.reshape(h, 8, w, 8).mean(axis=(1, 3)) > 0.5
    if grow:
        grown = np.zeros_like(cells)
        for y in range(h):
            for x in range(w):
                grown[y, x] = cells[max(0, y - grow) : y + grow + 1, max(0, x - grow) : x + grow + 1].any()
        cells = grown
    return cells


def reference_word_tokens(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions (0 = start token) of ``word`` in ``prompt``, counting each space-separated word's
    tokens."""
    positions, at = [], 1
    for piece in prompt.split(" "):
        if not piece:
            continue
        n = len(tokenizer.tokenize(piece))
        if piece == word:
            positions.extend(range(at, at + n))
        at += n
    return positions


class ReferenceLocalBlend:
    """The mask of one edit: ``user`` (bool grid or None) united with the word map of each watched row
    (``rows``: row of the 4-row call -> token positions), from the cross-attention of the layers whose query
    grid is 1/4 of the latent side, summed over the steps so far."""

    def __init__(self, latent_hw, user, rows: dict[int, list[int]], threshold: float) -> None:
        self.h, self.w = latent_hw
        self.user = user
        self.rows = {r: p for r, p in rows.items() if p}
        self.threshold = threshold
        self.sums = {r: np.zeros((self.h // 4, self.w // 4)) for r in self.rows}

    def observe(self, recorded: list) -> None:
        grid = (self.h // 4) * (self.w // 4)
        chosen = [p for p in recorded if p.shape[2] == grid]
        for r, positions in self.rows.items():
            per_layer = [p[r].double().mean(dim=0)[:, positions].sum(dim=1) for p in chosen]
            self.sums[r] += torch.stack(per_layer).mean(dim=0).numpy().reshape(self.h // 4, self.w // 4)

    def mask(self) -> np.ndarray:
        out = np.zeros((self.h, self.w), dtype=bool) if self.user is None else self.user.copy()
        for s in self.sums.values():
            gh, gw = s.shape
            padded = np.full((gh + 2, gw + 2), -np.inf)
            padded[1:-1, 1:-1] = s
            pooled = np.array([[padded[y : y + 3, x : x + 3].max() for x in range(gw)] for y in range(gh)])
            up = np.repeat(np.repeat(pooled, self.h // gh, axis=0), self.w // gw, axis=1)
            if up.max() > 0:
                out |= up / up.max() > self.threshold
        return out


def _blended(zs, zt, mask: np.ndarray):
    m = torch.tensor(mask, dtype=torch.float32)[None, None]
    return zs + m * (zt - zs)


@torch.no_grad()
def reference_blend_edit(
    ref: ReferenceFPE,
    *,
    z_T,
    source_prompt: str,
    target_prompt: str,
    steps: int,
    guidance: float,
    window,
    layers,
    start: int | None,
    user=None,
    words: tuple[str, ...] = (),
    threshold: float = 0.3,
    traj: list | None = None,
    nulls=None,
):
    """An FPE edit with local blending after every step ``i >= start`` (``None``: never).

    ``traj`` given: a real edit whose blend source is the trajectory (``traj[steps - i - 1]`` after step i);
    with ``nulls`` (Algorithm 3) the source is generated from z_T with ``source_prompt`` and step i's null,
    else (Algorithm 2) pinned to the trajectory with prompt "". Without ``traj``: a generated edit blending
    onto the generated source. Returns (final target latent, last mask)."""
    ref.control.layers = set(layers)
    e_u, e_s, e_t = ref.embed(""), ref.embed(source_prompt), ref.embed(target_prompt)
    algorithm2 = traj is not None and nulls is None
    rows = {3: [p for w in words for p in reference_word_tokens(ref.tokenizer, target_prompt, w)]}
    if source_prompt and not algorithm2:
        rows[1] = [p for w in words for p in reference_word_tokens(ref.tokenizer, source_prompt, w)]
    blend = ReferenceLocalBlend(tuple(z_T.shape[-2:]), user, rows if words else {}, threshold)
    replaced = ref._window(steps, window)
    r = ref.T // steps
    zs = zt = z_T.clone()
    mask = None
    for i, t in enumerate(ref.timesteps(steps)):
        if algorithm2:
            zs = traj[steps - i]
            ctx = torch.cat([e_u, e_u, e_u, e_t])
        else:
            u = e_u if nulls is None else nulls[i : i + 1]
            ctx = torch.cat([u, e_s, u, e_t])
        ref.control.cross = []
        eps = ref._unet(torch.cat([zs, zs, zt, zt]), t, ctx, i in replaced)
        recorded, ref.control.cross = ref.control.cross, None
        blend.observe(recorded)
        zs = ref.ddim(zs, ref._cfg(eps[0:1], eps[1:2], guidance), t, t - r)
        zt = ref.ddim(zt, ref._cfg(eps[2:3], eps[3:4], guidance), t, t - r)
        if start is not None and i >= start:
            mask = blend.mask()
            zt = _blended(zs if traj is None else traj[steps - i - 1], zt, mask)
    return zt, mask
