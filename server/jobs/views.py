"""The JSON of a job, written in one place for every JSON view of it: the HTTP routes (202 of ``POST``, ``GET``,
the list's items, ``DELETE``), the webhook body and what ``fpedit client job`` prints.

Issue 28 gives a job's ``state`` as ``queued|running|succeeded|failed|cancelled`` (the names the table, the
metrics and the list filter use); the proto3 JSON mapping alone would write the enum's names
(``JOB_STATE_SUCCEEDED``), so the JSON is the mapping with ``state`` renamed. gRPC keeps the enum.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from fpedit.v1 import edit_pb2 as pb

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
#: Short name -> the JobState number gRPC carries.
STATE_ENUM = {name: pb.JobState.Value(f"JOB_STATE_{name.upper()}") for name in STATES}
STATE_NAMES = {number: name for name, number in STATE_ENUM.items()}


def parse_state(text: str) -> str | None:
    """The short name of ``text`` given either way (``succeeded`` or ``JOB_STATE_SUCCEEDED``, any case), or
    None when it names no state: the list filter took the enum's names before the JSON used the short ones."""
    name = text.strip().lower().removeprefix("job_state_")
    return name if name in STATES else None


def job_dict(job: pb.Job, proto_names: bool = False) -> dict[str, Any]:
    """``job`` in the proto3 JSON mapping (lowerCamelCase names, or the proto's with ``proto_names``, as the
    CLI prints) with ``state`` as its short name."""
    fields = json_format.MessageToDict(job, preserving_proto_field_name=proto_names)
    if job.state in STATE_NAMES:
        fields["state"] = STATE_NAMES[job.state]
    return fields


def job_json(job: pb.Job) -> str:
    """The HTTP body of one job (and the webhook's): :func:`job_dict` as compact JSON."""
    return json.dumps(job_dict(job), ensure_ascii=False)


def jobs_json(response: pb.ListJobsResponse) -> str:
    """The HTTP body of ``GET /v1/jobs``: each job as :func:`job_dict`; empty fields left out, as the proto3
    JSON mapping leaves them."""
    fields: dict[str, Any] = {}
    if response.jobs:
        fields["jobs"] = [job_dict(job) for job in response.jobs]
    if response.next_page_token:
        fields["nextPageToken"] = response.next_page_token
    return json.dumps(fields, ensure_ascii=False)
