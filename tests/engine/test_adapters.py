"""Per-request LoRA adapters (issue 29): an engine with ``lora_dir`` applies a request's adapters exactly as
weights this test merges by hand (W + scale * alpha / r * B @ A, from the files' own tensors), keeps requests
with different sets apart while batching them (grouped by set, or mixed in one call with a scale per row),
and refuses what it cannot serve, naming it."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_image
from helpers import BATCH_SHAPE_TOL, run_concurrently
from lora_files import (
    file_deltas,
    folder_with_deltas,
    text_targets,
    unet_targets,
    write_peft_and_kohya,
)
from reference import rel_l2

from fpedit import EditEngine, EditOptions
from fpedit.engine.calls import UNetCall
from fpedit.engine.errors import InvalidInputError

pytest.importorskip("peft")

SRC, TGT = "a photo of a cat", "a photo of a dog"
TOL = 1e-5  # the LoRA tests' tolerance against hand-merged weights


def z_T(seed: int = 9) -> torch.Tensor:
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def edit(engine: EditEngine, adapters=(), seed: int = 9) -> torch.Tensor:
    options = EditOptions(steps=2, adapters=adapters)
    return torch.as_tensor(engine.edit_generated(SRC, TGT, latents=z_T(seed), options=options).edited_latents)


@pytest.fixture(scope="module")
def lora_dir(raw_modules, tmp_path_factory):
    """``peft`` (UNet only, alpha 2) and ``kohya`` (UNet + text encoder, alpha 1) on the same modules."""
    folder = write_peft_and_kohya(tmp_path_factory.mktemp("adapters"), raw_modules, ("peft", "kohya"), 11)
    (folder / "notes.txt").write_text("not an adapter")
    return folder


@pytest.fixture(scope="module")
def modules(raw_modules) -> dict[str, list[str]]:
    return {
        "unet": sorted(unet_targets(raw_modules["unet"])),
        "text_encoder": sorted(text_targets(raw_modules["text_encoder"])),
    }


def batching_engine(model_dir, lora_dir, adapter_batching: str):
    engine = EditEngine.from_pretrained(
        model_dir, lora_dir=lora_dir, batching=True, max_wait_ms=30, adapter_batching=adapter_batching
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def adapter_engine(model_dir, lora_dir):
    yield from batching_engine(model_dir, lora_dir, "mix")


@pytest.fixture(scope="module")
def group_engine(model_dir, lora_dir):
    yield from batching_engine(model_dir, lora_dir, "group")


def record_calls(engine: EditEngine, monkeypatch) -> list[UNetCall]:
    """The backend calls ``engine`` runs from now on, as the device loop merged them."""
    calls: list[UNetCall] = []
    unet = engine.backend.unet

    def recording(call: UNetCall):
        calls.append(call)
        return unet(call)

    monkeypatch.setattr(engine.backend, "unet", recording)
    return calls


def hand_merged(model_dir, lora_dir, modules, adapters, out) -> EditEngine:
    """An engine on a copy of the model with each adapter's scaled delta added to its weights."""
    total: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for name, scale in adapters:
        for component, deltas in file_deltas(lora_dir / f"{name}.safetensors", scale, modules).items():
            for module, delta in deltas.items():
                total[component][module] = total[component].get(module, 0) + delta
    return EditEngine.from_pretrained(folder_with_deltas(model_dir, out, total))


@pytest.mark.parametrize(
    "adapters",
    [(("peft", 0.7),), (("kohya", 1.5),), (("kohya", -1.2), ("peft", 0.7))],
    ids=["peft", "kohya", "both"],
)
def test_adapters_equal_hand_merged_weights(
    model_dir, engine, adapter_engine, lora_dir, modules, adapters, tmp_path
):
    expected = hand_merged(model_dir, lora_dir, modules, adapters, tmp_path / "merged")
    got = edit(adapter_engine, adapters)
    assert rel_l2(got, edit(expected)) < TOL
    assert rel_l2(got, edit(engine)) > 100 * TOL  # the adapters moved the edit: the comparison can fail
    # The same engine without adapters is the plain model: the hooks only act inside a call of a set.
    assert rel_l2(edit(adapter_engine), edit(engine)) < TOL


def test_info_lists_the_offered_adapters(adapter_engine, modules):
    info = adapter_engine.info()
    by_name = {a["name"]: a for a in info["adapters"]}
    assert sorted(by_name) == ["kohya", "peft"] and info["max_adapters"] == 4
    assert by_name["peft"]["rank"] == by_name["kohya"]["rank"] == 4
    assert by_name["peft"]["layers"] == [f"unet.{m}" for m in modules["unet"]]
    assert by_name["kohya"]["layers"] == sorted(
        [f"unet.{m}" for m in modules["unet"]] + [f"text_encoder.{m}" for m in modules["text_encoder"]]
    )


THREE_SETS = [(("peft", 1.0),), (("kohya", 0.8),), (("kohya", 0.5), ("peft", -0.5))]
#: Eight different sets (scales count: ``peft:1`` and ``peft:-0.6`` are two sets), none included: more sets
#: than the 2 generated edits (4 rows each) a call of ``max_batch`` 8 holds.
EIGHT_SETS = [
    (),
    (("peft", 1.0),),
    (("peft", -0.6),),
    (("kohya", 0.8),),
    (("kohya", -1.0),),
    (("kohya", 0.5), ("peft", -0.5)),
    (("kohya", 1.2), ("peft", 0.3)),
    (("peft", 2.0),),
]


@pytest.mark.parametrize("sets", [THREE_SETS, EIGHT_SETS], ids=["3-sets", "8-sets"])
@pytest.mark.parametrize("adapter_batching", ["mix", "group"])
def test_eight_concurrent_requests_over_several_sets_equal_their_solo_runs(
    request, adapter_batching, sets, monkeypatch
):
    """Batching on: each request equals its solo run, so no request sees another set's weights, whether
    calls of different sets share backend calls (mix: some calls carry rows of several sets, and with eight
    sets calls still carry more than one request) or not (group: every call is of one set)."""
    engine = request.getfixturevalue("adapter_engine" if adapter_batching == "mix" else "group_engine")
    jobs = [(sets[i % len(sets)], 20 + i) for i in range(8)]
    solo = [edit(engine, adapters, seed) for adapters, seed in jobs]
    calls = record_calls(engine, monkeypatch)
    together = run_concurrently([lambda a=a, s=s: edit(engine, a, s) for a, s in jobs])
    for i, (alone, got) in enumerate(zip(solo, together, strict=True)):
        assert not isinstance(got, Exception), (i, got)
        assert rel_l2(got, alone) < BATCH_SHAPE_TOL, (i, jobs[i][0])
    # Every set moves the edit away from the others (were weights shared, the solo runs could not match).
    assert min(rel_l2(solo[i], solo[j]) for i in range(len(sets)) for j in range(i)) > 1e-2
    mixed = [call for call in calls if call.row_adapters is not None]
    rows_per_call = sum(call.rows for call in calls) / len(calls)
    if adapter_batching == "group":
        assert not mixed and all(len(set(call.row_sets)) == 1 for call in calls)
    else:
        assert all(len(set(call.row_sets)) > 1 for call in mixed)
        # With eight different sets any call of two requests mixes (with three, whether a leftover row is
        # filled from another set depends on arrival order: take_batch's own test pins that down).
        assert mixed or sets is THREE_SETS
    if sets is THREE_SETS or adapter_batching == "mix":
        assert rows_per_call > 4  # calls carried rows of several requests (a lone edit's calls: 4 rows)
    else:
        assert rows_per_call == 4  # eight sets, grouped: every call is one request's


def test_auto_adapter_batching_mixes_eagerly_and_groups_under_cuda_graphs(model_dir):
    """``auto`` (the default): mixing where calls run eagerly, grouping where graphs replay (mixed calls would
    key a graph per combination of names); an explicit choice stands."""
    built = [
        EditEngine.from_pretrained(model_dir, batching=True),
        EditEngine.from_pretrained(model_dir, batching=True, backend_options={"cuda_graphs": True}),
        EditEngine.from_pretrained(
            model_dir, batching=True, adapter_batching="mix", backend_options={"cuda_graphs": True}
        ),
    ]
    try:
        assert [e.info()["adapter_batching"] for e in built] == ["mix", "group", "mix"]
    finally:
        for e in built:
            e.close()


def test_fp16_rows_give_the_same_in_a_graph_in_a_mixed_call_and_alone(model_dir, lora_dir):
    """In fp16 a row's LoRA term is rounded once, whichever way the call carries its scales: a one-set call
    (a number), a mixed call and a graph replay (per-row float32 vectors) agree to fp16 rounding (a factor
    rounded to fp16 first gave 3e-3 at scale -0.6)."""
    eager = EditEngine.from_pretrained(model_dir, lora_dir=lora_dir, dtype="float16")
    graphs = EditEngine.from_pretrained(
        model_dir, lora_dir=lora_dir, dtype="float16", backend_options={"cuda_graphs": True}
    )
    sets = [(("peft", -0.6),), (("kohya", 0.7), ("peft", 0.3))]
    sample, timesteps, context = unet_rows(2, 5)
    context = context.half()
    alone = [
        eager.backend.unet(
            UNetCall(sample[i : i + 1], timesteps[i : i + 1], context[i : i + 1], adapters=s)
        ).noise
        for i, s in enumerate(sets)
    ]
    mixed = UNetCall.merge(
        [
            UNetCall(sample[i : i + 1], timesteps[i : i + 1], context[i : i + 1], adapters=s)
            for i, s in enumerate(sets)
        ]
    )
    assert mixed.row_adapters is not None
    for backend in (eager.backend, graphs.backend):
        together = backend.unet(mixed).noise
        for i in range(2):
            assert rel_l2(together[i : i + 1], alone[i]) < 2e-4, (backend, i)
    replayed = graphs.backend.unet(UNetCall(sample[:1], timesteps[:1], context[:1], adapters=sets[0])).noise
    assert rel_l2(replayed, alone[0]) < 2e-4
    plain = eager.backend.unet(UNetCall(sample[:1], timesteps[:1], context[:1])).noise
    assert rel_l2(alone[0], plain) > 1e-2  # the adapters change the rows: the comparisons above can fail


def unet_rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn((n, 4, 8, 8), generator=g)
    return sample, torch.randint(0, 1000, (n,), generator=g).float(), torch.randn((n, 77, 32), generator=g)


def test_a_mixed_call_gives_each_row_its_own_sets_weights(
    model_dir, engine, adapter_engine, lora_dir, modules, tmp_path
):
    """One backend call carrying rows of three sets (one of them none) gives each row what weights merged by
    hand at the row's own set give it alone, eagerly and through the CUDA-graph CPU mode; there a second mix
    of the same names at other scales and rows, and a one-set call of those names, capture nothing new."""
    graphs = EditEngine.from_pretrained(model_dir, lora_dir=lora_dir, backend_options={"cuda_graphs": True})
    mixes = [
        [(("peft", 0.7),), (("kohya", -1.2), ("peft", 0.7)), ()],
        [(("kohya", 0.4),), (("peft", -0.3),), (("kohya", 1.0), ("peft", 1.5))],
    ]
    captures = []
    for k, sets in enumerate(mixes):
        calls = [
            UNetCall(*unet_rows(n, 10 * k + n), adapters=s) for n, s in zip((2, 1, 2), sets, strict=True)
        ]
        merged = UNetCall.merge(calls)
        assert merged.row_adapters is not None and merged.adapter_names == ("kohya", "peft")
        expected = [
            (hand_merged(model_dir, lora_dir, modules, s, tmp_path / describe(s)) if s else engine)
            .backend.unet(UNetCall(c.sample, c.timesteps, c.context))
            .noise
            for c, s in zip(calls, sets, strict=True)
        ]
        for backend in (adapter_engine.backend, graphs.backend):
            parts = backend.unet(merged).split(calls)
            for part, want, s in zip(parts, expected, sets, strict=True):
                assert rel_l2(part.noise, want) < TOL, (backend.graphs is not None, s)
        captures.append(graphs.backend.graphs.captures)
    assert captures[0] > 0 and captures[1] == captures[0]  # the scales (per row) are the graph's inputs
    one_set = UNetCall(*unet_rows(5, 3), adapters=(("kohya", 0.2), ("peft", 0.9)))
    graphs.backend.unet(one_set)
    assert graphs.backend.graphs.captures == captures[0]  # a one-set call of the names: the same graph


def test_an_inversion_is_edited_only_under_its_own_set(adapter_engine):
    image = make_image(64, 64, seed=5)
    with_peft = EditOptions(steps=2, adapters=[("peft", 1.0)])
    inversion = adapter_engine.invert(image, options=with_peft)
    assert inversion.adapters == (("peft", 1.0),)
    adapter_engine.edit_real(inversion, "a dog", options=with_peft)  # its own set: fine
    with pytest.raises(InvalidInputError, match=r"adapters peft:1.*asks kohya:1") as info:
        adapter_engine.edit_real(inversion, "a dog", options=EditOptions(steps=2, adapters=["kohya"]))
    assert info.value.field == "adapters"
    with pytest.raises(InvalidInputError, match=r"adapters peft:1.*asks none"):
        adapter_engine.edit_real(inversion, "a dog", options=EditOptions(steps=2))


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        (["nope"], "unknown adapter 'nope'"),
        ([("peft", 4.5)], "adapter 'peft': scale 4.5 is outside [-4, 4]"),
        ([("peft", -5)], "adapter 'peft': scale -5.0 is outside [-4, 4]"),
        (["a", "b", "c", "d", "e"], "5 adapters requested; this server allows at most 4"),
        (["peft", "peft:0.5"], "adapter 'peft' is given more than once"),
    ],
)
def test_bad_adapters_are_refused_naming_them(adapter_engine, engine, adapters, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)) as info:
        edit(adapter_engine, adapters)
    assert info.value.field == "adapters"


def test_an_engine_without_lora_dir_refuses_adapters(engine):
    with pytest.raises(InvalidInputError, match="offers no adapters"):
        edit(engine, ["peft"])


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_exported_backends_refuse_lora_dir_at_start(backend, lora_dir, tmp_path):
    """Exported graphs have their weights baked in: refused before anything loads, in one line naming it."""
    from fpedit.engine.backends import create_backend

    with pytest.raises(InvalidInputError) as info:
        create_backend(tmp_path / "no-such-export", backend, lora_dir=lora_dir)
    assert (
        info.value.field == "lora_dir" and "torch backend" in str(info.value) and "\n" not in str(info.value)
    )


def test_a_missing_lora_dir_is_refused_before_the_model_loads(tmp_path):
    from fpedit.engine.backends import create_backend

    with pytest.raises(InvalidInputError, match="no such folder"):
        create_backend(tmp_path / "no-such-model", "torch", lora_dir=tmp_path / "nope")


def test_cuda_graphs_serve_adapter_calls_with_scales_as_inputs(model_dir, lora_dir, modules, tmp_path):
    """With graph replay on (its CPU bookkeeping: the same keys, static inputs and capture path around eager
    forwards), an adapter set gets graphs of its own, captured with its hooks on; a later call of the same
    names at other scales replays them (no new capture) and still equals weights merged by hand at *its*
    scales, so the scales are graph inputs, not numbers baked in at capture."""
    graphs = EditEngine.from_pretrained(model_dir, lora_dir=lora_dir, backend_options={"cuda_graphs": True})
    recorder = graphs.backend.graphs
    assert recorder is not None
    edit(graphs)
    plain = recorder.captures
    assert plain > 0
    first = (("kohya", 0.9), ("peft", 0.4))
    second = (("kohya", -1.2), ("peft", 0.7))
    got_first = edit(graphs, first)
    with_set = recorder.captures
    assert with_set > plain  # the set's calls were captured as graphs of their own, not run around them
    got_second = edit(graphs, second)
    assert recorder.captures == with_set  # same names, other scales: the same graphs replayed
    for chosen, got in ((first, got_first), (second, got_second)):
        expected = edit(hand_merged(model_dir, lora_dir, modules, chosen, tmp_path / describe(chosen)))
        assert rel_l2(got, expected) < TOL, chosen
    edit(graphs, (("peft", 1.0),))
    assert recorder.captures > with_set  # other names: other graphs
    assert rel_l2(edit(graphs), edit(graphs, first)) > 100 * TOL  # and plain calls stayed plain


def describe(adapters) -> str:
    return "-".join(f"{name}{scale:g}" for name, scale in adapters)


def test_saved_inversions_and_ray_records_keep_their_set(adapter_engine, tmp_path):
    """An inversion leaving the process (a saved file, a Ray store record) comes back with its set, and so is
    still refused under another one."""
    from fpedit.server.ray.store import inversion_from_record, record_from_inversion

    chosen = (("peft", 0.5),)
    inversion = adapter_engine.invert(
        make_image(64, 64, seed=6), options=EditOptions(steps=2, adapters=chosen)
    )
    loaded = adapter_engine.load_inversion(
        adapter_engine.save_inversion(inversion, tmp_path / "inv.safetensors")
    )
    restored = inversion_from_record(adapter_engine, record_from_inversion(inversion, "fp"))
    for back in (loaded, restored):
        assert back.adapters == chosen
        with pytest.raises(InvalidInputError, match=re.escape("adapters peft:0.5")):
            adapter_engine.edit_real(back, "a dog", options=EditOptions(steps=2))


def test_every_linear_and_conv_of_sd15_takes_batch_first_rows():
    """Per-row scales broadcast over a module's output by its first dim: on SD 1.5's UNet (with this engine's
    attention processors: capture, donors and word-mask probabilities) and CLIP text encoder, built on the
    meta device from the shipped configs, every Linear and Conv2d sees (and returns) the call's rows first."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import fpedit.engine
    from fpedit.engine.backends.attention import CallState, install_processors, unet_forward
    from fpedit.engine.calls import Donors
    from fpedit.engine.contract import ModelSpec

    root = Path(fpedit.engine.__file__).parent / "configs" / "sd1"
    configs = {c: json.loads((root / c / "config.json").read_text()) for c in ("unet", "vae", "text_encoder")}
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    spec = ModelSpec.from_configs(configs["unet"], configs["vae"], configs["text_encoder"], scheduler)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    install_processors(unet, spec)
    rows, seen = 5, []
    for model in (unet, text):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                module.register_forward_hook(
                    lambda m, args, out: seen.append((args[0].shape[0], out.shape[0]))
                )
    donors = Donors.for_rows([0, 0, 2, 3, 4], (4, 5, 6))
    with torch.no_grad(), torch.device("meta"):
        sample, t = torch.randn(rows, 4, 8, 8), torch.arange(rows).float()
        context = torch.randn(rows, 77, configs["unet"]["cross_attention_dim"])
        call = UNetCall(sample, t, context, capture=(4, 5, 6), cross_probs=(4, 8), donors=donors)
        unet_forward(unet, sample, t, context, CallState.for_call(call, torch.device("meta")))
        in_unet = len(seen)
        text(torch.zeros(rows, 77, dtype=torch.long))
    assert in_unet > 250 and len(seen) - in_unet > 70  # every projection, conv and time-embedding linear
    assert set(seen) == {(rows, rows)}
