"""``fpedit serve`` and ``fpedit client edit|generate|invert|info``."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from fpedit.args import (
    BLEND_FLAGS,
    COMMON_FLAGS,
    EDIT_FLAGS,
    GENERATE_FLAGS,
    add_blend_arguments,
    add_edit_arguments,
    add_generate_arguments,
    add_inversion_arguments,
    describe_error,
    inversion_fields_given,
    source_output_path,
)

from .config import add_serve_arguments, bearer_token, server_config_from_args

__all__ = ["add_commands", "server_config_from_args"]


def cmd_serve(args: argparse.Namespace) -> int:
    from fpedit.engine import flags as engine_flags
    from fpedit.engine.contract import graphs_missing_from
    from fpedit.engine.errors import InvalidInputError

    from .app import RunningServer, serve
    from .config import check_can_start
    from .logs import configure
    from .runner import serving_engine_config

    # Every start-up setting is judged before the model loads (a minute on a large model) or Ray starts.
    config = server_config_from_args(args)
    # --backend from the manifest; the server's limits (image pixels, formats, map cache) are the engine's
    engine_config = engine_flags.engine_config_from_args(args, batching=args.batching)
    if args.ray:
        if args.replicas is not None and args.replicas < 1:
            raise InvalidInputError("replicas", "must be at least 1")
        from .ray.install import require_ray, starts_local_ray

        # Before anything loads: one line saying how to install the extra; a local Ray stays on loopback.
        require_ray(local=starts_local_ray(args.ray_address))
    elif args.replicas is not None or args.ray_address:
        raise InvalidInputError("replicas", "--replicas and --ray-address need --ray")
    check_can_start(config)  # TLS pair, host, free ports
    from .jobs.config import jobs_config_from_args
    from .jobs.state import open_state

    jobs = jobs_config_from_args(args)
    state = open_state(jobs.state_dir)  # locked for this process's life: a second server is refused now
    missing = graphs_missing_from(engine_config.model)
    if missing:  # a partial export (`fpedit export --graphs`) would load, then refuse every edit
        raise InvalidInputError(
            "model",
            f"{engine_config.model} is a partial export without {', '.join(missing)}; the service needs every "
            "graph: export again without --graphs",
        )
    configure(config.log_format)

    def ready(running: RunningServer) -> None:
        print(f"fpedit serving on {args.host}:{running.port}", flush=True)
        if running.metrics_port is not None:
            host = config.metrics_host or config.host
            print(f"fpedit metrics on http://{host}:{running.metrics_port}/metrics", flush=True)
        if running.http is not None:
            print(f"fpedit HTTP/JSON and editor page on {running.http.url}", flush=True)

    if args.ray:
        from .ray import replica_settings, serve_on_ray

        settings = replica_settings(config, engine_config)
        # The front owns the job table (and --state-dir); the replicas run each job's call as a synchronous one.
        serve_on_ray(
            settings,
            config,
            replicas=args.replicas,
            address=args.ray_address,
            ready=ready,
            jobs=jobs,
            state=state,
        )
    else:
        engine = engine_flags.engine_from_config(serving_engine_config(engine_config, config))
        serve(engine, config, ready=ready, jobs=jobs, state=state)
    # Drained: every request is answered and logged. Leave without interpreter teardown, where native
    # threads (gRPC's pollers, the BLAS pool) racing static destructors have aborted the process.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#: `fpedit client` exit statuses (docs/serving.md): a mistake on the command line, found before any
#: call; an error status the server answered; no server to answer (not running, unreachable, draining).
EXIT_SERVER_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


def positive_seconds(text: str) -> float:
    """``--timeout``: a deadline in the past is a flag mistake, not a DEADLINE_EXCEEDED from the call."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return seconds


def _client(args: argparse.Namespace) -> Any:
    from .client import EditClient

    roots = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    token = bearer_token(args.token)
    return EditClient(args.target, token=token, root_certificates=roots, timeout=args.timeout)


def _options(args: argparse.Namespace) -> Any:
    """Only the options a command has (``invert`` takes steps and guidance alone); unset means the server's.

    The values given are judged here by the engine's own rules (light: no torch), so a mistake is a flag
    error before any call rather than a server refusal or a protobuf range error."""
    from fpedit.engine.errors import InvalidInputError
    from fpedit.engine.options import EditOptions

    from .client import edit_options

    given = {
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "replace_window": getattr(args, "window", None),
        "layers": getattr(args, "layers", None),
        "map_format": getattr(args, "map_format", None),
        "adapters": getattr(args, "adapters", None),
    }
    try:
        judged = EditOptions(**{name: value for name, value in given.items() if value is not None})
    except InvalidInputError as exc:
        raise UsageError(describe_error(exc, args)) from None
    return edit_options(
        steps=args.steps,
        guidance_scale=args.guidance,
        replace_window=getattr(args, "window", None),
        layers=getattr(args, "layers", None),
        map_format=getattr(args, "map_format", None),
        adapters=judged.adapters,
        **_blend_fields(args),
    )


def _blend_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The blend flags (``fpedit edit``'s, :func:`~fpedit.args.add_blend_arguments`) as ``edit_options``
    keywords, judged by the same rules (:func:`~fpedit.args.blend_from_args`, no torch) before any call;
    none without ``--mask`` or ``--blend``. The mask file travels as its bytes (the server resizes it)."""
    from fpedit.args import blend_from_args
    from fpedit.engine.errors import InvalidInputError
    from fpedit.engine.paths import check_output_path

    if not hasattr(args, "mask"):
        return {}  # invert: no blend flags
    try:
        blend = blend_from_args(args)
        check_output_path(args.save_mask, "--save-mask")
    except InvalidInputError as exc:
        raise UsageError(describe_error(exc, args)) from None
    if blend is None:
        return {}
    return {
        "mask": None if args.mask is None else args.mask.read_bytes(),
        "mask_grow": blend.mask_grow,
        "blend_words": blend.words,
        "blend_start": blend.start,
        "blend_threshold": blend.threshold,
    }


def _write_mask(args: argparse.Namespace, blend_mask: bytes) -> None:
    """``--save-mask``: the mask the server used, a PNG at the image's size (as the response carries it)."""
    if args.save_mask is not None and blend_mask:
        _write(args.save_mask, blend_mask)


def _inversion_args(args: argparse.Namespace) -> dict[str, Any]:
    """The inversion flags given (none: the server's defaults, DDIM), judged by the engine's own rules
    (:class:`InversionOptions`, no torch) before any call."""
    from fpedit.args import inversion_options_from_args
    from fpedit.engine.errors import InvalidInputError

    try:
        inversion_options_from_args(args)
    except InvalidInputError as exc:
        raise UsageError(describe_error(exc, args)) from None
    given = {
        "source_prompt": args.source_prompt,
        "inversion_method": args.inversion,
        "null_text_steps": args.null_text_steps,
    }
    return {k: v for k, v in given.items() if v is not None}


class UsageError(Exception):
    """A mistake on the client's command line, reported as one ``fpedit: error:`` line (status 2)."""


def _output_format(args: argparse.Namespace, *outputs: tuple[str, Path | None]) -> str:
    """The image format of the files to write (``(flag, path)`` pairs): their extension's, which
    ``--format`` may only confirm. Two outputs that name one file are refused, naming the flag as
    ``fpedit edit`` does: the second write would replace the first result."""
    from fpedit.engine.errors import InvalidInputError
    from fpedit.engine.paths import check_distinct_outputs, check_output_path

    from .client import format_for_path

    try:  # the checks `fpedit edit` makes, in the same words
        check_distinct_outputs(*((path, flag) for flag, path in outputs))
        for flag, path in outputs:
            check_output_path(path, flag)
    except InvalidInputError as exc:
        raise UsageError(str(exc)) from None
    formats = {format_for_path(path) for _, path in outputs if path is not None}
    if len(formats) > 1:
        raise UsageError(
            f"the output files' extensions name different formats ({', '.join(sorted(formats))})"
        )
    chosen = formats.pop()
    if args.format and args.format != chosen:
        raise UsageError(f"--format {args.format} does not match the output file's extension ({chosen})")
    return chosen


def _distinct_mask_output(args: argparse.Namespace, *outputs: tuple[str, Path | None]) -> None:
    """``--save-mask`` may not name an image output's file (the mask would replace that result)."""
    from fpedit.engine.errors import InvalidInputError
    from fpedit.engine.paths import check_distinct_outputs

    try:
        check_distinct_outputs(*((path, flag) for flag, path in outputs), (args.save_mask, "--save-mask"))
    except InvalidInputError as exc:
        raise UsageError(str(exc)) from None


def _read_image(path: Path) -> bytes:
    from fpedit.engine.errors import InvalidInputError
    from fpedit.engine.paths import check_input_image

    try:
        check_input_image(path)
    except InvalidInputError as exc:
        raise UsageError(str(exc)) from None
    return path.read_bytes()


def _inversion_id(text: str) -> str:
    """An id, or the JSON line ``fpedit client invert`` prints (so its output can be pasted as is)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return str(json.loads(text)["inversion_id"])
        except (ValueError, KeyError, TypeError):
            raise UsageError("--inversion-id: not an id, nor JSON with an inversion_id field") from None
    return text


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {path}", file=sys.stderr)


def _grpc_errors(func):
    """One ``fpedit: error:`` line for every failure, and a distinct exit status for each kind: 2 for a
    mistake on the command line, 1 for an error the server answered, 3 when no server answered."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        import grpc

        try:
            return func(args)
        except UsageError as exc:
            print(f"fpedit: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                hint = f" (is `fpedit serve` running at {args.target}?)"
                if "Socket closed" in details and not getattr(args, "ca_cert", None):
                    # what a plaintext call to a TLS server gets: the server runs, the handshake is missing
                    hint = f" (is `fpedit serve` running at {args.target}? if it serves TLS, pass --ca-cert)"
                print(f"fpedit: error: {code.name}: {details}{hint}", file=sys.stderr)
                return EXIT_UNREACHABLE
            print(f"fpedit: error: {code.name}: {_plain_details(details)}", file=sys.stderr)
            return EXIT_SERVER_REFUSED

    return run


#: gRPC's own refusal of a message over its transport limit, which fpedit sets to twice --max-message-mb.
_GRPC_TOO_LARGE = re.compile(r"SERVER: Received message larger than max \((\d+) vs\. \d+\)")


def _plain_details(details: str) -> str:
    """gRPC's wording for a message over its limit names a limit the operator never set: say it plainly."""
    match = _GRPC_TOO_LARGE.search(details)
    if match is None:
        return details
    return f"the message is {match.group(1)} bytes, far over the server's limit (its --max-message-mb)"


def _with_replica(fields: dict[str, Any], stats: Any) -> dict[str, Any]:
    """Add the Ray Serve replica that served the call, when the server says (a standalone one does not)."""
    if stats.replica:
        fields["replica"] = stats.replica
    return fields


@_grpc_errors
def cmd_client_edit(args: argparse.Namespace) -> int:
    if bool(args.inversion_id) == (args.image is not None):
        raise UsageError("give an IMAGE or --inversion-id (exactly one)")
    if args.inversion_id:
        from fpedit.engine.errors import InvalidInputError
        from fpedit.engine.options import refuse_inversion_options

        try:
            refuse_inversion_options(inversion_fields_given(args))
        except InvalidInputError as exc:
            raise UsageError(describe_error(exc, args)) from None
    output_format = _output_format(
        args, ("-o/--output", args.output), ("--reconstruction", args.reconstruction)
    )
    _distinct_mask_output(args, ("-o/--output", args.output), ("--reconstruction", args.reconstruction))
    options = _options(args)
    inversion_args = _inversion_args(args)
    image = None if args.inversion_id else _read_image(args.image)
    inversion_id = _inversion_id(args.inversion_id) if args.inversion_id else ""
    with _client(args) as client:
        if args.stream:
            response = None
            for event in client.edit_stream(
                args.prompt,
                image=image,
                inversion_id=inversion_id,
                options=options,
                output_format=output_format,
                **inversion_args,
            ):
                if event.HasField("progress"):
                    p = event.progress
                    print(f"\r{p.stage} {p.step}/{p.total}", end="", file=sys.stderr, flush=True)
                else:
                    response = event.result
            print(file=sys.stderr)
        else:
            response = client.edit(
                args.prompt,
                image=image,
                inversion_id=inversion_id,
                options=options,
                output_format=output_format,
                skip_reconstruction=args.reconstruction is None,
                **inversion_args,
            )
    _write(args.output, response.edited_image)
    if args.reconstruction and response.reconstruction_image:
        _write(args.reconstruction, response.reconstruction_image)
    _write_mask(args, response.blend_mask)
    fields = {
        "inversion_id": response.inversion_id,
        "unet_rows": response.stats.unet_rows,
        "engine_ms": round(response.stats.engine_ms, 1),
    }
    print(json.dumps(_with_replica(fields, response.stats)))
    return 0


@_grpc_errors
def cmd_client_generate(args: argparse.Namespace) -> int:
    source_output = source_output_path(args.output, args.source_output)
    output_format = _output_format(args, ("-o/--output", args.output), ("--source-output", source_output))
    _distinct_mask_output(args, ("-o/--output", args.output), ("--source-output", source_output))
    options = _options(args)
    with _client(args) as client:
        response = client.generate(
            args.source_prompt,
            args.target_prompt,
            seed=args.seed,
            options=options,
            height=args.height,
            width=args.width,
            output_format=output_format,
        )
    _write(args.output, response.edited_image)
    _write(source_output, response.source_image)
    _write_mask(args, response.blend_mask)
    fields = {"seed": response.seed, "width": response.width, "height": response.height}
    print(json.dumps(_with_replica(fields, response.stats)))
    return 0


@_grpc_errors
def cmd_client_invert(args: argparse.Namespace) -> int:
    options, inversion_args = _options(args), _inversion_args(args)
    image = _read_image(args.image)
    with _client(args) as client:
        response = client.invert(image, options=options, **inversion_args)
    if args.quiet:
        print(response.inversion_id)
        return 0
    fields = {
        "inversion_id": response.inversion_id,
        "width": response.width,
        "height": response.height,
        "steps": response.steps,
        "expires_in_s": response.expires_in_s,
    }
    print(json.dumps(_with_replica(fields, response.stats)))
    return 0


@_grpc_errors
def cmd_client_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.info()
        health = client.health()
    print(json.dumps({"health": health, **info_as_engine_json(info)}, indent=2))
    return 0


def _preset_layers(preset: str) -> list[int] | str:
    from fpedit.engine.contract import PAPER_LAYERS

    return list(PAPER_LAYERS) if preset == "paper" else preset


def info_as_engine_json(info: Any) -> dict[str, Any]:
    """A GetInfoResponse under the key names and values `fpedit info` prints (``map_layers``, ``"qk"``),
    so one script reads either; what only a server has (its limits) is added under ``limits``."""
    from google.protobuf.json_format import MessageToDict

    from .client import MAP_FORMATS

    format_names = {number: name for name, number in MAP_FORMATS.items()}
    defaults = info.defaults
    return {
        "fpedit": info.version,
        "model": info.model,
        "backend": info.backend,
        "device": info.device,
        "dtype": info.precision,
        "map_layers": list(info.layers_available),
        "map_formats": [format_names.get(f, str(f)) for f in info.map_formats],
        "default_image_size": info.default_image_size,
        "max_side": info.limits.max_side,
        "defaults": {
            "steps": defaults.steps,
            "guidance_scale": round(defaults.guidance_scale, 6),
            "replace_window": [round(defaults.replace_start, 6), round(defaults.replace_end, 6)],
            "layers": list(defaults.layers) or _preset_layers(defaults.layer_preset),
            "map_format": format_names.get(defaults.map_format, str(defaults.map_format)),
        },
        "prediction_type": info.prediction_type,
        "loras": [{"file": lora.file, "scale": round(lora.scale, 6)} for lora in info.loras],
        "adapters": [{"name": a.name, "rank": a.rank, "layers": list(a.layers)} for a in info.adapters],
        "max_adapters": info.max_adapters,
        "limits": MessageToDict(info.limits, preserving_proto_field_name=True),
    }


def add_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve the gRPC EditService")
    add_serve_arguments(serve)
    from .jobs.config import add_jobs_arguments

    add_jobs_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    client = sub.add_parser(
        "client",
        help="call a running fpedit server (needs only `pip install 'fpedit[client]'`)",
        description="Call a running `fpedit serve`. Images are written in the format their extension names "
        "(.png, .jpg/.jpeg, .webp); unset edit options take the server's defaults.",
    )
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="CALL")
    edit_flags = {**COMMON_FLAGS, **EDIT_FLAGS, **BLEND_FLAGS}

    edit = client_sub.add_parser("edit", help="edit an image, or an inverted image by its id")
    edit.add_argument("image", type=Path, nargs="?", help="input image (or give --inversion-id)")
    edit.add_argument(
        "--inversion-id", help="id from `fpedit client invert` (its JSON line is accepted as well)"
    )
    edit.add_argument("--prompt", "-p", required=True, help="target prompt")
    edit.add_argument(
        "--output", "-o", type=Path, required=True, help="edited image file (.png, .jpg, .webp)"
    )
    edit.add_argument(
        "--reconstruction",
        type=Path,
        help="also write the inversion's reconstruction here (default: not written)",
    )
    edit.add_argument(
        "--stream", action="store_true", help="show per-step progress on stderr (default: one blocking call)"
    )
    _add_connection_arguments(edit)
    add_edit_arguments(edit, defaults=False)
    _add_format_argument(edit)
    add_inversion_arguments(edit, epsilon=False)
    add_blend_arguments(edit)
    edit.set_defaults(func=cmd_client_edit, flags=edit_flags)

    gen = client_sub.add_parser("generate", help="generate from a source prompt and edit toward a target")
    add_generate_arguments(gen)
    _add_connection_arguments(gen)
    add_edit_arguments(gen, defaults=False)
    _add_format_argument(gen)
    add_blend_arguments(gen)
    gen.set_defaults(func=cmd_client_generate, flags={**COMMON_FLAGS, **GENERATE_FLAGS, **BLEND_FLAGS})

    inv = client_sub.add_parser(
        "invert", help="invert an image on the server; prints its inversion id for `edit --inversion-id`"
    )
    inv.add_argument("image", type=Path, help="input image")
    inv.add_argument(
        "--quiet", "-q", action="store_true", help="print the inversion id alone (default: a JSON line)"
    )
    _add_connection_arguments(inv)
    group = inv.add_argument_group("options (unset: the server's defaults)")
    group.add_argument("--steps", type=int, help="DDIM steps (default: the server's, 50)")
    group.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (default: the server's, 7.5)"
    )
    group.add_argument(
        "--adapter",
        action="append",
        dest="adapters",
        metavar="NAME[:SCALE]",
        help="invert under the server's adapter NAME at SCALE (default 1); edits of the id must use the "
        "same set; repeatable (default: none)",
    )
    add_inversion_arguments(inv, epsilon=False)
    inv.set_defaults(func=cmd_client_invert, flags=edit_flags)

    info = client_sub.add_parser("info", help="server info and health as JSON")
    _add_connection_arguments(info)
    info.set_defaults(func=cmd_client_info)

    from .jobs.cli import add_job_commands

    add_job_commands(client_sub, _add_connection_arguments, _client, _grpc_errors, UsageError)


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default="127.0.0.1:50051", help="server HOST:PORT (default 127.0.0.1:50051)"
    )
    parser.add_argument("--token", help="bearer token (default: $FPEDIT_TOKEN)")
    parser.add_argument("--ca-cert", help="PEM root certificate (enables TLS)")
    parser.add_argument("--timeout", type=positive_seconds, help="deadline in seconds (default: none)")


def _add_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=("png", "jpeg", "webp"),
        help="image format; must match the output file's extension, which sets it by default",
    )
