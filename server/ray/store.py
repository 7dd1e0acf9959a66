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

Failure domains (docs/design.md): the store is pinned to the front's node (the node that opens it), so it
lives and dies with the front and the loss of any other node leaves it and its objects (``ray.put`` by the
store: owned by it, first copy on its node) intact. Ray restarts it if its process dies. Every call to it goes
through :class:`StoreClient`, with a timeout, and a failed call degrades (an inversion not shared, an id not
found) instead of failing the request.

With ``--state-dir DIR`` the front opens it with DIR's inversions folder (on the front's node, where the store
runs): every record it keeps is also a file there (:class:`RecordFiles`), read back on a miss while younger
than the store's age limit, so an id outlives the store's memory -- a front restart (even kill -9) or a
restart of the store's process. Without DIR those lose the records (their ids answer NOT_FOUND). The state
directory's byte bound (``--state-gib``) evicts the files with the rest of DIR. A record carries the engine
fields its fingerprint is made of, so that a replica of another model, backend or precision refuses it
naming the field that differs (:func:`foreign_engine`), as a standalone server refuses another engine's
saved inversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fpedit.engine.errors import InvalidInputError
from fpedit.engine.paths import write_atomically
from fpedit.engine.saved import SUFFIX

from ..cache import BoundedLRU, live_file_age
from ..jobs.inversions import SAFE_ID

log = logging.getLogger("fpedit.server")

#: Default name and namespace of the store actor; every replica of one deployment must use the same pair.
STORE_NAME = "fpedit-inversion-store"
STORE_NAMESPACE = "fpedit"
DEFAULT_STORE_BYTES = 2 * 1024**3
DEFAULT_STORE_TTL_S = 3600.0
#: The longest any call to the store may take (a record is a few MB on one machine or a LAN): past it the
#: caller goes on without the store rather than hang.
STORE_CALL_TIMEOUT_S = 5.0
#: Calls to the store that Ray sends again by itself when the store restarts under them.
STORE_TASK_RETRIES = 2
#: The engine fields a fingerprint is made of, in the order a refusal names them (the likeliest first).
ENGINE_FIELDS = (
    "model",
    "weights",
    "backend",
    "dtype",
    "precision",
    "vae_dtype",
    "scheduler",
    "device",
    "adapters",
)
#: What the store's files say they are: not the saved-inversion format (:mod:`fpedit.engine.saved`), whose
#: fingerprint is another one, but the same container and suffix (the state directory's sweep finds both).
RECORD_FORMAT = "fpedit-store-record"
RECORD_FORMAT_VERSION = "1"


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
    #: (width, height) of the image as given: edits of a restored inversion come back at this size.
    original_size: tuple[int, int] | None = None
    #: The adapter set ((name, scale) pairs) it was made with: edits elsewhere must use the same.
    adapters: tuple[tuple[str, float], ...] = ()
    #: engine_fields() of the engine that inverted it: what a refusal names when the fingerprints differ.
    engine: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        nulls = self.null_embeddings.nbytes if self.null_embeddings is not None else 0
        return int(self.trajectory.nbytes + self.image.nbytes + nulls)


def engine_fields(engine: Any) -> dict[str, str]:
    """What an inversion depends on, not which replica: the weights (a digest: a checkpoint replaced in the
    same folder, or fused LoRAs, change it), the scheduler, model, backend, precision, device type and the
    adapters offered, from an :class:`~fpedit.EditEngine` (its saved-inversion fingerprint and ``info()``)."""
    info = engine.info()
    keys = ("model", "backend", "dtype", "precision", "vae_dtype")
    described = {k: str(info[k]) for k in keys if k in info}
    saved = engine.fingerprint  # the standalone server's: weights digest and scheduler among them
    described["weights"] = str(saved["weights"])
    described["scheduler"] = str(saved["scheduler"])
    described["device"] = str(info.get("device", "")).split(":")[0]
    if info.get("adapters"):  # replicas load the same --lora-dir: the adapters they offer are part of it
        described["adapters"] = json.dumps(
            [(a["name"], a["rank"], a["layers"]) for a in info["adapters"]], sort_keys=True
        )
    return described


def fingerprint_of(fields: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def engine_fingerprint(engine: Any) -> str:
    """The hash of :func:`engine_fields`: replicas of one deployment share it; an inversion made by other
    weights, model or precision is refused instead of silently giving a different edit."""
    return fingerprint_of(engine_fields(engine))


def foreign_engine(record: InversionRecord, fingerprint: str, fields: dict[str, str]) -> str | None:
    """Why ``record`` does not fit the engine of ``fingerprint`` and ``fields`` (None when it does): the first
    engine field that differs, worded as a standalone server words another engine's saved inversion."""
    if record.fingerprint == fingerprint:
        return None
    for name in ENGINE_FIELDS if record.engine else ():
        theirs, ours = record.engine.get(name, ""), fields.get(name, "")
        if theirs != ours:
            return f"made by an engine with another {name} ({_short(theirs)}; this engine: {_short(ours)})"
    return "made by a different model or precision"


def _short(value: str) -> str:
    return value if len(value) <= 40 else value[:31] + "…" + value[-8:]


def record_from_inversion(
    inversion: Any, fingerprint: str, engine: dict[str, str] | None = None
) -> InversionRecord:
    """Copy an engine :class:`~fpedit.engine.Inversion` to host memory as a record: trajectory, image and, for
    Algorithm 3 inversions, the method, source prompt, null embeddings and their guidance; ``engine``: the
    fields ``fingerprint`` is made of."""
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
        original_size=tuple(inversion.input_size),
        adapters=tuple(inversion.adapters),
        engine=dict(engine or {}),
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
        original_size=record.original_size,
        adapters=tuple(record.adapters),
    )


class BoundedRecords(BoundedLRU[Any]):
    """The store's records: the server's bounded LRU, except that a record larger than the whole budget is
    refused (and replaces nothing) rather than kept alone."""

    def put(self, key: str, value: Any, nbytes: int, age_s: float = 0.0) -> bool:  # type: ignore[override]
        """Keep ``value``; returns False (and keeps nothing under ``key``) when it alone exceeds the budget."""
        if nbytes > self.max_bytes:
            self.delete(key)
            return False
        super().put(key, value, nbytes, age_s)
        return True

    def stats(self) -> dict[str, int]:
        counters = self.counters()
        return {
            "entries": counters["entries"],
            "bytes": counters["bytes"],
            "max_bytes": self.max_bytes,
            "hits": counters["hits"],
            "misses": counters["misses"],
            "evicted": counters["evictions"] + counters["expirations"],
        }


class RecordFileError(Exception):
    """A file in the store's folder that is not a record this fpedit reads (damaged, or another format)."""


class DamagedRecordFile(RecordFileError):
    """A record file that cannot be read at all (truncated, altered): no one's to refuse; it is dropped."""


def record_to_bytes(record: InversionRecord) -> bytes:
    """``record`` as a safetensors file: the arrays as tensors (exact bits), everything else as JSON."""
    from safetensors.numpy import save

    tensors = {
        "trajectory": np.ascontiguousarray(record.trajectory),
        "image": np.ascontiguousarray(record.image),
    }
    if record.null_embeddings is not None:
        tensors["null_embeddings"] = np.ascontiguousarray(record.null_embeddings)
    metadata = {
        "format": RECORD_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "fields": json.dumps(
            {
                "steps": record.steps,
                "fingerprint": record.fingerprint,
                "engine": record.engine,
                "method": record.method,
                "source_prompt": record.source_prompt,
                "guidance_scale": record.guidance_scale,
                "original_size": record.original_size,
                "adapters": record.adapters,
            }
        ),
    }
    return save(tensors, metadata=metadata)


def record_from_file(path: Path) -> InversionRecord:
    """Read back what :func:`record_to_bytes` wrote; :class:`RecordFileError` for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != RECORD_FORMAT:
                raise RecordFileError("its file is not a record of the Ray store (another server's?)")
            if metadata.get("format_version") != RECORD_FORMAT_VERSION:
                raise RecordFileError(
                    f"its file has record format version {metadata.get('format_version')!r}"
                )
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        fields = json.loads(metadata["fields"])
        size = fields["original_size"]
        return InversionRecord(
            trajectory=arrays["trajectory"],
            steps=int(fields["steps"]),
            image=arrays["image"],
            fingerprint=str(fields["fingerprint"]),
            method=str(fields["method"]),
            source_prompt=str(fields["source_prompt"]),
            null_embeddings=arrays.get("null_embeddings"),
            guidance_scale=fields["guidance_scale"],
            original_size=None if size is None else (int(size[0]), int(size[1])),
            adapters=tuple((str(name), float(scale)) for name, scale in fields["adapters"]),
            engine={str(k): str(v) for k, v in fields["engine"].items()},
        )
    except RecordFileError:
        raise
    except Exception as exc:  # safetensors raises several types for truncated or altered files
        raise DamagedRecordFile(f"its file is damaged ({type(exc).__name__})") from None


class RecordFiles:
    """The store's records as ``<id>.safetensors`` files in a state directory's inversions folder, read back
    while younger than ``ttl_s`` (by modification time, as the standalone server's saved inversions). Ids
    that are not :data:`SAFE_ID` never become file names: they are neither written nor read."""

    def __init__(self, folder: Path, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.folder, self.ttl_s, self.clock = Path(folder), float(ttl_s), clock

    def path_of(self, key: str) -> Path | None:
        return self.folder / f"{key}{SUFFIX}" if SAFE_ID.fullmatch(key) else None

    def save(self, key: str, record: InversionRecord) -> None:
        path = self.path_of(key)
        if path is not None:
            write_atomically(path, record_to_bytes(record))

    def load(self, key: str) -> tuple[InversionRecord, float] | None:
        """The record of ``key`` and its file's age in seconds (what is left of its life is what it had), or
        None (no file, or older than the age limit: then deleted); :class:`RecordFileError` for a file that is
        not a readable record."""
        path = self.path_of(key)
        age = None if path is None else live_file_age(path, self.ttl_s, self.clock())
        if age is None:
            return None
        return record_from_file(path), age

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        if path is not None:
            path.unlink(missing_ok=True)


class InversionStore:
    """Ray actor body: inversion records by id, owned by this actor, bounded by bytes and age; with a
    ``folder`` (a state directory's inversions), each kept record is also a file there, read back on a miss."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_STORE_BYTES,
        ttl_s: float = DEFAULT_STORE_TTL_S,
        folder: str | None = None,
    ) -> None:
        self._records = BoundedRecords(int(max_bytes), float(ttl_s))
        self._files = RecordFiles(Path(folder), ttl_s) if folder else None
        #: A new value per start: the front counts restarts by seeing it change.
        self.incarnation = uuid.uuid4().hex

    def ping(self) -> dict[str, Any]:
        """Liveness, the incarnation and where the store runs (the front's health and placement checks)."""
        import ray

        return {"incarnation": self.incarnation, "node_id": ray.get_runtime_context().get_node_id()}

    def put(self, key: str, record: InversionRecord) -> bool:
        import ray

        # ray.put here, not in the caller: the object's owner is this actor, so it survives the replica.
        kept = self._records.put(key, ray.put(record), record.nbytes)
        if kept and self._files is not None:
            try:
                self._files.save(key, record)
            except (OSError, TypeError, ValueError) as exc:  # a full disk, a field JSON cannot hold: the
                # record is still shared, it just won't outlive the store
                log.warning("inversion %s is not saved in the state directory: %s", key, exc)
        return kept

    def get(self, key: str) -> list[Any] | str | None:
        """The record's object reference, wrapped in a list so that Ray hands back the reference itself; on a
        miss, the record read back from its file (kept in memory again); a string says why its file was
        refused (damaged, another format)."""
        import ray

        ref = self._records.get(key)
        if ref is not None:
            return [ref]
        if self._files is None:
            return None
        try:
            found = self._files.load(key)
        except DamagedRecordFile as exc:  # not the client's doing: gone, as a lost record is (NOT_FOUND)
            log.warning("inversion %s: %s; deleted", key, exc)
            self._files.delete(key)
            return None
        except RecordFileError as exc:  # another server's file: said, as a standalone server says it
            return str(exc)
        if found is None:
            return None
        record, age = found
        ref = ray.put(record)
        self._records.put(key, ref, record.nbytes, age)  # its remaining life, not a new one
        return [ref]

    def delete(self, key: str) -> None:
        self._records.delete(key)
        if self._files is not None:
            self._files.delete(key)

    def expires_in(self, key: str) -> float:
        return self._records.expires_in(key)

    def stats(self) -> dict[str, int]:
        return self._records.stats()


def open_store(
    name: str = STORE_NAME,
    namespace: str = STORE_NAMESPACE,
    max_bytes: int = DEFAULT_STORE_BYTES,
    ttl_s: float = DEFAULT_STORE_TTL_S,
    node_id: str | None = None,
    folder: Path | None = None,
) -> Any:
    """Get the store actor, creating it on first use pinned to ``node_id`` (default: this process's node),
    keeping its records also in ``folder`` (a state directory's inversions, on that node) when given.

    Only the front opens it (``RayService.start``, ``GrpcFront``); replicas find it by name
    (:class:`StoreClient`). Pinned with a hard node affinity, so it shares the front's failure domain and
    never lands on a node whose loss would take every record with it; restarted by Ray without limit if its
    process dies. Detached: Serve's replicas come and go and the store must outlive each of them; whoever
    started the application removes it (``close_store``). It needs no CPU reservation (it only moves
    references).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(InversionStore).options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=32,
        max_restarts=-1,
        max_task_retries=STORE_TASK_RETRIES,
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=node_id or ray.get_runtime_context().get_node_id(), soft=False
        ),
    )
    return actor.remote(max_bytes, ttl_s, None if folder is None else str(folder))


def close_store(name: str = STORE_NAME, namespace: str = STORE_NAMESPACE) -> None:
    """Kill the store actor if it exists (its records are freed with it)."""
    import ray

    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)


class StoreUnreachable(Exception):
    """The store did not answer in time or is gone: callers go on without it."""


class StoreClient:
    """Every call to the store: found by name when first needed (and again after a failure), each call
    bounded by ``timeout_s``. Ray errors and timeouts come out as :class:`StoreUnreachable`."""

    def __init__(
        self,
        name: str = STORE_NAME,
        namespace: str = STORE_NAMESPACE,
        timeout_s: float = STORE_CALL_TIMEOUT_S,
    ) -> None:
        self.name, self.namespace, self.timeout_s = name, namespace, timeout_s
        self._actor: Any = None

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            if self._actor is None:
                self._actor = ray.get_actor(self.name, namespace=self.namespace)
            return ray.get(getattr(self._actor, method).remote(*args), timeout=self.timeout_s)
        except (ValueError, ray.exceptions.RayError) as exc:  # not created yet, dead, or too slow
            self._actor = None
            raise StoreUnreachable(
                f"the shared inversion store did not answer ({type(exc).__name__})"
            ) from exc

    def put(self, key: str, record: InversionRecord) -> bool:
        return bool(self._call("put", key, record))

    def get(self, key: str) -> InversionRecord | None:
        """The record, or None when the store does not know ``key``. A record whose object was lost (its
        node or owner died) is :class:`StoreUnreachable` too: the data is gone either way. A file the store
        refused is ``InvalidInputError`` on ``inversion_id``, as on a standalone server."""
        import ray

        refs = self._call("get", key)
        if refs is None:
            return None
        if isinstance(refs, str):
            raise InvalidInputError("inversion_id", f"{key}: {refs}")
        try:
            return ray.get(refs[0], timeout=self.timeout_s)
        except ray.exceptions.RayError as exc:
            raise StoreUnreachable(f"the stored inversion was lost ({type(exc).__name__})") from exc

    def ping(self) -> dict[str, Any]:
        return self._call("ping")
