"""A UNet call as a value: merging, splitting and padding rows change no row's result; graph keys and the
CUDA-graph bookkeeping (run on the CPU around eager forwards) stay bounded whatever layers a call gates."""

from __future__ import annotations

import pytest
import torch
from helpers import BATCH_SHAPE_TOL
from reference import rel_l2

from fpedit import EditEngine, EditOptions
from fpedit.engine.backends.cuda_graphs import batch_sizes, graph_layers, padded_rows
from fpedit.engine.calls import Donors, UNetCall, UNetResult
from fpedit.engine.maps import Injection

H = W = 16  # latent size of the 128 px test images


def rows(n: int, seed: int, hw: tuple[int, int] = (H, W)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn((n, 4, *hw), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g).float()
    context = torch.randn((n, 77, 32), generator=g)
    return sample, t, context


def source_maps(backend, layers, map_format="qk", seed=9):
    sample, t, ctx = rows(1, seed)
    return backend.unet(UNetCall(sample, t, ctx, map_format, capture=tuple(layers))).maps


def close(a: UNetResult, b: UNetResult) -> None:
    assert (a.noise is None) == (b.noise is None)
    if a.noise is not None:
        assert rel_l2(a.noise, b.noise) < 1e-5
    assert (a.maps is None) == (b.maps is None)
    if a.maps is not None:
        assert a.maps.layers == b.maps.layers
        for layer in a.maps.layers:
            assert rel_l2(a.maps.tensors[layer], b.maps.tensors[layer]) < 1e-5


def mixed_calls(backend, map_format: str) -> list[UNetCall]:
    """A plain call, a capture call, an inject call (cond row only), a capture-only call, a donor call."""
    maps = source_maps(backend, (6, 7, 12), map_format)
    inject = Injection.for_rows(maps.rows([0, 0]), [False, True], (6, 12))
    return [
        UNetCall(*rows(2, 1)),
        UNetCall(*rows(1, 2), map_format, capture=(4, 5)),
        UNetCall(*rows(2, 3), map_format, inject=inject),
        UNetCall(*rows(2, 4), map_format, capture=(3, 13), need_noise_pred=False),
        UNetCall(*rows(3, 5), map_format, donors=Donors.for_rows([0, 1, 1], (2, 7))),
    ]


@pytest.mark.parametrize("map_format", ["qk", "probs"])
def test_merged_call_gives_every_call_its_lone_result(engine, map_format):
    backend = engine.backend
    calls = mixed_calls(backend, map_format)
    alone = [backend.unet(call) for call in calls]
    merged = UNetCall.merge(calls)
    assert merged.rows == 10 and merged.variant == "capture+donors+inject"
    assert merged.capture == (3, 4, 5, 13) and merged.need_noise_pred
    parts = backend.unet(merged).split(calls)
    for lone, part, call in zip(alone, parts, calls, strict=True):
        close(part, lone)
        assert part.maps is None or part.maps.layers == call.capture  # only the layers it asked for
    assert parts[3].noise is None  # capture-only: no noise, as alone


def test_donors_are_the_injection_of_the_same_row(engine):
    """Row 2 borrowing row 1's map in-call equals injecting row 1's captured map."""
    backend = engine.backend
    sample, t, ctx = rows(3, 6)
    layers = (4, 9, 14)
    fused = backend.unet(UNetCall(sample, t, ctx, donors=Donors.for_rows([0, 1, 1], layers)))
    captured = backend.unet(UNetCall(sample[:2], t[:2], ctx[:2], capture=layers))
    inject = Injection.for_rows(captured.maps.rows([1]), [True], layers)
    piped = backend.unet(UNetCall(sample[2:], t[2:], ctx[2:], inject=inject))
    assert rel_l2(fused.noise[:2], captured.noise) < 1e-5
    assert rel_l2(fused.noise[2:], piped.noise) < 1e-5


def test_split_keeps_donor_groups_whole(engine):
    donors = Donors.for_rows([0, 1, 2, 1], (4, 5))
    call = UNetCall(*rows(4, 7), donors=donors)
    two = UNetCall.merge([call, UNetCall(*rows(2, 8)), call])  # rows 1-3 and 7-9 are tied
    assert [piece.rows for piece in two.split(6)] == [6, 4]
    assert [piece.rows for piece in two.split(4)] == [4, 3, 3]  # row 0 of each call is free
    with pytest.raises(ValueError, match="share maps"):
        call.split(2)
    whole = engine.backend.unet(two)
    pieces = UNetResult.cat([engine.backend.unet(piece) for piece in two.split(4)])
    assert rel_l2(pieces.noise, whole.noise) < 1e-5
    with pytest.raises(ValueError, match="borrows"):
        call.slice(2, 4)


def test_incompatible_calls_refuse_to_merge():
    qk = UNetCall(*rows(1, 1), "qk", capture=(4,))
    probs = UNetCall(*rows(1, 1), "probs", capture=(4,))
    other_size = UNetCall(*rows(1, 1, (8, 8)))
    assert not qk.compatible(probs) and not qk.compatible(other_size)
    assert qk.compatible(UNetCall(*rows(1, 2))) and probs.compatible(UNetCall(*rows(1, 2)))  # plain rows join
    with pytest.raises(ValueError, match="cannot share"):
        UNetCall.merge([qk, probs])


def test_padded_rows_change_nothing(engine):
    backend = engine.backend
    maps = source_maps(backend, (5, 6))
    call = UNetCall(
        *rows(3, 11), inject=Injection.for_rows(maps.rows([0, 0, 0]), [True, False, True], (5, 6))
    )
    padded = call.padded(8)
    assert padded.rows == 8 and not bool(padded.inject.gate[3:].any())
    result = backend.unet(padded)
    assert rel_l2(result.noise[:3], backend.unet(call).noise) < 1e-5
    assert [padded_rows(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert batch_sizes(6) == (1, 2, 4, 6)


def test_graph_key_ignores_layer_subsets_and_gates(engine):
    maps = source_maps(engine.backend, range(4, 15))
    keys = set()
    for layers in ((4,), (5, 9), tuple(range(4, 15))):
        for gate in ([False, True], [True, True]):
            call = UNetCall(*rows(2, 1), inject=Injection.for_rows(maps.rows([0, 0]), gate, layers))
            keys.add(call.graph_key(graph_layers(call)))
    assert len(keys) == 1
    plain, capture = UNetCall(*rows(2, 1)), UNetCall(*rows(2, 1), capture=(4,))
    assert len({c.graph_key(graph_layers(c)) for c in (plain, capture, plain.padded(4))}) == 3
    assert graph_layers(UNetCall(*rows(1, 1), capture=(2,))) == tuple(range(1, 17))


def test_graph_cache_replays_any_layer_subset_and_stays_bounded(model_dir, engine):
    """The CUDA-graph bookkeeping (padding, dense gates, static buffers, LRU), replayed by eager forwards on
    the CPU: every call's result equals the plain eager backend's, and graphs are captured per variant and
    batch size only."""
    graphed = EditEngine.from_pretrained(model_dir, backend_options={"cuda_graphs": True, "max_graphs": 3})
    graphs = graphed.backend.graphs
    eager = engine.backend
    maps = source_maps(eager, range(1, 17))
    for layers in ((4, 5), (6, 12, 14), (8,)):
        for n, gate in ((2, [False, True]), (3, [True, False, True])):
            inject = Injection.for_rows(maps.rows([0] * n), gate, layers)
            call = UNetCall(*rows(n, n), inject=inject)
            assert rel_l2(graphed.backend.unet(call).noise, eager.unet(call).noise) < 1e-5
        capture = UNetCall(*rows(2, 4), capture=layers, need_noise_pred=False)
        got, want = graphed.backend.unet(capture), eager.unet(capture)
        assert got.noise is None and got.maps.layers == layers
        for layer in layers:
            assert rel_l2(got.maps.tensors[layer], want.maps.tensors[layer]) < 1e-5
    assert graphs.captures == 3  # inject at 2 and 4 rows, capture-only at 2: not per layer subset or gate
    donors = UNetCall(*rows(4, 5), donors=Donors.for_rows([0, 1, 2, 1], (4, 7)))
    assert rel_l2(graphed.backend.unet(donors).noise, eager.unet(donors).noise) < 1e-5
    assert graphs.captures == 4 and len(graphs) == 3  # the LRU bound evicted the oldest


def test_graph_static_inputs_are_the_graphs_own(model_dir):
    """The call that creates a graph key lends it no tensor: a one-row inject whose maps are a contiguous view
    of cached source maps (a re-edit's call cut into one-row pieces) must not become the graph's static
    input, or every later call of that key copies its maps into the cache."""
    backend = EditEngine.from_pretrained(model_dir, backend_options={"cuda_graphs": True}).backend
    cached = source_maps(backend, (4, 5), seed=9)
    kept = {layer: t.clone() for layer, t in cached.tensors.items()}
    other = source_maps(backend, (4, 5), seed=10)
    for maps, seed in ((cached, 1), (other, 2)):  # the same graph key twice
        backend.unet(UNetCall(*rows(1, seed), inject=Injection.for_rows(maps.rows([0]), [True], (4, 5))))
    assert backend.graphs.captures == 2  # the capture-only key and the inject key
    for layer, tensor in cached.tensors.items():
        assert torch.equal(tensor, kept[layer])


def test_generated_edit_with_small_max_batch(model_dir, engine):
    """max_batch applies to every call: a 4-row fused step no longer fits 3 rows, so the step pipes."""
    small = EditEngine.from_pretrained(model_dir, backend_options={"max_batch": 3})
    z = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(4))
    opts = EditOptions(steps=4)
    a = small.edit_generated("a cat", "a dog", latents=z, options=opts)
    b = engine.edit_generated("a cat", "a dog", latents=z, options=opts)
    # 2-row piped calls vs 4-row fused ones over 4 steps: equal up to the rounding of other batch shapes.
    assert rel_l2(a.edited_latents, b.edited_latents) < BATCH_SHAPE_TOL
    assert max(small.counters()["batch_rows"]) <= 3


def test_rows_keep_their_adapter_sets_through_merge_slice_split_and_padding():
    """Calls of different sets merge into one call carrying a set per row (the scale matrix has 0 where a
    row's set lacks a name); a piece or a merge whose rows agree is a plain one-set call again."""
    a = UNetCall(*rows(2, 1), adapters=(("ink", 0.5),))
    b = UNetCall(*rows(1, 2), adapters=(("ink", -1.0), ("oil", 2.0)))
    plain = UNetCall(*rows(1, 3))
    assert not a.compatible(b) and a.compatible(b, mix_adapters=True)
    assert UNetCall.merge([a, a]).row_adapters is None and UNetCall.merge([a, a]).adapters == a.adapters
    merged = UNetCall.merge([a, b, plain])
    assert merged.adapters == () and merged.row_sets == (*a.row_sets, *b.row_sets, ())
    assert merged.adapter_names == ("ink", "oil")
    expected = torch.tensor([[0.5, 0.5, -1.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    assert torch.equal(merged.adapter_scales(), expected)
    assert merged.graph_key(())[-1] == ("ink", "oil")
    head = merged.slice(0, 2)  # a's rows only: one set again, no per-row work
    assert head.row_adapters is None and head.adapters == a.adapters
    assert [piece.row_sets for piece in merged.split(3)] == [merged.row_sets[:3], ((),)]
    padded = merged.padded(8)
    assert padded.row_sets == (*merged.row_sets, *((),) * 4)
    assert torch.equal(padded.adapter_scales()[:, :4], expected)
    assert a.padded(4).row_adapters is None and torch.equal(
        a.padded(4).adapter_scales(), torch.full((1, 4), 0.5)
    )
    with pytest.raises(ValueError, match="one set per sample"):
        UNetCall(*rows(2, 1), row_adapters=((),))


def test_take_batch_mixes_sets_only_to_fill_rows():
    """With mixing the oldest call's own set goes first; other sets fill what is left; grouping never mixes."""
    from fpedit.engine.executor import take_batch

    class Shares:
        def can_share_call(self, a, b, mix_adapters=False):
            return a.compatible(b, mix_adapters)

    def call(name: str, n: int = 2) -> UNetCall:
        return UNetCall(*rows(n, 1), adapters=((name, 1.0),))

    order = [call("a"), call("b"), call("c"), call("a"), call("b", 4)]
    for mix, first in ((True, ["a", "b", "a"]), (False, ["a", "a"])):
        pending = list(order)
        batch = take_batch(pending, lambda c: c, Shares(), 6, mix)
        assert [c.adapter_names[0] for c in batch] == first  # arrival order kept
        assert len(pending) == len(order) - len(batch)
    pending = list(order)
    take_batch(pending, lambda c: c, Shares(), 6, True)
    assert [c.adapter_names[0] for c in pending] == ["c", "b"]
