"""``fpedit client job submit|get|list|cancel|watch``: the job RPCs from the command line.

``submit`` takes the synchronous route's JSON body (the proto3 JSON mapping, as ``POST /v1/edit`` takes it)
from a file or stdin, with ``--image`` for the image file; every command prints the job as one JSON object,
its images written to ``--output-dir`` (named ``<id>.<field>.<ext>``) instead of printed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .state import image_extension
from .views import STATE_ENUM, STATES, job_dict

KINDS = ("edit", "generate", "invert")


def job_json(job: Any, output_dir: Path | None) -> dict[str, Any]:
    """The job as the server's JSON of it (:func:`.views.job_dict`) with snake_case names; image bytes become
    the files written (or their sizes)."""
    kind = job.WhichOneof("result")
    images: dict[str, bytes] = {}
    if kind is not None:
        result = getattr(job, kind)
        for field in result.DESCRIPTOR.fields:
            if field.type == field.TYPE_BYTES and getattr(result, field.name):
                images[field.name] = getattr(result, field.name)
                result.ClearField(field.name)
    fields = job_dict(job, proto_names=True)
    for name, data in images.items():
        if output_dir is None:
            fields[kind][name] = f"<{len(data)} bytes; --output-dir writes it>"
            continue
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"{job.id}.{name}.{image_extension(data)}"
        path.write_bytes(data)
        fields[kind][name] = str(path)
    return fields


def add_job_commands(
    client_sub: Any,
    connect: Callable[[argparse.ArgumentParser], None],
    client: Callable[[argparse.Namespace], Any],
    errors: Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]],
    usage_error: type[Exception],
) -> None:
    """Add ``job`` under ``fpedit client``; ``connect``/``client``/``errors``/``usage_error`` are the client
    commands' own connection flags, channel, error handling and usage error (one line, its exit status)."""
    from fpedit.v1 import edit_pb2 as pb

    def call(args: argparse.Namespace, rpc: str, request: Any) -> Any:
        with client(args) as connection:
            return getattr(connection.stub, rpc)(
                request, metadata=connection.metadata, timeout=connection.timeout
            )

    def show(job: Any, args: argparse.Namespace) -> None:
        print(json.dumps(job_json(job, getattr(args, "output_dir", None))))

    @errors
    def submit(args: argparse.Namespace) -> int:
        from google.protobuf.json_format import ParseDict, ParseError

        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text()
        try:
            body = json.loads(text or "{}")
            message = ParseDict(body, getattr(pb.SubmitJobRequest(), args.kind))
        except (ValueError, ParseError) as exc:
            raise usage_error(f"--request: not a JSON {args.kind} body ({exc})") from None
        if args.image is not None:
            message.image = args.image.read_bytes()
        request = pb.SubmitJobRequest(webhook_url=args.webhook_url or "")
        getattr(request, args.kind).CopyFrom(message)
        show(call(args, "SubmitJob", request), args)
        return 0

    @errors
    def get(args: argparse.Namespace) -> int:
        show(call(args, "GetJob", pb.GetJobRequest(id=args.id)), args)
        return 0

    @errors
    def listing(args: argparse.Namespace) -> int:
        state = STATE_ENUM[args.state] if args.state else 0
        request = pb.ListJobsRequest(state=state, limit=args.limit, page_token=args.page_token or "")
        response = call(args, "ListJobs", request)
        jobs = [job_json(job, None) for job in response.jobs]
        print(json.dumps({"jobs": jobs, "next_page_token": response.next_page_token}))
        return 0

    @errors
    def cancel(args: argparse.Namespace) -> int:
        show(call(args, "CancelJob", pb.CancelJobRequest(id=args.id)), args)
        return 0

    @errors
    def watch(args: argparse.Namespace) -> int:
        last = None
        with client(args) as connection:
            stream = connection.stub.WatchJob(
                pb.GetJobRequest(id=args.id), metadata=connection.metadata, timeout=connection.timeout
            )
            for job in stream:
                p = job.progress
                if p.total:
                    print(f"\r{p.stage} {p.step}/{p.total}", end="", file=sys.stderr, flush=True)
                last = job
        print(file=sys.stderr)
        assert last is not None
        show(last, args)
        return 0 if last.state == pb.JOB_STATE_SUCCEEDED else 1

    job = client_sub.add_parser("job", help="submit a job and follow it (works after the connection ends)")
    sub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    p = sub.add_parser("submit", help="queue an edit, generate or invert; prints the job (with its id)")
    p.add_argument("kind", choices=KINDS, help="the synchronous call the job runs: " + ", ".join(KINDS))
    p.add_argument(
        "--request", required=True, help="JSON body of the synchronous route (a file, or - for stdin)"
    )
    p.add_argument("--image", type=Path, help="image file to send (default: the body's own, if any)")
    p.add_argument("--webhook-url", help="call this URL, signed, when the job ends (default: none)")
    p.set_defaults(func=submit, output_dir=None)
    for name, func, text in (("get", get, "the job now"), ("cancel", cancel, "cancel the job"),
                             ("watch", watch, "follow the job's progress until it ends")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("id", help="the job id SubmitJob returned")
        p.add_argument(
            "--output-dir", type=Path, help="write the result's images here (default: not written)"
        )
        p.set_defaults(func=func)
    p = sub.add_parser("list", help="this token's jobs, newest first")
    p.add_argument("--state", choices=STATES, help="only jobs in this state (default: all)")
    p.add_argument("--limit", type=int, default=20, help="jobs per page, 1..100 (default 20)")
    p.add_argument("--page-token", help="next_page_token of the previous page (default: the first page)")
    p.set_defaults(func=listing)
    for parser in sub.choices.values():
        connect(parser)
