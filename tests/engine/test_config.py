"""Typed configuration: EngineConfig (flags -> config -> engine, pickled to Ray replicas), InversionOptions
(validated on construction, accepted by the engine beside the older keywords) and ServerConfig as the one
source of `fpedit serve`'s defaults."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
from helpers import make_image

from fpedit.args import FpeditParser, inversion_options_from_args
from fpedit.engine import EditEngine, EditOptions, EngineConfig, InvalidInputError, InversionOptions
from fpedit.engine.flags import add_model_arguments, engine_config_from_args
from fpedit.server.config import add_serve_arguments, server_config_from_args

TINY_OPTIONS = EditOptions(steps=3, layers=(4, 5))


def model_flags(*argv: str):
    parser = FpeditParser(prog="test")
    add_model_arguments(parser)
    return parser.parse_args(list(argv))


def test_model_flags_map_to_an_engine_config(tmp_path):
    config = engine_config_from_args(
        model_flags("--model", "m", "--vae-dtype", "bfloat16", "--no-cuda-graphs", "--compile"), batching=True
    )
    assert config == EngineConfig(
        model="m",
        backend="torch",
        backend_options={"cuda_graphs": False, "vae_dtype": "bfloat16", "compile_unet": True},
        batching=True,
    )
    checkpoint = engine_config_from_args(
        model_flags(
            "--model", "sd.safetensors", "--model-config", "cfg", "--prediction-type", "v_prediction",
            "--lora", "a.safetensors:0.5", "--lora", "b.safetensors",
        )
    )  # fmt: skip
    assert (checkpoint.model_config, checkpoint.prediction_type) == ("cfg", "v_prediction")
    assert checkpoint.loras == (("a.safetensors", 0.5), ("b.safetensors", 1.0))
    onnx = engine_config_from_args(
        model_flags("--backend", "onnxruntime", "--provider", "CPUExecutionProvider")
    )
    assert onnx.backend_options == {} and onnx.providers == ("CPUExecutionProvider",)


def test_backend_comes_from_the_manifest_and_a_mismatch_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "fpedit-onnx"}))
    assert engine_config_from_args(model_flags("--model", str(tmp_path))).backend == "onnxruntime"
    assert EngineConfig(model=str(tmp_path)).resolved().backend == "onnxruntime"
    with pytest.raises(InvalidInputError, match="made for --backend onnxruntime"):
        engine_config_from_args(model_flags("--model", str(tmp_path), "--backend", "torch"))


def test_from_config_builds_the_engine_the_config_describes(model_dir):
    config = EngineConfig(model=str(model_dir), map_cache_bytes=12345, max_side=256, capture_batch=2)
    engine = EditEngine.from_config(pickle.loads(pickle.dumps(config)))  # as a Ray replica receives it
    try:
        assert (engine.map_cache_bytes, engine.max_side, engine.capture_batch) == (12345, 256, 2)
        assert engine.info()["backend"] == "torch" and not engine.executor.batching
        assert engine.source == EditEngine.from_pretrained(model_dir).source
    finally:
        engine.close()
    with pytest.raises(TypeError, match="no_such_setting"):
        EditEngine.from_pretrained(model_dir, no_such_setting=1)


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"method": "sdedit"}, "method", "must be one of"),
        ({"method": "null-text"}, "source_prompt", "needs one"),
        ({"method": "negative-prompt", "source_prompt": "  "}, "source_prompt", "needs one"),
        ({"null_text_steps": 0}, "null_text_steps", "1..100"),
        ({"null_text_steps": 2.5}, "null_text_steps", "1..100"),
        ({"null_text_epsilon": math.nan}, "null_text_epsilon", "finite"),
        ({"source_prompt": 3}, "source_prompt", "string"),
    ],
)
def test_inversion_options_are_judged_on_construction(fields, field, fragment):
    with pytest.raises(InvalidInputError, match=fragment) as caught:
        InversionOptions(**fields)
    assert caught.value.field == field


def test_inversion_options_are_frozen_with_the_engines_defaults():
    options = InversionOptions(method="null-text", source_prompt="a cat", null_text_epsilon=0)
    assert (options.null_text_steps, options.null_text_epsilon) == (10, 0.0)
    with pytest.raises(AttributeError):
        options.method = "ddim"  # type: ignore[misc]
    with pytest.raises(InvalidInputError):
        options.replace(source_prompt="")


def test_inversion_flags_keep_the_ddim_source_prompt_rule():
    class Flags:
        inversion, source_prompt, null_text_steps, null_text_epsilon = None, "a cat", None, None

    with pytest.raises(InvalidInputError, match="DDIM inversion"):
        inversion_options_from_args(Flags())
    Flags.inversion = "negative-prompt"
    assert inversion_options_from_args(Flags()) == InversionOptions("negative-prompt", "a cat")


def test_engine_takes_inversion_options_as_the_keywords_do(engine):
    image = make_image(64, 64, seed=3)
    how = InversionOptions(method="negative-prompt", source_prompt="a red square")
    typed = engine.edit_real(image, "a blue square", options=TINY_OPTIONS, inversion=how)
    keywords = engine.edit_real(
        image, "a blue square", options=TINY_OPTIONS, method="negative-prompt", source_prompt="a red square"
    )
    assert typed.inversion.method == "negative-prompt" and typed.inversion.source_prompt == "a red square"
    np.testing.assert_array_equal(np.asarray(typed.edited_image), np.asarray(keywords.edited_image))
    ddim = engine.invert(image, options=TINY_OPTIONS)
    assert not np.allclose(ddim.trajectory.numpy(), typed.inversion.trajectory.numpy())  # the method counted
    with pytest.raises(TypeError, match="not both"):
        engine.invert(image, options=TINY_OPTIONS, inversion=how, method="ddim")
    with pytest.raises(InvalidInputError, match="do not apply to an inversion already made"):
        engine.edit_real(typed.inversion, "a cat", options=TINY_OPTIONS, inversion=how)


def test_serve_flags_take_their_defaults_from_server_config():
    from fpedit.server.config import ServerConfig

    parser = FpeditParser(prog="fpedit serve")
    add_serve_arguments(parser)
    assert server_config_from_args(parser.parse_args(["--no-batching"])) == ServerConfig()


def test_server_config_fields_are_the_serve_flags():
    """One definition: every ServerConfig field is a `fpedit serve` flag, its value in the flag's unit."""
    import dataclasses

    from fpedit.engine.flags import flag_name
    from fpedit.server.config import ServerConfig

    parser = FpeditParser(prog="fpedit serve")
    add_serve_arguments(parser)
    options = {option for action in parser._actions for option in action.option_strings}
    assert {f"--{flag_name(ServerConfig, f.name)}" for f in dataclasses.fields(ServerConfig)} <= options
    args = parser.parse_args(["--max-message-mb", "5", "--cache-gib", "0.5", "--workers", "3"])
    config = server_config_from_args(args)
    assert (config.max_message_bytes, config.cache_bytes, config.workers) == (5 * 1024**2, 1024**3 // 2, 3)
    with pytest.raises(InvalidInputError, match="max-message-mb"):
        ServerConfig(max_message_bytes=1).validate()


def test_jobs_config_fields_are_the_serve_flags(monkeypatch):
    """JobsConfig's fields are `fpedit serve` flags too, each value in its flag's unit; the webhook secret
    falls back to the environment."""
    import dataclasses

    from fpedit.engine.flags import flag_name
    from fpedit.server.jobs.config import SECRET_ENV, JobsConfig, add_jobs_arguments, jobs_config_from_args

    parser = FpeditParser(prog="fpedit serve")
    add_jobs_arguments(parser)
    options = {option for action in parser._actions for option in action.option_strings}
    assert {f"--{flag_name(JobsConfig, f.name)}" for f in dataclasses.fields(JobsConfig)} <= options
    monkeypatch.setenv(SECRET_ENV, "s" * 16)
    args = parser.parse_args(["--state-gib", "0.5", "--job-ttl", "60", "--webhook-allow-private"])
    config = jobs_config_from_args(args)
    assert (config.state_bytes, config.job_ttl_s, config.webhook_allow_private) == (1024**3 // 2, 60.0, True)
    assert config.webhook_secret == "s" * 16 and config.max_queued == JobsConfig().max_queued
    with pytest.raises(InvalidInputError, match="max-queued-jobs"):
        jobs_config_from_args(parser.parse_args(["--max-queued-jobs", "0"]))


def test_ray_settings_carry_an_engine_config_not_flags():
    from fpedit.server.ray import ReplicaSettings, settings_from_flags
    from fpedit.server.runner import ACCEPTED_IMAGE_FORMATS

    config, settings = settings_from_flags({"model": "tiny", "no-batching": True, "cache-gib": 1, "port": 0})
    assert isinstance(settings, ReplicaSettings)

    # The server's limits are the replicas' engine's own, set in its config (nothing changes it once built).
    assert settings.engine == EngineConfig(
        model="tiny",
        backend="torch",
        backend_options={"vae_dtype": None},
        max_input_pixels=config.max_image_pixels,
        image_formats=ACCEPTED_IMAGE_FORMATS,
        map_cache_bytes=1024**3,
    )
    assert config.cache_bytes == 1024**3 and config.workers == 1
    assert pickle.loads(pickle.dumps(settings)) == settings
    with pytest.raises(InvalidInputError, match="not valid `fpedit serve` flags"):
        settings_from_flags({"no-such-flag": 1})


def test_adapter_batching_is_a_serve_flag_and_a_checked_engine_field():
    from fpedit.server.ray import settings_from_flags

    _, settings = settings_from_flags({"model": "tiny", "adapter-batching": "group", "port": 0})
    assert settings.engine.adapter_batching == "group" and EngineConfig().adapter_batching == "auto"
    with pytest.raises(InvalidInputError, match="must be one of auto, mix, group") as info:
        EngineConfig(adapter_batching="sometimes")
    assert info.value.field == "adapter_batching"
    with pytest.raises(InvalidInputError, match="not valid `fpedit serve` flags"):
        settings_from_flags({"adapter-batching": "sometimes"})
