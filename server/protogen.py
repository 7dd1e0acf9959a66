"""Regenerate the committed gRPC stubs in ``fpedit/v1`` from ``protos/``:

    python -m fpedit.server.protogen

Needs grpcio-tools (the ``test`` extra). tests/test_server.py checks the committed stubs are current.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTOS = ("fpedit/v1/edit.proto",)


def generate(out_dir: Path = REPO) -> list[Path]:
    """Write ``fpedit/v1/edit_pb2{,_grpc}.py`` (and ``.pyi``) under ``out_dir``; returns their paths."""
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    names = ("edit_pb2.py", "edit_pb2.pyi", "edit_pb2_grpc.py")
    return [out_dir / "fpedit" / "v1" / name for name in names]


if __name__ == "__main__":
    for path in generate():
        print(f"wrote {path}")
    sys.exit(0)
