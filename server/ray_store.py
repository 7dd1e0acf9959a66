"""The shared inversion store behind Ray Serve replicas: affinity is an optimisation, never a requirement.

An edit by inversion id normally lands on the replica that inverted the image (Serve model multiplexing), which
still holds the inversion and the source's maps. When that replica is gone (scaled down, restarted, killed) or
evicted the inversion, any other replica rebuilds it from a :class:`InversionRecord` kept here: the DDIM
trajectory, the working-size image and the step count. The source's maps are recomputed from the trajectory
on the first edit, so the result is the same as on the original replica; a miss costs one map capture (the
source rows of the replaced steps) plus the transfer of the trajectory, never a new inversion.

The store is one named Ray actor (:class:`InversionStore`) that holds a Ray object reference per id. The
actor itself calls ``ray.put``, so it owns every object: a record outlives the replica that made it (an
object owned by a dead worker is lost in Ray). :class:`BoundedRecords` bounds it by bytes (least recently
used first) and by age; it is plain Python so its policy is testable without Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Default name and namespace of the store actor; every replica of one deployment must use the same pair.
STORE_NAME = "fpedit-inversion-store"
STORE_NAMESPACE = "fpedit"
DEFAULT_STORE_BYTES = 2 * 1024**3
DEFAULT_STORE_TTL_S = 3600.0


@dataclass(frozen=True)
class InversionRecord:
    """What another replica needs to rebuild an inversion exactly (the maps are recomputed from it)."""

    trajectory: np.ndarray  # (steps + 1, C, h, w) float32: z_0 .. z_T
    steps: int
    image: np.ndarray  # (H, W, 3) uint8, the working-size image
    fingerprint: str  # engine_fingerprint() of the engine that inverted it
    #: Algorithm 3 inversions (null-text, negative-prompt) also need what their source branch runs with.
    method: str = "ddim"
    source_prompt: str = ""
    null_embeddings: np.ndarray | None = None  # (steps, L, D) float32
    guidance_scale: float | None = None

    @property
    def nbytes(self) -> int:
        nulls = self.null_embeddings.nbytes if self.null_embeddings is not None else 0
        return int(self.trajectory.nbytes + self.image.nbytes + nulls)


def engine_fingerprint(info: dict[str, Any]) -> str:
    """Identify what an inversion depends on (model, backend, precision, device type), not which replica.

    Replicas of one deployment share it; an inversion made by a different model or precision is refused
    instead of silently giving a different edit.
    """
    keys = ("model", "backend", "dtype", "precision", "vae_dtype")
    described = {k: str(info[k]) for k in keys if k in info}
    described["device"] = str(info.get("device", "")).split(":")[0]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def record_from_inversion(inversion: Any, fingerprint: str) -> InversionRecord:
    """Copy an engine :class:`~fpedit.engine.Inversion` to host memory as a record: trajectory, image and, for
    Algorithm 3 inversions, the method, source prompt, null embeddings and their guidance."""
    trajectory = inversion.trajectory.detach().float().cpu().numpy()
    image = np.asarray(inversion.image.convert("RGB"), dtype=np.uint8)
    nulls = inversion.null_embeddings
    return InversionRecord(
        trajectory=trajectory,
        steps=int(inversion.steps),
        image=image,
        fingerprint=fingerprint,
        method=inversion.method,
        source_prompt=inversion.source_prompt,
        null_embeddings=nulls.detach().float().cpu().numpy() if nulls is not None else None,
        guidance_scale=inversion.guidance_scale,
    )


def inversion_from_record(engine: Any, record: InversionRecord) -> Any:
    """Rebuild an :class:`~fpedit.engine.Inversion` for ``engine`` (maps empty: the first edit recomputes them)."""
    import torch
    from PIL import Image

    from fpedit.engine import Inversion

    trajectory = torch.from_numpy(np.array(record.trajectory, dtype=np.float32)).to(engine.backend.device)
    nulls = None
    if record.null_embeddings is not None:
        nulls = torch.from_numpy(np.array(record.null_embeddings, dtype=np.float32))
    return Inversion(
        trajectory=trajectory,
        steps=record.steps,
        image=Image.fromarray(record.image),
        engine_id=engine.engine_id,
        stats={"restored_from_store": True},
        map_cache_limit=engine.map_cache_bytes,
        method=record.method,
        source_prompt=record.source_prompt,
        null_embeddings=nulls,
        guidance_scale=record.guidance_scale,
    )


@dataclass
class _Held:
    value: Any
    nbytes: int
    created: float


@dataclass
class BoundedRecords:
    """An LRU map bounded by total bytes and by entry age (``ttl_s`` after it was put)."""

    max_bytes: int
    ttl_s: float
    clock: Callable[[], float] = time.monotonic
    _items: OrderedDict[str, _Held] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    hits: int = 0
    misses: int = 0
    evicted: int = 0

    def put(self, key: str, value: Any, nbytes: int) -> bool:
        """Keep ``value``; returns False (and keeps nothing) when it alone exceeds the byte budget."""
        with self._lock:
            self._items.pop(key, None)
            if nbytes > self.max_bytes:
                return False
            self._items[key] = _Held(value, int(nbytes), self.clock())
            self._bound()
            return True

    def get(self, key: str) -> Any | None:
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
            self._items.pop(key, None)

    def expires_in(self, key: str) -> float:
        with self._lock:
            held = self._items.get(key)
            return 0.0 if held is None else max(0.0, held.created + self.ttl_s - self.clock())

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            return {
                "entries": len(self._items),
                "bytes": sum(h.nbytes for h in self._items.values()),
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evicted": self.evicted,
            }

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, h in self._items.items() if now - h.created > self.ttl_s]:
            del self._items[key]
            self.evicted += 1

    def _bound(self) -> None:
        self._expire()
        total = sum(h.nbytes for h in self._items.values())
        while total > self.max_bytes and self._items:
            _, held = self._items.popitem(last=False)
            total -= held.nbytes
            self.evicted += 1


class InversionStore:
    """Ray actor body: inversion records by id, owned by this actor, bounded by bytes and age."""

    def __init__(self, max_bytes: int = DEFAULT_STORE_BYTES, ttl_s: float = DEFAULT_STORE_TTL_S) -> None:
        self._records = BoundedRecords(int(max_bytes), float(ttl_s))

    def put(self, key: str, record: InversionRecord) -> bool:
        import ray

        # ray.put here, not in the caller: the object's owner is this actor, so it survives the replica.
        return self._records.put(key, ray.put(record), record.nbytes)

    def get(self, key: str) -> list[Any] | None:
        """The record's object reference, wrapped in a list so that Ray hands back the reference itself."""
        ref = self._records.get(key)
        return None if ref is None else [ref]

    def delete(self, key: str) -> None:
        self._records.delete(key)

    def expires_in(self, key: str) -> float:
        return self._records.expires_in(key)

    def stats(self) -> dict[str, int]:
        return self._records.stats()


def open_store(
    name: str = STORE_NAME,
    namespace: str = STORE_NAMESPACE,
    max_bytes: int = DEFAULT_STORE_BYTES,
    ttl_s: float = DEFAULT_STORE_TTL_S,
) -> Any:
    """Get the store actor, creating it on first use (the first caller's bounds apply).

    Detached: Serve's replicas come and go, and the store must outlive each of them; whoever started the
    application removes it (``close_store``). It needs no CPU reservation (it only moves references).
    """
    import ray

    actor = ray.remote(InversionStore).options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=32,
    )
    return actor.remote(max_bytes, ttl_s)


def close_store(name: str = STORE_NAME, namespace: str = STORE_NAMESPACE) -> None:
    """Kill the store actor if it exists (its records are freed with it)."""
    import ray

    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
