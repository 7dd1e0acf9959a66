"""Benchmark datasets: PIE-Bench's ``mapping_file.json`` and the FPE repository's prompt-pair JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fpedit.engine.errors import InvalidInputError

from .masks import decode_rle


@dataclass
class Item:
    """One edit to run and score. ``image`` None: a generated edit (Algorithm 1) from ``seed``."""

    id: str
    source_prompt: str
    target_prompt: str
    image: Path | None = None
    edit_type: str = ""
    rle: Sequence[int] | None = None
    seed: int = 0
    #: PIE-Bench's ``blended_word`` split on spaces (source-side word, then target-side word), for --blend words.
    blended_words: tuple[str, ...] = ()

    def mask(self) -> np.ndarray | None:
        """The 512x512 PIE-Bench mask (1 = edited), or None."""
        return None if self.rle is None else decode_rle(self.rle)


def _strip_brackets(prompt: str) -> str:
    """PIE-Bench marks the edited words with ``[ ]``; its evaluation drops the brackets."""
    return prompt.replace("[", "").replace("]", "")


def load_dataset(path: str | Path, images: str | Path | None = None, seed: int = 0) -> tuple[str, list[Item]]:
    """Read ``path``; returns ("pie" or "fpe", items). Image paths resolve under ``images`` (default: the
    dataset file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError("dataset", f"no such file: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError("dataset", f"{path} is not JSON ({exc})") from None
    root = Path(images) if images is not None else path.parent
    if images is not None and not root.is_dir():
        raise InvalidInputError("images", f"no such folder: {root}")
    if isinstance(data, dict):
        return "pie", _pie_items(data, root, path)
    if isinstance(data, list):
        return "fpe", _fpe_items(data, root, path, seed)
    raise InvalidInputError("dataset", f"{path}: expected PIE-Bench's mapping (an object) or a list of pairs")


def _field(entry: Any, names: Sequence[str], where: str) -> str:
    if not isinstance(entry, dict):
        raise InvalidInputError("dataset", f"{where}: expected an object, got {type(entry).__name__}")
    for name in names:
        value = entry.get(name)
        if isinstance(value, str):
            return value
    raise InvalidInputError("dataset", f"{where}: missing {' or '.join(repr(n) for n in names)}")


def _pie_items(data: dict[str, Any], root: Path, path: Path) -> list[Item]:
    items = []
    for key, entry in data.items():
        where = f"{path.name}[{key!r}]"
        image = root / _field(entry, ("image_path",), where)
        rle = entry.get("mask")
        if rle is not None and not isinstance(rle, list):
            raise InvalidInputError("dataset", f"{where}: 'mask' must be PIE-Bench's run-length list")
        blended = entry.get("blended_word") or ""
        if not isinstance(blended, str):
            raise InvalidInputError("dataset", f"{where}: 'blended_word' must be a string such as 'cat dog'")
        items.append(
            Item(
                id=str(key),
                source_prompt=_strip_brackets(_field(entry, ("original_prompt",), where)),
                target_prompt=_strip_brackets(_field(entry, ("editing_prompt",), where)),
                image=image,
                edit_type=str(entry.get("editing_type_id", "")),
                rle=rle,
                blended_words=tuple(blended.split()),
            )
        )
    return items


def _fpe_items(data: list[Any], root: Path, path: Path, seed: int) -> list[Item]:
    """The FPE repository's lists: ``soure_prompt`` (its spelling) or ``source_prompt``, ``edit_prompt`` or
    ``target_prompt``, and ``image_name`` for real images (looked up by file name under the images folder)."""
    items = []
    width = max(4, len(str(len(data))))
    for index, entry in enumerate(data):
        where = f"{path.name}[{index}]"
        image_name = entry.get("image_name") if isinstance(entry, dict) else None
        items.append(
            Item(
                id=f"{index:0{width}d}",
                source_prompt=_field(entry, ("soure_prompt", "source_prompt"), where),
                target_prompt=_field(entry, ("edit_prompt", "target_prompt"), where),
                image=root / Path(image_name).name if isinstance(image_name, str) else None,
                edit_type=str(entry.get("edit_type", "")) if isinstance(entry, dict) else "",
                seed=seed + index,
            )
        )
    return items
