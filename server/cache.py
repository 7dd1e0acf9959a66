"""Server-side inversions, bounded by bytes and age, so that ``Edit`` by id runs the target branch only."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fpedit.engine import Inversion


@dataclass
class _Entry:
    inversion: Inversion
    created: float
    nbytes: int


class InversionCache:
    """LRU over inversions (their trajectory, images and, after a first edit, the source's cached maps).

    Every entry is sized by ``Inversion.nbytes`` (all the memory it keeps) when it is put and again whenever
    an edit may have added maps to it (:meth:`refresh`). An entry expires ``ttl_s`` after it was created; the
    least recently used entries are evicted while the total exceeds ``max_bytes``. An entry too big for the
    budget with its maps keeps only its trajectory.
    """

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._held = 0  # sum of the entries' nbytes
        self.hits = self.misses = self.evictions = self.expirations = 0

    def put(self, inversion: Inversion) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._entries[key] = _Entry(inversion, self._clock(), 0)
            self._account(key)
        return key

    def get(self, key: str) -> Inversion | None:
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry.inversion

    def refresh(self, key: str) -> None:
        """Re-account an entry's size (an edit may have cached maps on it) and evict if over budget."""
        with self._lock:
            if key in self._entries:
                self._account(key)

    def _account(self, key: str) -> None:
        entry = self._entries[key]
        self._held -= entry.nbytes
        entry.nbytes = entry.inversion.nbytes
        if entry.nbytes > self.max_bytes:
            # Too big to keep with its maps: keep the trajectory, drop the maps.
            entry.inversion.drop_maps()
            entry.nbytes = entry.inversion.nbytes
        self._held += entry.nbytes
        self._entries.move_to_end(key)
        self._evict(keep=key)

    def expires_in(self, key: str) -> float:
        with self._lock:
            entry = self._entries.get(key)
            return 0.0 if entry is None else max(0.0, entry.created + self.ttl_s - self._clock())

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries, as accounted."""
        with self._lock:
            return self._held

    def inversions(self) -> list[Inversion]:
        """The cached inversions (for inspection: tests, debugging)."""
        with self._lock:
            return [e.inversion for e in self._entries.values()]

    def counters(self) -> dict[str, int]:
        """Entries, bytes and the hit/miss/eviction counters, read together for a metrics scrape."""
        with self._lock:
            self._expire()
            return {
                "entries": len(self._entries),
                "bytes": self._held,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions + self.expirations,
            }

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if now - e.created > self.ttl_s]:
            self._held -= self._entries.pop(key).nbytes
            self.expirations += 1

    def _evict(self, keep: str | None = None) -> None:
        self._expire()
        for key in list(self._entries):
            if self._held <= self.max_bytes:
                break
            if key == keep:
                continue
            self._held -= self._entries.pop(key).nbytes
            self.evictions += 1
