"""One way to turn blocking work that reports as it goes into an iterator the caller's thread consumes.

Used wherever a stream is made of a blocking call: the local runner's EditStream (the engine reports progress
from a worker thread), the Ray front (Serve's stream blocks between items) and the Ray replica (its async
edit runs on the replica's event loop). The caller's thread keeps control: it yields items as they come,
runs a check (cancellation, deadline) while none comes, and sees the work's exception as its own.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

Emit = Callable[[Any], None]

_ITEM, _RETURN, _ERROR = "item", "return", "error"


def stream_of(
    produce: Callable[[Emit], Any],
    *,
    idle: Callable[[], None] | None = None,
    poll_s: float = 0.1,
    name: str = "fpedit-stream",
) -> Iterator[Any]:
    """Run ``produce(emit)`` on its own thread; yield each item it emits as it comes, then what it returns.

    What ``produce`` raises is raised here. ``idle()`` runs every ``poll_s`` seconds while nothing comes
    (a cancel check): what it raises ends the stream, and stopping the work is then its business (it knows
    how: a cancelled Serve stream, an engine cancel check).
    """
    items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def run() -> None:
        try:
            items.put((_RETURN, produce(lambda item: items.put((_ITEM, item)))))
        except BaseException as exc:  # raised again in the consumer's thread, which owns the outcome
            items.put((_ERROR, exc))

    threading.Thread(target=run, name=name, daemon=True).start()
    while True:
        try:
            kind, value = items.get(timeout=poll_s if idle is not None else None)
        except queue.Empty:
            idle()  # type: ignore[misc]  (only reached with a timeout, that is with idle)
            continue
        if kind == _ERROR:
            raise value
        yield value
        if kind == _RETURN:
            return
