"""Server-side inversions, bounded by bytes and age, so that ``Edit`` by id runs the target branch only."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from fpedit.engine import Inversion


@dataclass
class _Entry:
    inversion: Inversion
    created: float
    nbytes: int


class InversionCache:
    """LRU over inversions (their trajectory plus, after a first edit, the source's cached maps).

    An entry expires ``ttl_s`` after it was created; the least recently used entries are evicted while the
    total exceeds ``max_bytes``. Sizes are re-read after every edit, since the first edit adds the maps.
    """

    def __init__(self, max_bytes: int, ttl_s: float, clock=time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, inversion: Inversion) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._entries[key] = _Entry(inversion, self._clock(), inversion.nbytes)
            self._account(key)
        return key

    def get(self, key: str) -> Inversion | None:
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.inversion

    def refresh(self, key: str) -> None:
        """Re-account an entry's size (an edit may have cached maps on it) and evict if over budget."""
        with self._lock:
            if key in self._entries:
                self._account(key)

    def _account(self, key: str) -> None:
        entry = self._entries[key]
        entry.nbytes = entry.inversion.nbytes
        if entry.nbytes > self.max_bytes:
            # Too big to keep with its maps: keep the trajectory, drop the maps.
            entry.inversion.drop_maps()
            entry.nbytes = entry.inversion.nbytes
        self._entries.move_to_end(key)
        self._evict(keep=key)

    def expires_in(self, key: str) -> float:
        with self._lock:
            entry = self._entries.get(key)
            return 0.0 if entry is None else max(0.0, entry.created + self.ttl_s - self._clock())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if now - e.created > self.ttl_s]:
            del self._entries[key]

    def _evict(self, keep: str | None = None) -> None:
        self._expire()
        total = sum(e.nbytes for e in self._entries.values())
        for key in list(self._entries):
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            total -= self._entries.pop(key).nbytes
