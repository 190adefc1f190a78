"""SIGTERM drains first, then reaches the server's own handler; a second SIGTERM cuts the drain short."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from runners.lifecycle import drain_on_sigterm


def test_sigterm_runs_the_drain_before_the_servers_handler_and_a_second_one_skips_it():
    events, exits = [], []  # exits: the after-drain exit, recorded here instead of ending pytest
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: events.append("server handler"))  # uvicorn's, here

    async def scenario():
        release = asyncio.Event()

        async def drain():
            events.append("drain started")
            await release.wait()
            events.append("drain done")

        assert drain_on_sigterm(drain, "test", shutdown_grace_s=0.3, exit_after_grace=exits.append)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        assert events == ["drain started"]  # the server keeps running while it drains
        release.set()
        await asyncio.sleep(0.05)
        assert events == ["drain started", "drain done", "server handler"]
        assert exits == []  # the server's own shutdown gets its grace first ...
        deadline = time.monotonic() + 30
        while not exits and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert exits == [1]  # ... then a process still running is ended, non-zero

        events.clear()
        assert drain_on_sigterm(drain, "test", exit_after_grace=exits.append)
        release.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # impatient: the drain is cut short, then the exit goes on
        await asyncio.sleep(0.05)
        assert events[0] == "drain started" and "drain done" not in events and events[-1] == "server handler"

    try:
        asyncio.run(scenario())
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_an_event_loop_it_declines():
    assert drain_on_sigterm(lambda: None, "test") is False
