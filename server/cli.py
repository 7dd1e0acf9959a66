"""``fpedit serve`` and ``fpedit client edit|generate|invert|info``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def cmd_serve(args: argparse.Namespace) -> int:
    from fpedit.cli import engine_from_args

    from .app import serve
    from .service import ServerConfig

    token = args.token or os.environ.get("FPEDIT_TOKEN") or None
    config = ServerConfig(
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_queue=args.max_queue,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        cache_bytes=int(args.cache_gib * 1024**3),
        cache_ttl_s=args.cache_ttl_s,
        max_image_pixels=args.max_image_pixels,
        token=token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        grace_s=args.grace_s,
    )
    if bool(config.tls_cert) != bool(config.tls_key):
        from fpedit.engine.errors import InvalidInputError

        raise InvalidInputError("tls", "give both --tls-cert and --tls-key")
    logging.getLogger("fpedit.server").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = engine_from_args(args)

    def ready(port: int) -> None:
        print(f"fpedit serving on {args.host}:{port}", flush=True)

    serve(engine, config, ready=ready)
    # Drained: every request is answered and logged. Leave without interpreter teardown, where native
    # threads (gRPC's pollers, the BLAS pool) racing static destructors have aborted the process.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _client(args: argparse.Namespace) -> Any:
    from .client import EditClient

    roots = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    token = args.token or os.environ.get("FPEDIT_TOKEN") or None
    return EditClient(args.target, token=token, root_certificates=roots, timeout=args.timeout)


def _options(args: argparse.Namespace) -> Any:
    from .client import edit_options

    return edit_options(
        steps=args.steps,
        guidance_scale=args.guidance,
        replace_window=args.window,
        layers=args.layers,
        map_format=args.map_format,
    )


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {path}")


def _grpc_errors(func):
    def run(args: argparse.Namespace) -> int:
        import grpc

        try:
            return func(args)
        except grpc.RpcError as exc:
            print(f"fpedit: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1

    return run


@_grpc_errors
def cmd_client_edit(args: argparse.Namespace) -> int:
    if bool(args.inversion_id) == (args.image is not None):
        print("fpedit: error: give an IMAGE or --inversion-id (exactly one)", file=sys.stderr)
        return 2
    with _client(args) as client:
        image = None if args.inversion_id else args.image.read_bytes()
        if args.stream:
            response = None
            for event in client.edit_stream(
                args.prompt,
                image=image,
                inversion_id=args.inversion_id or "",
                options=_options(args),
                output_format=args.format,
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
                inversion_id=args.inversion_id or "",
                options=_options(args),
                output_format=args.format,
                skip_reconstruction=args.reconstruction is None,
            )
    _write(args.output, response.edited_image)
    if args.reconstruction and response.reconstruction_image:
        _write(args.reconstruction, response.reconstruction_image)
    print(
        json.dumps(
            {
                "inversion_id": response.inversion_id,
                "unet_rows": response.stats.unet_rows,
                "engine_ms": round(response.stats.engine_ms, 1),
            }
        )
    )
    return 0


@_grpc_errors
def cmd_client_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.generate(
            args.source_prompt,
            args.target_prompt,
            seed=args.seed,
            options=_options(args),
            output_format=args.format,
        )
    _write(args.output, response.edited_image)
    _write(args.output.with_name(f"{args.output.stem}.source{args.output.suffix}"), response.source_image)
    return 0


@_grpc_errors
def cmd_client_invert(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.invert(args.image.read_bytes(), options=_options(args))
    print(
        json.dumps(
            {
                "inversion_id": response.inversion_id,
                "width": response.width,
                "height": response.height,
                "steps": response.steps,
                "expires_in_s": response.expires_in_s,
            }
        )
    )
    return 0


@_grpc_errors
def cmd_client_info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        info = client.info()
        health = client.health()
    print(json.dumps({"health": health, **MessageToDict(info)}, indent=2))
    return 0


def add_commands(sub: Any) -> None:
    from fpedit.cli import add_model_arguments, parse_layers

    serve = sub.add_parser("serve", help="serve the gRPC EditService")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--workers", type=int, default=1, help="engine calls run at once")
    serve.add_argument(
        "--max-queue", type=int, default=8, help="requests that may wait; more get RESOURCE_EXHAUSTED"
    )
    serve.add_argument("--max-message-mb", type=int, default=32)
    serve.add_argument("--cache-gib", type=float, default=4.0, help="inversion cache budget")
    serve.add_argument("--cache-ttl-s", type=float, default=3600.0)
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    serve.add_argument("--token", help="require 'authorization: Bearer TOKEN' (or set FPEDIT_TOKEN)")
    serve.add_argument("--tls-cert", help="PEM certificate chain")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--grace-s", type=float, default=30.0, help="drain time on SIGTERM")
    serve.set_defaults(func=cmd_serve)

    client = sub.add_parser("client", help="call a running fpedit server")
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="CALL")

    def common(p: argparse.ArgumentParser, edit_options: bool = True) -> None:
        p.add_argument("--target", default="127.0.0.1:50051")
        p.add_argument("--token")
        p.add_argument("--ca-cert", help="PEM root certificate (enables TLS)")
        p.add_argument("--timeout", type=float, help="deadline in seconds")
        if edit_options:
            p.add_argument("--steps", type=int)
            p.add_argument("--guidance", type=float)
            p.add_argument("--window", type=float, nargs=2, metavar=("START", "END"))
            p.add_argument("--layers", type=parse_layers)
            p.add_argument("--map-format", choices=("qk", "probs"))
            p.add_argument("--format", default="png", choices=("png", "jpeg", "webp"))

    edit = client_sub.add_parser("edit", help="edit an image (or an inversion id)")
    edit.add_argument("image", type=Path, nargs="?")
    edit.add_argument("--inversion-id")
    edit.add_argument("--prompt", "-p", required=True)
    edit.add_argument("--output", "-o", type=Path, required=True)
    edit.add_argument("--reconstruction", type=Path)
    edit.add_argument("--stream", action="store_true", help="show per-step progress")
    common(edit)
    edit.set_defaults(func=cmd_client_edit)

    gen = client_sub.add_parser("generate", help="generate and edit")
    gen.add_argument("--source-prompt", "-s", required=True)
    gen.add_argument("--target-prompt", "-t", required=True)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--output", "-o", type=Path, required=True)
    common(gen)
    gen.set_defaults(func=cmd_client_generate)

    inv = client_sub.add_parser("invert", help="invert an image; prints its inversion id")
    inv.add_argument("image", type=Path)
    common(inv)
    inv.set_defaults(func=cmd_client_invert)

    info = client_sub.add_parser("info", help="server info and health")
    common(info, edit_options=False)
    info.set_defaults(func=cmd_client_info)
