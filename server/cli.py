"""``fpedit serve`` and ``fpedit client edit|generate|invert|info``."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

#: Requests in flight on one engine when batching is on: enough for the device loop to fill batches of
#: 2-row target steps and 8-row capture calls without holding many requests' activations at once.
DEFAULT_BATCHING_WORKERS = 4


def server_config_from_args(args: argparse.Namespace) -> Any:
    """The validated :class:`ServerConfig` of ``fpedit serve`` flags (also read by the Ray Serve config file)."""
    from .config import ServerConfig

    token = args.token or os.environ.get("FPEDIT_TOKEN") or None
    return ServerConfig(
        host=args.host,
        port=args.port,
        workers=args.workers
        if args.workers is not None
        else (DEFAULT_BATCHING_WORKERS if args.batching else 1),
        max_queue=args.max_queue,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        cache_bytes=int(args.cache_gib * 1024**3),
        cache_ttl_s=args.cache_ttl_s,
        max_image_pixels=args.max_image_pixels,
        max_prompt_chars=args.max_prompt_chars,
        token=token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        grace_s=args.grace_s,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        log_format=args.log_format,
        http_port=getattr(args, "http_port", None),
        http_host=getattr(args, "http_host", None),
        threads_per_worker=args.threads_per_worker,
    ).validate()  # before the model loads: a bad flag fails in a second, not after a minute


def cmd_serve(args: argparse.Namespace) -> int:
    from fpedit.cli import engine_from_args, resolve_backend
    from fpedit.engine.errors import InvalidInputError

    from .app import RunningServer, serve
    from .config import check_can_start
    from .logs import configure

    # Every start-up setting is judged before the model loads (a minute on a large model) or Ray starts.
    config = server_config_from_args(args)
    resolve_backend(args)  # --backend from the model folder's manifest (default torch)
    if args.ray:
        if args.replicas is not None and args.replicas < 1:
            raise InvalidInputError("replicas", "must be at least 1")
        from .ray.install import require_ray, starts_local_ray

        # Before anything loads: one line saying how to install the extra; a local Ray stays on loopback.
        require_ray(local=starts_local_ray(args.ray_address))
    elif args.replicas is not None or args.ray_address:
        raise InvalidInputError("replicas", "--replicas and --ray-address need --ray")
    check_can_start(config)  # TLS pair, host, free ports
    configure(config.log_format)

    def ready(running: RunningServer) -> None:
        print(f"fpedit serving on {args.host}:{running.port}", flush=True)
        if running.metrics_port is not None:
            host = config.metrics_host or config.host
            print(f"fpedit metrics on http://{host}:{running.metrics_port}/metrics", flush=True)
        if running.http is not None:
            print(f"fpedit HTTP/JSON and editor page on {running.http.url}", flush=True)

    if args.ray:
        from .ray import serve_on_ray

        serve_on_ray(args, config, ready=ready)
    else:
        serve(engine_from_args(args, batching=args.batching), config, ready=ready)
    # Drained: every request is answered and logged. Leave without interpreter teardown, where native
    # threads (gRPC's pollers, the BLAS pool) racing static destructors have aborted the process.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#: `fpedit client` exit statuses (README, "gRPC service"): a mistake on the command line, found before any
#: call; an error status the server answered; no server to answer (not running, unreachable, draining).
EXIT_SERVER_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
#: Null-text Adam iterations per step the API accepts (edit.proto: 1..100).
MAX_NULL_TEXT_STEPS = 100
#: What `fpedit client generate` uses without --seed: the same as `fpedit generate`, so runs repeat.
DEFAULT_CLIENT_SEED = 0


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
    token = args.token or os.environ.get("FPEDIT_TOKEN") or None
    return EditClient(args.target, token=token, root_certificates=roots, timeout=args.timeout)


def _options(args: argparse.Namespace) -> Any:
    """Only the options a command has (``invert`` takes steps and guidance alone); unset means the server's.

    The values given are judged here by the engine's own rules (light: no torch), so a mistake is a flag
    error before any call rather than a server refusal or a protobuf range error."""
    from fpedit.cli import describe_error
    from fpedit.engine.errors import InvalidInputError
    from fpedit.engine.options import EditOptions

    from .client import edit_options

    given = {
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "replace_window": getattr(args, "window", None),
        "layers": getattr(args, "layers", None),
        "map_format": getattr(args, "map_format", None),
    }
    try:
        EditOptions(**{name: value for name, value in given.items() if value is not None})
    except InvalidInputError as exc:
        raise UsageError(describe_error(exc, args)) from None
    return edit_options(
        steps=args.steps,
        guidance_scale=args.guidance,
        replace_window=getattr(args, "window", None),
        layers=getattr(args, "layers", None),
        map_format=getattr(args, "map_format", None),
    )


def _inversion_args(args: argparse.Namespace) -> dict[str, Any]:
    """The inversion flags given (none: the server's defaults, DDIM), checked before any call."""
    if args.null_text_steps is not None and not 1 <= args.null_text_steps <= MAX_NULL_TEXT_STEPS:
        raise UsageError(
            f"--null-text-steps: must be an integer in 1..{MAX_NULL_TEXT_STEPS}, got {args.null_text_steps}"
        )
    if args.source_prompt and args.inversion in (None, "ddim"):
        raise UsageError(
            "--source-prompt: DDIM inversion (the default) does not use a source prompt; add --inversion "
            "negative-prompt or --inversion null-text to use it, or leave it out"
        )
    given = {
        "source_prompt": args.source_prompt,
        "inversion_method": args.inversion,
        "null_text_steps": args.null_text_steps,
    }
    return {k: v for k, v in given.items() if v is not None}


class UsageError(Exception):
    """A mistake on the client's command line, reported as one ``fpedit: error:`` line (status 2)."""


def _output_format(args: argparse.Namespace, *paths: Path | None) -> str:
    """The image format of the files to write: their extension's, which ``--format`` may only confirm.
    Two outputs that name one file are refused: the second write would replace the first result."""
    from .client import format_for_path

    formats = set()
    seen: set[Path] = set()
    for path in filter(None, paths):
        if path.expanduser().resolve() in seen:
            raise UsageError(f"{path} is named for two outputs; give each output its own file name")
        seen.add(path.expanduser().resolve())
        if path.is_dir():
            raise UsageError(f"{path} is a directory; give a file name such as {path / 'out.png'}")
        try:
            formats.add(format_for_path(path))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if len(formats) > 1:
        raise UsageError(
            f"the output files' extensions name different formats ({', '.join(sorted(formats))})"
        )
    chosen = formats.pop()
    if args.format and args.format != chosen:
        raise UsageError(f"--format {args.format} does not match the output file's extension ({chosen})")
    return chosen


def _read_image(path: Path) -> bytes:
    if path.is_dir():
        raise UsageError(f"IMAGE: {path} is a directory, not an image file")
    if not path.is_file():
        raise UsageError(f"IMAGE: no such file: {path}")
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
                print(f"fpedit: error: {code.name}: {details}{hint}", file=sys.stderr)
                return EXIT_UNREACHABLE
            print(f"fpedit: error: {code.name}: {details}", file=sys.stderr)
            return EXIT_SERVER_REFUSED

    return run


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
        typed = [
            flag
            for flag, value in (
                ("--inversion", args.inversion),
                ("--source-prompt", args.source_prompt),
                ("--null-text-steps", args.null_text_steps),
            )
            if value is not None
        ]
        if typed:
            raise UsageError(
                f"{typed[0]}: inversion options do not apply to --inversion-id (the inversion was made with "
                "its own); leave them out, or give the IMAGE instead"
            )
    output_format = _output_format(args, args.output, args.reconstruction)
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
    fields = {
        "inversion_id": response.inversion_id,
        "unet_rows": response.stats.unet_rows,
        "engine_ms": round(response.stats.engine_ms, 1),
    }
    print(json.dumps(_with_replica(fields, response.stats)))
    return 0


@_grpc_errors
def cmd_client_generate(args: argparse.Namespace) -> int:
    from fpedit.cli import source_output_path

    source_output = source_output_path(args.output, args.source_output)
    output_format = _output_format(args, args.output, source_output)
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
        "limits": MessageToDict(info.limits, preserving_proto_field_name=True),
    }


def add_commands(sub: Any) -> None:
    from fpedit.cli import add_model_arguments, parse_layers, parse_seed, parse_side
    from fpedit.engine.options import DEFAULT_MAX_PROMPT_CHARS

    serve = sub.add_parser("serve", help="serve the gRPC EditService")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    serve.add_argument(
        "--port", type=int, default=50051, help="gRPC port (default 50051; 0 picks a free one)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="requests the engine runs at once (default: 4 with batching, whose device loop merges their "
        "UNet calls; 1 without)",
    )
    serve.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="merge the UNet calls of concurrent requests into shared backend calls (default: on)",
    )
    serve.add_argument(
        "--threads-per-worker",
        type=int,
        help="CPU: torch intra-op threads (default: all cores with batching, else cores // --workers)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=8,
        help="requests that may wait; more get RESOURCE_EXHAUSTED (default 8)",
    )
    serve.add_argument(
        "--max-message-mb", type=int, default=32, help="largest request or response message (default 32 MiB)"
    )
    serve.add_argument("--cache-gib", type=float, default=4.0, help="inversion cache budget (default 4 GiB)")
    serve.add_argument(
        "--cache-ttl-s",
        type=float,
        default=3600.0,
        help="an unused inversion expires after this (default 1 h)",
    )
    serve.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="larger images get INVALID_ARGUMENT (default 16777216, 4096x4096)",
    )
    serve.add_argument(
        "--max-prompt-chars",
        type=int,
        default=DEFAULT_MAX_PROMPT_CHARS,
        help=f"longer prompts get INVALID_ARGUMENT (default {DEFAULT_MAX_PROMPT_CHARS})",
    )
    serve.add_argument(
        "--token", help="require 'authorization: Bearer TOKEN' (default: $FPEDIT_TOKEN, else no token)"
    )
    serve.add_argument("--tls-cert", help="PEM certificate chain (default: plaintext; needs --tls-key)")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert, unencrypted (default: none)")
    serve.add_argument(
        "--grace-s", type=float, default=30.0, help="drain time on SIGTERM, in seconds (default 30)"
    )
    serve.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)"
    )
    serve.add_argument("--metrics-host", help="metrics bind address (default: --host)")
    serve.add_argument(
        "--http-port",
        type=int,
        help="also serve HTTP/JSON and the editor page at http://HOST:PORT/ (default: off; 0 picks a port)",
    )
    serve.add_argument("--http-host", help="HTTP bind address (default: --host)")
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one object per request (default text)",
    )
    ray = serve.add_argument_group("scale out on Ray Serve (pip install 'fpedit[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run the engines as Ray Serve replicas (one per GPU on CUDA) behind this gRPC front",
    )
    ray.add_argument("--replicas", type=int, help="with --ray: engine replicas (default 1)")
    ray.add_argument(
        "--ray-address",
        help="with --ray: join this Ray cluster (auto, or HEAD:6379; run on one of its nodes); default: start one",
    )
    # Start-up errors name the flag as typed (`--workers: must be at least 1`): config fields are flag names.
    serve_flags = {
        option[2:]: option
        for action in serve._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    serve.set_defaults(func=cmd_serve, flags=serve_flags)

    client = sub.add_parser(
        "client",
        help="call a running fpedit server (needs only `pip install 'fpedit[client]'`)",
        description="Call a running `fpedit serve`. Images are written in the format their extension names "
        "(.png, .jpg/.jpeg, .webp); unset edit options take the server's defaults.",
    )
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="CALL")

    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--target", default="127.0.0.1:50051", help="server HOST:PORT (default 127.0.0.1:50051)"
        )
        p.add_argument("--token", help="bearer token (default: $FPEDIT_TOKEN)")
        p.add_argument("--ca-cert", help="PEM root certificate (enables TLS)")
        p.add_argument("--timeout", type=positive_seconds, help="deadline in seconds (default: none)")

    def inversion_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=int, help="DDIM steps (default: the server's, 50)")
        p.add_argument(
            "--guidance", type=float, help="classifier-free guidance scale (default: the server's, 7.5)"
        )

    def method_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--source-prompt",
            help="what the image shows; needed by null-text and negative-prompt, refused with ddim (default: none)",
        )
        p.add_argument(
            "--inversion",
            choices=("ddim", "null-text", "negative-prompt"),
            help="inversion method (default ddim); see the README's 'Inversion methods'",
        )
        p.add_argument(
            "--null-text-steps",
            type=int,
            help=f"null-text: Adam iterations per step, 1..{MAX_NULL_TEXT_STEPS} (default 10)",
        )

    def edit_options(p: argparse.ArgumentParser) -> None:
        inversion_options(p)
        p.add_argument(
            "--window",
            type=float,
            nargs=2,
            metavar=("START", "END"),
            help="replace step i when int(steps*START) <= i < int(steps*END) (default 0.0 0.8)",
        )
        p.add_argument(
            "--layers", type=parse_layers, help="self-attention layers, e.g. '4-14' (default), 'resolution'"
        )
        p.add_argument(
            "--map-format", choices=("qk", "probs"), help="how maps travel (default: the server's)"
        )
        p.add_argument(
            "--format",
            choices=("png", "jpeg", "webp"),
            help="image format; must match the output file's extension, which sets it by default",
        )

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
    connection(edit)
    edit_options(edit)
    method_options(edit)
    edit.set_defaults(func=cmd_client_edit)

    gen = client_sub.add_parser("generate", help="generate from a source prompt and edit toward a target")
    gen.add_argument("--source-prompt", "-s", required=True, help="prompt the source image is generated from")
    gen.add_argument("--target-prompt", "-t", required=True, help="prompt the edited image moves toward")
    gen.add_argument(
        "--seed",
        type=parse_seed,
        default=DEFAULT_CLIENT_SEED,
        help=f"seed of the shared initial noise z_T (default {DEFAULT_CLIENT_SEED}, as `fpedit generate`)",
    )
    gen.add_argument(
        "--height", type=parse_side, help="image height in px, a multiple of 64 (default: model's)"
    )
    gen.add_argument(
        "--width", type=parse_side, help="image width in px, a multiple of 64 (default: model's)"
    )
    gen.add_argument("--output", "-o", type=Path, required=True, help="edited image file (.png, .jpg, .webp)")
    gen.add_argument("--source-output", type=Path, help="source image file (default: OUTPUT.source.EXT)")
    connection(gen)
    edit_options(gen)
    gen.set_defaults(func=cmd_client_generate)

    inv = client_sub.add_parser(
        "invert", help="invert an image on the server; prints its inversion id for `edit --inversion-id`"
    )
    inv.add_argument("image", type=Path, help="input image")
    inv.add_argument(
        "--quiet", "-q", action="store_true", help="print the inversion id alone (default: a JSON line)"
    )
    connection(inv)
    inversion_options(inv)
    method_options(inv)
    inv.set_defaults(func=cmd_client_invert)

    info = client_sub.add_parser("info", help="server info and health as JSON")
    connection(info)
    info.set_defaults(func=cmd_client_info)
