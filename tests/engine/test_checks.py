"""Refusals without running (``EditEngine.check_generated``, ``check_invert``, ``check_real``): what a server
judges a job by at submit. For each bad input the check raises exactly what the run raises (same field, same
message), and a check runs no model: the backend's UNet, VAE and text encoder are never called."""

from __future__ import annotations

import io

import pytest
from helpers import make_image

from fpedit import EditOptions
from fpedit.engine.blend import Blend
from fpedit.engine.errors import InvalidInputError


def png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    make_image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def refusal(fn) -> tuple[str, str]:
    with pytest.raises(InvalidInputError) as info:
        fn()
    return info.value.field, str(info.value)


GENERATED = [
    ({"height": 8192}, "height"),
    ({"width": 60}, "width"),
    ({"seed": -1}, "seed"),
    ({"target_prompt": "  "}, "target_prompt"),
    ({"options": EditOptions(steps=2, blend=Blend(words=("zebra",)))}, "blend_words"),
    ({"options": EditOptions(steps=2, blend=Blend(mask=b"not an image"))}, "mask"),
    ({"options": EditOptions(steps=2, adapters=["ink"])}, "adapters"),
]


@pytest.mark.parametrize(("change", "field"), GENERATED, ids=[f for _, f in GENERATED])
def test_check_generated_refuses_what_the_edit_refuses(engine, change, field):
    kwargs = {"source_prompt": "a cat", "target_prompt": "a dog", "options": EditOptions(steps=2), **change}
    source, target = kwargs.pop("source_prompt"), kwargs.pop("target_prompt")
    run = refusal(lambda: engine.edit_generated(source, target, **kwargs))
    assert run[0] == field
    with no_model_work_on(engine):
        assert refusal(lambda: engine.check_generated(source, target, **kwargs)) == run


REAL = [
    ({"image": b"not an image"}, "image"),
    ({"output_size": "huge"}, "output_size"),
    ({"method": "ddim", "source_prompt": "a car"}, "source_prompt"),
    ({"options": EditOptions(steps=2, blend=Blend(words=("zebra",)))}, "blend_words"),
    ({"options": EditOptions(steps=2, blend=Blend(mask=b"junk"))}, "mask"),
    ({"options": EditOptions(steps=2, adapters=["ink"])}, "adapters"),
]


@pytest.mark.parametrize(("change", "field"), REAL, ids=[f for _, f in REAL])
def test_check_real_and_check_invert_refuse_what_the_run_refuses(engine, change, field):
    kwargs = {"image": png(), "options": EditOptions(steps=2), **change}
    image = kwargs.pop("image")
    run = refusal(lambda: engine.edit_real(image, "a red car", **kwargs))
    assert run[0] == field
    with no_model_work_on(engine):
        assert refusal(lambda: engine.check_real(image, "a red car", **kwargs)) == run
    if field in ("image", "source_prompt", "adapters"):  # the ones an inversion alone refuses too
        invert_kwargs = {k: v for k, v in kwargs.items() if k != "output_size"}
        inverted = refusal(lambda: engine.invert(image, **invert_kwargs))
        with no_model_work_on(engine):
            assert refusal(lambda: engine.check_invert(image, **invert_kwargs)) == inverted


INVERSION_REUSE = [
    (EditOptions(steps=3), {}, "steps"),
    (EditOptions(steps=2, adapters=["ink"]), {}, "adapters"),
    (EditOptions(steps=2), {"method": "ddim"}, "method"),
]


@pytest.mark.parametrize(
    ("options", "kwargs", "field"), INVERSION_REUSE, ids=[f for *_, f in INVERSION_REUSE]
)
def test_check_real_of_an_inversion_refuses_what_its_edit_refuses(
    engine, ddim_inversion, options, kwargs, field
):
    run = refusal(lambda: engine.edit_real(ddim_inversion, "a red car", options=options, **kwargs))
    assert run[0] == field, run
    with no_model_work_on(engine):
        assert (
            refusal(lambda: engine.check_real(ddim_inversion, "a red car", options=options, **kwargs)) == run
        )


@pytest.fixture(scope="module")
def ddim_inversion(engine):
    return engine.invert(png(), options=EditOptions(steps=2))


def test_with_several_faults_the_check_names_the_one_the_run_names(engine, ddim_inversion):
    """The check refuses in the run's order: a blend word missing from the prompts comes before the image,
    the method and the inversion's step count."""
    words = Blend(words=("zebra",))
    cases = [
        (b"not an image", {"options": EditOptions(steps=2, blend=words)}),
        (png(), {"options": EditOptions(steps=2, blend=words), "method": "bogus"}),
        (ddim_inversion, {"options": EditOptions(steps=3, blend=words)}),
    ]
    for image, kwargs in cases:
        run = refusal(lambda image=image, kwargs=kwargs: engine.edit_real(image, "a red car", **kwargs))
        assert run[0] == "blend_words", run
        with no_model_work_on(engine):
            got = refusal(lambda image=image, kwargs=kwargs: engine.check_real(image, "a red car", **kwargs))
        assert got == run


def test_layers_an_export_lacks_are_refused_by_the_check(ort_engine):
    """The ONNX export carries maps of layers 4-14 only: a request for layer 1 is the export's refusal."""
    options = EditOptions(steps=2, layers=(1, 5))
    run = refusal(lambda: ort_engine.edit_generated("a cat", "a dog", options=options, seed=1))
    assert run[0] == "layers"
    with no_model_work_on(ort_engine):
        assert refusal(lambda: ort_engine.check_generated("a cat", "a dog", options=options, seed=1)) == run
        assert refusal(lambda: ort_engine.check_real(png(), "a dog", options=options)) == run


def test_good_requests_pass_their_checks_without_model_work(engine, ddim_inversion):
    """Each request the check accepts (inside the block, no model call) the run accepts too (after it)."""
    two = EditOptions(steps=2)
    accepted = [
        (engine.check_generated, engine.edit_generated, ("a cat", "a dog"),
         {"options": two, "seed": 3, "height": 64, "width": 64}),
        (engine.check_invert, engine.invert, (png(96, 64),), {"options": two}),
        (engine.check_real, engine.edit_real, (png(), "a red car"),
         {"options": EditOptions(steps=2, layers="resolution")}),
        (engine.check_real, engine.edit_real, (ddim_inversion, "a red car"), {"options": two}),
        # Null-text is judged by the backend's declared gradients, not by making its float32 UNet.
        (engine.check_invert, engine.invert, (png(),),
         {"options": two, "method": "null-text", "source_prompt": "a car", "null_text_steps": 1}),
        (engine.check_real, engine.edit_real, (png(), "a red car"),
         {"options": EditOptions(steps=2, blend=Blend(words=("car",), mask=png()))}),
    ]  # fmt: skip
    with no_model_work_on(engine):
        judged = [check(*args, **kwargs) for check, _, args, kwargs in accepted]
    for check_result, (_, run, args, kwargs) in zip(judged, accepted, strict=True):
        result = run(*args, **kwargs)
        if run == engine.invert:  # the check says the size the image is inverted at
            assert check_result == result.image.size


class no_model_work_on:
    """Inside the block, any model call of ``engine``'s backend fails the test."""

    NAMES = ("unet", "encode_text", "encode_image", "decode_latents", "differentiable_unet")

    def __init__(self, engine) -> None:
        self.backend = engine.backend
        self.saved: dict[str, object] = {}

    def __enter__(self) -> None:
        def forbidden(*args, **kwargs):
            raise AssertionError("a check ran the model")

        for name in self.NAMES:
            self.saved[name] = self.backend.__dict__.get(name)
            setattr(self.backend, name, forbidden)

    def __exit__(self, *exc) -> None:
        for name in self.NAMES:
            if self.saved[name] is None:
                delattr(self.backend, name)
            else:
                setattr(self.backend, name, self.saved[name])
