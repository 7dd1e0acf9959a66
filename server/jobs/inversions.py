"""The inversion cache of a state directory: every inversion also saved in the saved-inversion format (with
the engine's fingerprint), so that an id issued before a restart still edits, and gives the same image.

Memory stays the first level (:class:`~fpedit.server.cache.InversionCache`, its byte budget and age); a miss
reads ``inversions/<id>.safetensors`` (younger than the cache's age limit) through
:func:`~fpedit.engine.saved.load_inversion`, which refuses a file another model, backend or dtype wrote,
naming the field that differs. The state directory's byte bound evicts the files (:mod:`.manager`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fpedit.engine.errors import InvalidInputError
from fpedit.engine.saved import SUFFIX, load_inversion, save_inversion

from ..cache import InversionCache, live_file_age

if TYPE_CHECKING:
    from fpedit.engine import EditEngine, Inversion

#: What an id must look like before it becomes a file name (ours are hex; nothing may climb out of the folder).
SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SavedInversionCache(InversionCache):
    """An :class:`InversionCache` whose entries are also files in ``folder``."""

    def __init__(
        self,
        engine: EditEngine,
        folder: Path,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_bytes, ttl_s, clock)
        self.engine = engine
        self.folder = folder
        self.ttl_s = ttl_s

    def path_of(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def put(self, inversion: Inversion, key: str = "") -> str:
        key = super().put(inversion, key)
        if key:
            save_inversion(self.engine, inversion, self.path_of(key))
        return key

    def get(self, key: str) -> Inversion | None:
        held = super().get(key)
        if held is not None or not SAFE_ID.fullmatch(key):
            return held
        path = self.path_of(key)
        age = live_file_age(path, self.ttl_s, time.time())
        if age is None:
            return None
        try:
            inversion = load_inversion(self.engine, path)
        except InvalidInputError as exc:  # another engine's (fingerprint) or a damaged file
            reason = exc.reason.replace(str(path), "its saved file")  # no server paths to clients
            raise InvalidInputError("inversion_id", f"{key}: {reason}") from None
        InversionCache.put(self, inversion, key, age)  # in memory again for what is left of its life
        return inversion
