"""The OpenAPI document and the ``/docs`` page of the HTTP front (:mod:`.http`), written from the proto
descriptors so the schemas cannot drift from the messages gRPC carries."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from fpedit.v1 import edit_pb2 as pb

from .jobs.views import STATES
from .maps import MAPS_REQUEST_SCHEMA, MAPS_RESPONSE_SCHEMA

if TYPE_CHECKING:
    from .http import RpcRoute


_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
    # proto3 JSON writes 64-bit integers as strings (and reads either)
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}


def _field_schema(field: FieldDescriptor) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _field_schema(value)}
    if field.message_type is not None:
        schema: dict[str, Any] = {"$ref": f"#/components/schemas/{field.message_type.name}"}
    elif field.enum_type is not None:
        schema = {"$ref": f"#/components/schemas/{field.enum_type.name}"}
    else:
        schema = dict(_SCALARS[field.type])
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


def _message_schema(message: Descriptor) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {f.json_name: _field_schema(f) for f in message.fields},
    }
    if message.oneofs and not all(o.name.startswith("_") for o in message.oneofs):
        schema["description"] = "Exactly one of: " + ", ".join(
            f.json_name for o in message.oneofs if not o.name.startswith("_") for f in o.fields
        )
    return schema


def _enum_schema(enum: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [v.name for v in enum.values]}


def openapi_document(routes: Sequence[RpcRoute]) -> dict[str, Any]:
    """OpenAPI 3.1 of ``routes`` (the front's ``API_ROUTES``); the schemas are written from the proto messages,
    so they match."""
    schemas: dict[str, Any] = {
        name: _message_schema(m) for name, m in pb.DESCRIPTOR.message_types_by_name.items()
    }
    schemas.update({name: _enum_schema(e) for name, e in pb.DESCRIPTOR.enum_types_by_name.items()})
    # A job's JSON names its state short (jobs.views); gRPC carries the enum (JOB_STATE_SUCCEEDED, ...).
    schemas["JobState"] = {
        "type": "string",
        "enum": list(STATES),
        "description": "gRPC carries the JobState enum (JOB_STATE_QUEUED, ...); GET /v1/jobs?state= takes "
        "either form",
    }
    schemas["MapsRequest"] = MAPS_REQUEST_SCHEMA
    schemas["MapsResponse"] = MAPS_RESPONSE_SCHEMA
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "integer", "description": "the HTTP status"},
                    "status": {"type": "string", "description": "the gRPC status name"},
                    "message": {"type": "string", "description": "starts with the bad field's name"},
                },
            }
        },
    }
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    errors = {
        "400": {
            "description": "INVALID_ARGUMENT: a bad field, malformed JSON, unknown field, wrong type",
            **error,
        },
        "401": {"description": "UNAUTHENTICATED: missing or wrong bearer token (with --token)", **error},
        "404": {"description": "NOT_FOUND: unknown or expired inversion id", **error},
        "413": {"description": "the body is larger than --max-message-mb allows", **error},
        "429": {"description": "RESOURCE_EXHAUSTED: queue full or out of memory", **error},
        "503": {"description": "UNAVAILABLE: the server is draining", **error},
        "504": {"description": "DEADLINE_EXCEEDED: the X-Server-Timeout passed", **error},
        "500": {"description": "INTERNAL: a bug (details in the server log only)", **error},
    }
    unimplemented = {"description": "UNIMPLEMENTED: this runner (--ray) does not serve the route", **error}
    paths: dict[str, Any] = {}
    for route in routes:
        response_ref = {"$ref": f"#/components/schemas/{route.response_name}"}
        grpc_name = (
            f"gRPC: fpedit.v1.EditService/{route.rpc}." if route.response is not None else "HTTP only."
        )
        operation: dict[str, Any] = {
            "operationId": route.rpc,
            "summary": route.summary,
            "description": grpc_name,
            "parameters": [
                {
                    "name": "X-Server-Timeout",
                    "in": "header",
                    "required": False,
                    "description": "deadline in seconds (DEADLINE_EXCEEDED, 504, once it passes)",
                    "schema": {"type": "number"},
                }
            ],
            "responses": {"200": {"description": "OK"}, **errors},
        }
        if route.local_only:
            operation["responses"]["501"] = unimplemented
        if route.stream:
            operation["responses"]["200"]["content"] = {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "description": "`data: <EditEvent JSON>` per event: progress events, then the result; "
                    "an error after the first event is `event: error` with the error body",
                }
            }
        else:
            operation["responses"]["200"]["content"] = {"application/json": {"schema": response_ref}}
        if route.http_method == "POST":
            request_ref = {"$ref": f"#/components/schemas/{route.request_name}"}
            content: dict[str, Any] = {"application/json": {"schema": request_ref}}
            if route.multipart:
                content["multipart/form-data"] = {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "format": "binary", "description": "the image file"},
                            "request": {
                                "type": "string",
                                "description": f"the rest of the {route.request_name} as JSON",
                            },
                        },
                    }
                }
            operation["requestBody"] = {"required": True, "content": content}
        paths.setdefault(route.path, {})[route.http_method.lower()] = operation
    probe = {"content": {"application/json": {"schema": {"type": "object"}}}}
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: 200 while the process serves.",
            "responses": {"200": {"description": "live", **probe}},
        }
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: 503 while draining.",
            "responses": {
                "200": {"description": "serving", **probe},
                "503": {"description": "draining", **probe},
            },
        }
    }
    paths["/"] = {"get": {"operationId": "editor", "summary": "The editor page (HTML, works offline).",
                          "responses": {"200": {"description": "HTML"}}}}  # fmt: skip
    import fpedit

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fpedit EditService (HTTP/JSON)",
            "version": fpedit.__version__,
            "description": "The gRPC EditService over HTTP: bodies are the proto3 JSON mapping of the "
            "fpedit.v1 messages (lowerCamelCase names, bytes as base64, 64-bit integers as strings).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


def _schema_text(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#{name}">{name}</a>'
    if schema.get("type") == "array":
        return _schema_text(schema["items"]) + "[]"
    if schema.get("type") == "object" and "additionalProperties" in schema:
        return "map&lt;string, " + _schema_text(schema["additionalProperties"]) + "&gt;"
    return escape(schema.get("type", "")) + (f" ({escape(schema['format'])})" if "format" in schema else "")


def docs_page(document: dict[str, Any]) -> str:
    """The API description as one HTML page written on the server (no script, nothing fetched)."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fpedit HTTP API</title><style>"
        "body{font:15px/1.5 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#1c2330}"
        "code,td{font-family:ui-monospace,monospace;font-size:13px}table{border-collapse:collapse;width:100%}"
        "td,th{border-bottom:1px solid #dde;padding:3px 8px;text-align:left;vertical-align:top}"
        ".m{display:inline-block;min-width:3.5em;font-weight:700;color:#fff;background:#3b6fd8;border-radius:4px;"
        "text-align:center;margin-right:.5em}.get{background:#2d9d5b}h3{margin-bottom:.2em}"
        "</style></head><body>",
        f"<h1>{escape(document['info']['title'])}</h1><p>{escape(document['info']['description'])}</p>",
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. The editor page: <a href='/'>/</a>. "
        "With <code>--token</code>, send <code>Authorization: Bearer TOKEN</code> (not needed for /, /docs, "
        '/openapi.json, /healthz, /readyz). Errors: <code>{"error": {"code", "status", "message"}}</code>.'
        "</p><h2>Routes</h2>",
    ]
    for path, methods in document["paths"].items():
        for verb, op in methods.items():
            parts.append(
                f"<h3><span class='m {verb}'>{verb.upper()}</span><code>{escape(path)}</code></h3>"
                f"<p>{escape(op['summary'])} {escape(op.get('description', ''))}</p>"
            )
            body = op.get("requestBody", {}).get("content", {})
            if body:
                kinds = ", ".join(
                    f"<code>{escape(kind)}</code>"
                    + (f" {_schema_text(spec['schema'])}" if "$ref" in spec["schema"] else "")
                    for kind, spec in body.items()
                )
                parts.append(f"<p>Body: {kinds}</p>")
            rows = []
            for status, response in op["responses"].items():
                shown = ", ".join(
                    f"<code>{escape(kind)}</code> {_schema_text(spec['schema'])}"
                    for kind, spec in response.get("content", {}).items()
                    if status == "200"
                )
                rows.append(f"<tr><td>{status}</td><td>{escape(response['description'])} {shown}</td></tr>")
            parts.append("<table>" + "".join(rows) + "</table>")
    parts.append("<h2>Messages</h2>")
    for name, schema in document["components"]["schemas"].items():
        parts.append(f"<h3 id='{escape(name)}'>{escape(name)}</h3>")
        if "enum" in schema:
            parts.append("<p>" + " | ".join(f"<code>{escape(v)}</code>" for v in schema["enum"]) + "</p>")
            continue
        rows = [
            f"<tr><td>{escape(field)}</td><td>{_schema_text(sub)}</td></tr>"
            for field, sub in schema.get("properties", {}).items()
        ]
        note = f"<p>{escape(schema['description'])}</p>" if "description" in schema else ""
        parts.append(note + "<table>" + "".join(rows) + "</table>")
    parts.append("</body></html>")
    return "".join(parts)
