"""FPE's algorithms as step programs: generators that yield the UNet calls they need and receive the results.

A program knows nothing of backends, batching, devices or timing: it yields a :class:`Step` (one
:class:`~fpedit.engine.calls.UNetCall` and where it stands: stage, step, total) and gets the call's
:class:`~fpedit.engine.calls.UNetResult` back from whatever runs it (:mod:`.executor`): alone, call by call,
or merged with other requests' calls into shared batches. Each program reads as the algorithm does
(``tests/reference.py`` is the unshortened original); the exact shortcuts of docs/design.md live in how the
calls are built:

* a source prompt of "" needs one UNet row, not two (guidance on identical rows is the identity);
* the first inversion step (t = 0) maps z_0 to itself: no call;
* a real edit's source rows run only for their maps, only inside the replacement window, in a few large
  capture-only calls once the trajectory is known (:func:`capture_source_maps`), and those maps can be
  reused by later edits of the same inversion;
* a generated edit's replaced step is one call with in-call donors where the backend offers them, or a
  capture call and an inject call: chosen once, before the loop (:func:`generated_edit`);
* Algorithm 3's source branch (:func:`generate_source`) runs once per inversion, not per edit.

The attention maps of Figure 3 are programs too (:func:`generated_attention_maps`,
:func:`pinned_attention_maps`): ``qk`` captures and cross-attention probabilities, summed over steps.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch

from .calls import Donors, UNetCall, UNetResult
from .local_blend import BlendRun, reduce_cross
from .maps import AttentionMaps, Injection
from .plan import EditPlan
from .schedule import DDIMSchedule

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """What a program asks for next: ``call``, step ``index`` (1-based) of ``total`` in ``stage`` (the name
    its time is counted under: ``"inversion"``, ``"source_capture"``, ``"denoise"``, ``"target_denoise"``),
    reported to progress callbacks as ``progress_stage`` (the stage itself unless given)."""

    stage: str
    index: int
    total: int
    call: UNetCall
    progress: str | None = None

    @property
    def progress_stage(self) -> str:
        return self.progress or self.stage


#: A program yields steps, receives each step's result, and returns its outcome.
Program = Generator[Step, UNetResult, T]
#: A step's position bound, waiting for its call.
StepAt = Callable[[UNetCall], Step]


def guide(noise: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance over (uncond, cond) rows; a single row is its own guidance."""
    if noise.shape[0] == 1:
        return noise
    uncond, cond = noise.chunk(2)
    return uncond + scale * (cond - uncond)


def rows_of(z: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of the one latent ``z`` (a view, no copy)."""
    return z.expand(n, *z.shape[1:])


# --- Algorithm 2, first half: DDIM inversion --------------------------------------------------------------


def invert(z0: torch.Tensor, schedule: DDIMSchedule, uncond: torch.Tensor) -> Program[torch.Tensor]:
    """DDIM-invert ``z0`` with prompt "" (one row: guidance on "" is the identity); returns the trajectory
    ``traj[0] = z_0 ... traj[N] = z_T``, (N + 1, C, h, w) float32."""
    n = schedule.steps
    ts = schedule.timestep_tensor(z0.device, inversion=True)
    trajectory = torch.empty((n + 1, *z0.shape[1:]), dtype=torch.float32, device=z0.device)
    trajectory[0] = trajectory[1] = z0[0]  # the t = 0 step maps z_0 to itself (alpha_t == alpha_next)
    z = z0
    for k in range(1, n):
        result = yield Step("inversion", k, n - 1, UNetCall(z, ts[k : k + 1], uncond))
        z = schedule.invert_step(result.noise, k, z)
        trajectory[k + 1] = z[0]
    return trajectory


# --- Algorithm 2, second half: the real edit --------------------------------------------------------------


def capture_source_maps(
    trajectory: torch.Tensor, plan: EditPlan, steps: Sequence[int], uncond: torch.Tensor, batch: int
) -> Program[dict[int, AttentionMaps]]:
    """The pinned source branch's maps (``plan.capture_layers``) for denoising ``steps``: step i's source
    row is ``traj[N - i]`` at ``t_i`` with prompt "", independent of every other step, so they run ``batch``
    rows per call, stopping after the last captured layer (the noise is never used)."""
    n = plan.steps
    ts = plan.schedule.timestep_tensor(trajectory.device)
    maps: dict[int, AttentionMaps] = {}
    for lo in range(0, len(steps), batch):
        part = list(steps[lo : lo + batch])
        call = UNetCall(
            sample=torch.stack([trajectory[n - i] for i in part]),
            timesteps=ts[part],
            context=rows_of(uncond, len(part)),
            map_format=plan.map_format,
            capture=plan.capture_layers,
            need_noise_pred=False,
        )
        result = yield Step("source_capture", lo + len(part), len(steps), call)
        assert result.maps is not None
        for row, i in enumerate(part):  # copies: a kept row must not hold its whole (maybe shared) batch
            maps[i] = AttentionMaps(
                result.maps.format, {k: t[row : row + 1].clone() for k, t in result.maps.tensors.items()}
            )
    return maps


def denoise_target(
    z_T: torch.Tensor,
    plan: EditPlan,
    context_at: Callable[[int], torch.Tensor],
    source_maps: dict[int, AttentionMaps],
    blend: BlendRun | None = None,
) -> Program[torch.Tensor]:
    """Denoise the target from ``z_T`` with rows (uncond, cond) of ``context_at(i)`` at step i; in every step
    of ``source_maps`` its conditional row attends with the source's map in ``plan.layers``. Returns the final
    latent. Algorithm 2 gives one context for every step; Algorithm 3 gives step i's null embedding as the
    unconditional row. A ``blend`` holds the latent to the pinned source outside its mask after each step."""
    schedule = plan.schedule
    ts = schedule.timestep_tensor(z_T.device)
    n = schedule.steps
    z = z_T
    for i in range(n):
        inject = None
        if i in source_maps:
            inject = Injection.for_rows(source_maps[i].rows([0, 0]), [False, True], plan.layers)
        cross = blend.cross_probs if blend is not None else ()
        call = UNetCall(
            rows_of(z, 2),
            ts[i : i + 1].expand(2),
            context_at(i),
            plan.map_format,
            inject=inject,
            cross_probs=cross,
        )
        result = yield Step("target_denoise", i + 1, n, call, progress="denoise")
        z = schedule.step(guide(result.noise, plan.guidance), i, z)
        if blend is not None:
            blend.observe(i, result.cross, {"target": 1})
            z = blend.apply(i, z)
    return z


# --- Algorithm 1: generated images ------------------------------------------------------------------------


def generated_edit(
    z_T: torch.Tensor,
    plan: EditPlan,
    source_context: torch.Tensor,
    target_context: torch.Tensor,
    *,
    donors: bool,
    blend: BlendRun | None = None,
) -> Program[tuple[torch.Tensor, torch.Tensor]]:
    """Source and target from the same ``z_T``; in the plan's replaced steps the target's conditional row
    attends with the source's conditional map in ``plan.layers``. ``source_context`` is (uncond, cond) or
    just (uncond) for the source prompt "". With ``donors`` a replaced step is one call (the target's cond row
    borrows the source's map in-call); else the source rows capture ``plan.capture_layers`` and the target
    rows inject them. A ``blend`` holds the target to the source outside its mask after each step. Returns the
    final (source, target) latents."""
    schedule, layers, map_format, guidance = plan.schedule, plan.layers, plan.map_format, plan.guidance
    replaced = set(plan.replaced)
    ts = schedule.timestep_tensor(z_T.device)
    n, n_src = schedule.steps, source_context.shape[0]
    context = torch.cat([source_context, target_context])
    source_cond = n_src - 1
    borrow = Donors.for_rows([*range(n_src + 1), source_cond], layers)
    cross = blend.cross_probs if blend is not None else ()
    # The conditional rows whose cross-attention a word blend reads (a source prompt "" has none).
    cross_rows = {"target": n_src + 1, **({"source": source_cond} if n_src == 2 else {})}

    def fused_step(step: StepAt, rows: torch.Tensor, t: torch.Tensor) -> Program[UNetResult]:
        """One call: the target's cond row (last) attends with the source's cond row's map."""
        return (yield step(UNetCall(rows, t, context, map_format, donors=borrow, cross_probs=cross)))

    def piped_step(step: StepAt, rows: torch.Tensor, t: torch.Tensor) -> Program[UNetResult]:
        """Two calls: the source rows capture their maps, the target rows inject the source cond row's."""
        src, tgt = slice(0, n_src), slice(n_src, None)
        source = yield step(
            UNetCall(
                rows[src], t[src], source_context, map_format, capture=plan.capture_layers, cross_probs=cross
            )
        )
        assert source.maps is not None
        inject = Injection.for_rows(source.maps.rows([source_cond, source_cond]), [False, True], layers)
        target = yield step(
            UNetCall(rows[tgt], t[tgt], target_context, map_format, inject=inject, cross_probs=cross)
        )
        return UNetResult.cat(
            [UNetResult(source.noise, None, source.cross), UNetResult(target.noise, None, target.cross)]
        )

    replaced_step = fused_step if donors else piped_step
    z_src = z_tgt = z_T
    for i in range(n):
        step = partial(Step, "denoise", i + 1, n)
        rows = torch.cat([rows_of(z_src, n_src), rows_of(z_tgt, 2)])
        t = ts[i : i + 1].expand(n_src + 2)
        if i in replaced:
            result = yield from replaced_step(step, rows, t)
        else:
            result = yield step(UNetCall(rows, t, context, cross_probs=cross))
        eps = result.noise
        z_src = schedule.step(guide(eps[:n_src], guidance), i, z_src)
        z_tgt = schedule.step(guide(eps[n_src:], guidance), i, z_tgt)
        if blend is not None:
            blend.observe(i, result.cross, cross_rows)
            z_tgt = blend.apply(i, z_tgt, z_src)
    return z_src, z_tgt


# --- Algorithm 3: real images with a source prompt (null-text or negative-prompt inversion) ---------------
#
# The source branch is generated from z_T (not pinned) and does not depend on the target prompt: it runs once
# (:func:`generate_source`), and its maps and final latent can be kept on the inversion, so a further edit is
# the target branch alone (:func:`denoise_target` with step i's null embedding as the unconditional row).


def generate_source(
    z_T: torch.Tensor,
    plan: EditPlan,
    source_cond: torch.Tensor,
    nulls: torch.Tensor | None,
    cross_layers: tuple[int, ...] = (),
    cross_out: list[torch.Tensor] | None = None,
) -> Program[tuple[torch.Tensor, dict[int, AttentionMaps]]]:
    """The source branch, generated from ``z_T`` with the source prompt and step i's null embedding
    (``nulls[i]``; with ``nulls`` None the null is the source prompt's own embedding, the two rows are
    identical and one is run). Captures the conditional row's maps (``plan.capture_layers``) in the plan's
    replaced steps; with ``cross_layers``, appends each step's conditional-row cross-attention probabilities
    (averaged over those layers) to ``cross_out`` (a word blend's source maps). Returns (z_0, maps)."""
    schedule = plan.schedule
    ts = schedule.timestep_tensor(z_T.device)
    n = schedule.steps
    replaced = set(plan.replaced)
    maps: dict[int, AttentionMaps] = {}
    z = z_T
    for i in range(n):
        context = source_cond if nulls is None else torch.cat([nulls[i : i + 1], source_cond])
        rows = context.shape[0]
        capture = plan.capture_layers if i in replaced else ()
        call = UNetCall(
            rows_of(z, rows),
            ts[i : i + 1].expand(rows),
            context,
            plan.map_format,
            capture,
            cross_probs=cross_layers,
        )
        result = yield Step("source_generate", i + 1, n, call)
        if cross_layers and cross_out is not None:
            assert result.cross is not None
            cross_out.append(reduce_cross(result.cross, rows - 1))
        if capture:
            assert result.maps is not None
            # A copy of the conditional row: a view would keep a whole (maybe merged) batch alive.
            maps[i] = AttentionMaps(
                result.maps.format, {k: t[rows - 1 : rows].clone() for k, t in result.maps.tensors.items()}
            )
        z = schedule.step(guide(result.noise, plan.guidance), i, z)
    return z, maps


# --- attention maps (the paper's Figure 3) ----------------------------------------------------------------
#
# The maps of one row, averaged over steps: the cross-attention probabilities come from the calls'
# ``cross_probs``, the self-attention probabilities are computed here from the captured ``qk`` maps (capture
# leaves the forward unchanged, so the generated trajectory is a plain generation's).


@dataclass
class MapSums:
    """Per layer, step sums of one row's head-averaged attention probabilities (float32): ``cross``
    (query tokens, text tokens), ``self_maps`` (query tokens, query tokens); ``steps`` calls added."""

    cross: dict[int, torch.Tensor]
    self_maps: dict[int, torch.Tensor]
    steps: int = 0

    @classmethod
    def empty(cls) -> MapSums:
        return cls({}, {})

    def add(self, result: UNetResult, row: int, heads: dict[int, int]) -> None:
        """Add ``row`` of a call that captured ``qk`` maps and asked for ``cross_probs`` in every layer of
        ``heads`` (layer -> attention heads)."""
        assert result.maps is not None and result.cross is not None
        for layer, n_heads in heads.items():
            cross = result.cross[layer][row]
            self_map = self_attention_probs(result.maps.tensors[layer][row], n_heads)
            for store, probs in ((self.cross, cross), (self.self_maps, self_map)):
                store[layer] = store[layer] + probs if layer in store else probs
        self.steps += 1


def self_attention_probs(qk: torch.Tensor, heads: int) -> torch.Tensor:
    """One row's self-attention probabilities averaged over heads, float32 (N, N), from its ``qk`` map
    (2, N, C): softmax(q k^T / sqrt(head dim)), as the layer's attention computes them."""
    q, k = qk[0], qk[1]
    tokens, channels = q.shape
    head_dim = channels // heads
    q = q.reshape(tokens, heads, head_dim).transpose(0, 1).float()
    k = k.reshape(tokens, heads, head_dim).transpose(0, 1).float()
    return (q @ k.transpose(-1, -2) * head_dim**-0.5).softmax(dim=-1).mean(dim=0)


def generated_attention_maps(
    z_T: torch.Tensor,
    schedule: DDIMSchedule,
    context: torch.Tensor,
    guidance: float,
    recorded: Sequence[int],
    heads: dict[int, int],
) -> Program[tuple[torch.Tensor, MapSums]]:
    """Algorithm 1's source branch from ``z_T`` with rows (uncond, cond) of ``context``; in the steps of
    ``recorded`` the conditional row's maps of the layers of ``heads`` are added up. Returns (z_0, sums)."""
    ts = schedule.timestep_tensor(z_T.device)
    n = schedule.steps
    layers = tuple(sorted(heads))
    chosen = set(recorded)
    sums = MapSums.empty()
    z = z_T
    for i in range(n):
        wanted = layers if i in chosen else ()
        call = UNetCall(rows_of(z, 2), ts[i : i + 1].expand(2), context, "qk", wanted, cross_probs=wanted)
        result = yield Step("denoise", i + 1, n, call)
        if wanted:
            sums.add(result, 1, heads)
        z = schedule.step(guide(result.noise, guidance), i, z)
    return z, sums


def pinned_attention_maps(
    latent_at: Callable[[int], torch.Tensor],
    schedule: DDIMSchedule,
    cond: torch.Tensor,
    recorded: Sequence[int],
    heads: dict[int, int],
) -> Program[MapSums]:
    """A real image's maps: in each step i of ``recorded``, its inverted trajectory's latent
    ``latent_at(i)`` at t_i with the prompt ``cond`` (one row); the maps of the layers of ``heads`` are added
    up. The full forward runs: a capture-only call would stop before the last layer's cross-attention."""
    ts = schedule.timestep_tensor(cond.device)
    layers = tuple(sorted(heads))
    sums = MapSums.empty()
    for k, i in enumerate(recorded):
        call = UNetCall(latent_at(i), ts[i : i + 1], cond, "qk", layers, cross_probs=layers)
        result = yield Step("attention_maps", k + 1, len(recorded), call)
        sums.add(result, 0, heads)
    return sums
