"""Graceful exit: on SIGTERM, drain first, then let the server shut down as it would have.

Kubernetes (and ``bentoml serve``'s process manager) stop a server with SIGTERM, and uvicorn's own
handler then stops accepting connections at once. That loses work: queued requests whose callers
poll later, and the model worker's calls from a front that is still finishing its queue. So each
server process swaps uvicorn's handler for one that first runs a ``drain`` coroutine (the front:
refuse new work, finish or fail what was accepted; the worker: keep serving until the front stops
calling) and only then hands the signal to uvicorn. A second SIGTERM exits without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def drain_on_sigterm(drain: Callable[[], Awaitable[None]], name: str) -> bool:
    """Install the handler; call from the server's event loop in its main thread (a BentoML
    service's ``__init__`` runs there). Returns False where signals cannot be handled here."""
    try:
        loop = asyncio.get_running_loop()
        original = signal.getsignal(signal.SIGTERM)
    except (RuntimeError, ValueError):
        return False
    tasks: set[asyncio.Task] = set()  # the drain task must be referenced while it runs
    signalled: list[int] = []

    def exit_now(signum, frame) -> None:
        if callable(original):
            original(signum, frame)
        else:  # nobody handled SIGTERM before us: die of it as the default would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    async def drain_then_exit(signum, frame) -> None:
        try:
            await drain()
        except Exception:
            log.exception("%s: drain failed; exiting anyway", name)
        log.info("%s: drained; shutting down", name)
        exit_now(signum, frame)

    def on_sigterm(signum, frame) -> None:
        if signalled:
            log.warning("%s: second SIGTERM; exiting without waiting", name)
            exit_now(signum, frame)
            return
        signalled.append(signum)
        log.info("%s: SIGTERM; draining before exit", name)
        loop.call_soon_threadsafe(lambda: tasks.add(loop.create_task(drain_then_exit(signum, frame))))

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        return False
    return True
