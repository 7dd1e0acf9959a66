"""The one helper that turns blocking work reporting as it goes into a stream (local runner, Ray front)."""

from __future__ import annotations

import threading

import pytest

from fpedit.engine.errors import CancelledError
from fpedit.server.streaming import stream_of


def test_items_come_in_order_then_the_return_value():
    def produce(emit):
        for i in range(3):
            emit(i)
        return "done"

    assert list(stream_of(produce)) == [0, 1, 2, "done"]


def test_the_work_exception_is_raised_in_the_consumer_after_what_was_emitted():
    def produce(emit):
        emit("first")
        raise ValueError("broken")

    stream = stream_of(produce)
    assert next(stream) == "first"
    with pytest.raises(ValueError, match="broken"):
        next(stream)


def test_idle_runs_while_nothing_comes_and_its_error_ends_the_stream():
    release = threading.Event()
    idles: list[int] = []

    def produce(emit):
        emit("started")
        release.wait(5)  # blocks as an engine step or a Serve stream would
        return "late"

    def idle():
        idles.append(1)
        if len(idles) == 3:
            raise CancelledError("the client cancelled")

    stream = stream_of(produce, idle=idle, poll_s=0.01)
    assert next(stream) == "started"
    with pytest.raises(CancelledError):
        next(stream)
    release.set()
    assert len(idles) == 3
