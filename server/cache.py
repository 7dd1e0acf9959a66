"""What the server keeps between requests, bounded by bytes and by age.

:class:`BoundedLRU` is the one policy: values by key, the least recently used evicted while the total exceeds
``max_bytes``, every value expiring ``ttl_s`` after it was put. :class:`InversionCache` (a server's own
inversions, so that ``Edit`` by id runs the target branch only) and the Ray store's records
(:mod:`fpedit.server.ray.store`) both keep their entries in one. Plain Python: no torch is imported here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from fpedit.engine import Inversion

V = TypeVar("V")


@dataclass
class _Held(Generic[V]):
    value: V
    nbytes: int
    created: float


def live_file_age(path: Path, ttl_s: float, now: float) -> float | None:
    """How old ``path`` is (by modification time, against ``now``) while it is younger than ``ttl_s``; None
    when it is missing, or older (then it is deleted): the age limit of entries kept as files on disk, and
    what is left of an entry's life when it is read back into memory."""
    try:
        age = now - path.stat().st_mtime
    except OSError:
        return None
    if age > ttl_s:
        path.unlink(missing_ok=True)
        return None
    return age


class BoundedLRU(Generic[V]):
    """Values by key, bounded by total bytes (least recently used out first) and by age (``ttl_s`` after put).

    The value just put or resized is never the one evicted for it: a value larger than the whole budget is
    kept alone (callers that must refuse it check ``max_bytes`` first). Expired values count as
    ``expirations``, values pushed out by the budget as ``evictions``. Thread-safe.
    """

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._items: OrderedDict[str, _Held[V]] = OrderedDict()
        self._lock = threading.Lock()
        self._held = 0  # sum of the values' nbytes
        self.hits = self.misses = self.evictions = self.expirations = 0

    def put(self, key: str, value: V, nbytes: int, age_s: float = 0.0) -> None:
        """Keep ``value`` under ``key`` (replacing what was there) as the most recently used; ``age_s``: how
        old it is already (a value read back from disk keeps its age, not a fresh ``ttl_s``)."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._held -= old.nbytes
            self._items[key] = _Held(value, int(nbytes), self.clock() - max(0.0, float(age_s)))
            self._held += int(nbytes)
            self._bound(keep=key)

    def resize(self, key: str, size_of: Callable[[V], int]) -> None:
        """Re-account a value that may have grown (``size_of(value)`` is its size now, read under the lock),
        mark it most recently used and evict others if the total is over budget."""
        with self._lock:
            held = self._items.get(key)
            if held is None:
                return
            self._held -= held.nbytes
            held.nbytes = int(size_of(held.value))
            self._held += held.nbytes
            self._items.move_to_end(key)
            self._bound(keep=key)

    def get(self, key: str) -> V | None:
        with self._lock:
            self._expire()
            held = self._items.get(key)
            if held is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return held.value

    def delete(self, key: str) -> None:
        with self._lock:
            held = self._items.pop(key, None)
            if held is not None:
                self._held -= held.nbytes

    def expires_in(self, key: str) -> float:
        """Seconds until ``key`` expires; 0 when it is not held."""
        with self._lock:
            held = self._items.get(key)
            return 0.0 if held is None else max(0.0, held.created + self.ttl_s - self.clock())

    def values(self) -> list[V]:
        with self._lock:
            return [held.value for held in self._items.values()]

    @property
    def nbytes(self) -> int:
        """Bytes held by the values, as accounted."""
        with self._lock:
            return self._held

    def counters(self) -> dict[str, int]:
        """Entries, bytes and the hit/miss/eviction/expiration counters, read together (expired ones gone)."""
        with self._lock:
            self._expire()
            return {
                "entries": len(self._items),
                "bytes": self._held,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "expirations": self.expirations,
            }

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, held in self._items.items() if now - held.created > self.ttl_s]:
            self._held -= self._items.pop(key).nbytes
            self.expirations += 1

    def _bound(self, keep: str) -> None:
        self._expire()
        for key in list(self._items):
            if self._held <= self.max_bytes:
                break
            if key != keep:
                self._held -= self._items.pop(key).nbytes
                self.evictions += 1


class InversionCache:
    """A server's inversions (their trajectory, images and, after a first edit, the source's cached maps).

    Every entry is sized by ``Inversion.nbytes`` (all the memory it keeps) when it is put and again whenever
    an edit may have added maps to it (:meth:`refresh`). An entry too big for the budget with its maps keeps
    only its trajectory; one too big even without them is not kept at all (:meth:`put` returns ``""``), so
    that one large request cannot hold more than the budget nor push every other entry out.
    """

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: BoundedLRU[Inversion] = BoundedLRU(max_bytes, ttl_s, clock)
        self.refused = 0  # inversions larger than the whole budget, not kept

    @property
    def max_bytes(self) -> int:
        return self._entries.max_bytes

    @property
    def evictions(self) -> int:
        return self._entries.evictions

    def put(self, inversion: Inversion, key: str = "", age_s: float = 0.0) -> str:
        """Keep ``inversion`` under ``key`` (a new id when empty; ``age_s`` old already) and return it; ``""``
        (nothing kept, nothing evicted) when it exceeds the whole budget even without its maps."""
        nbytes = self._size(inversion)
        if nbytes > self.max_bytes:
            self.refused += 1
            return ""
        key = key or uuid.uuid4().hex
        self._entries.put(key, inversion, nbytes, age_s)
        return key

    def get(self, key: str) -> Inversion | None:
        return self._entries.get(key)

    def refresh(self, key: str) -> None:
        """Re-account an entry's size (an edit may have cached maps on it) and evict if over budget."""
        self._entries.resize(key, self._size)

    def _size(self, inversion: Inversion) -> int:
        if inversion.nbytes > self.max_bytes:
            inversion.drop_maps()  # too big to keep with its maps: keep the trajectory
        return inversion.nbytes

    def expires_in(self, key: str) -> float:
        return self._entries.expires_in(key)

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries, as accounted."""
        return self._entries.nbytes

    def counters(self) -> dict[str, int]:
        """Entries, bytes and the hit/miss/eviction counters, read together for a metrics scrape."""
        counters = self._entries.counters()
        counters["evictions"] += counters.pop("expirations")
        return counters

    def __len__(self) -> int:
        return len(self._entries)
