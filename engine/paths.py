"""The files a request reads and writes, checked before any work: the CLI's commands and the gRPC client
(``EditClient`` given a path) refuse the same mistakes in the same words; what an image's signature claims;
and writing a file whole or not at all. Importing this module costs no torch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InvalidInputError
from .options import IMAGE_FILE_FORMATS


def check_output_path(path: Path | None, flag: str) -> None:
    """Refuse, before any work, an output that could not be written as an image."""
    if path is None:
        return
    if path.is_dir():
        raise InvalidInputError(flag, f"{path} is a directory; give a file name such as {path / 'out.png'}")
    if path.suffix.lower() not in IMAGE_FILE_FORMATS:
        raise InvalidInputError(
            flag,
            f"{path}: the extension must be one of {', '.join(IMAGE_FILE_FORMATS)} (it picks the format)",
        )
    if path.parent.exists() and not path.parent.is_dir():
        raise InvalidInputError(flag, f"{path.parent} is not a directory")


def check_distinct_outputs(*outputs: tuple[Path | None, str]) -> None:
    """Refuse two outputs that name one file: the later write would silently replace the earlier result."""
    seen: dict[Path, str] = {}
    for path, flag in outputs:
        if path is None:
            continue
        key = path.expanduser().resolve()
        if key in seen:
            raise InvalidInputError(
                flag, f"{path} is also the {seen[key]} file; give each output its own file name"
            )
        seen[key] = flag


def check_input_image(path: Path, flag: str = "IMAGE") -> None:
    """Refuse a directory or a missing file before any work (the decoder's message would be less clear)."""
    if path.is_dir():
        raise InvalidInputError(flag, f"{path} is a directory, not an image file")
    if not path.is_file():
        raise InvalidInputError(flag, f"no such file: {path}")


def write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that a reader (or a restart after kill -9) sees the whole file or none:
    a temporary file beside it, flushed to disk, then renamed over it."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def claimed_format(data: bytes) -> str | None:
    """The format a file's signature claims (PNG, JPEG, WEBP), whether or not the rest is intact."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None
