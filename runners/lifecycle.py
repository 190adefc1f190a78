"""Graceful exit: on SIGTERM, drain first, then let the server shut down as it would have.

Kubernetes (and ``bentoml serve``'s process manager) stop a server with SIGTERM, and uvicorn's own
handler then stops accepting connections at once. That loses work: queued requests whose callers
poll later, and the model worker's calls from a front that is still finishing its queue. So each
server process swaps uvicorn's handler for one that first runs a ``drain`` coroutine (the front:
refuse new work, finish or fail what was accepted; the worker: keep serving until the front stops
calling) and only then hands the signal to uvicorn. A second SIGTERM cuts the drain short: the
front fails what is left at once (503 to callers and webhooks) instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)
# After the drain, how long the server's own shutdown may take before the process exits anyway. Seen
# needed: with the model worker gone (its model could not load) and /readyz being polled, as
# Kubernetes does, the front's uvicorn shutdown never finished, and with it `bentoml serve`.
SHUTDOWN_AFTER_DRAIN_S = 15.0


def exit_process(code: int) -> None:
    """End this process from a timer thread, its log lines flushed first (os._exit skips that)."""
    logging.shutdown()
    os._exit(code)


def drain_on_sigterm(
    drain: Callable[[], Awaitable[None]],
    name: str,
    shutdown_grace_s: float = SHUTDOWN_AFTER_DRAIN_S,
    exit_after_grace: Callable[[int], object] = exit_process,
) -> bool:
    """Install the handler; call from the server's event loop in its main thread (a BentoML
    service's ``__init__`` runs there). Returns False where signals cannot be handled here.
    ``shutdown_grace_s`` after the drain, a process still running is ended by ``exit_after_grace(1)``."""
    try:
        loop = asyncio.get_running_loop()
        original = signal.getsignal(signal.SIGTERM)
    except (RuntimeError, ValueError):
        return False
    tasks: set[asyncio.Task] = set()  # the drain task must be referenced while it runs

    def exit_if_still_running() -> None:
        log.warning("%s: shutdown not finished %g s after the drain; exiting now", name, shutdown_grace_s)
        exit_after_grace(1)

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
        except asyncio.CancelledError:
            log.warning("%s: drain cut short", name)
        except Exception:
            log.exception("%s: drain failed; exiting anyway", name)
        log.info("%s: drained; shutting down", name)
        watchdog = threading.Timer(shutdown_grace_s, exit_if_still_running)
        watchdog.daemon = True
        watchdog.start()
        exit_now(signum, frame)

    def on_sigterm(signum, frame) -> None:
        if signalled:
            running = [task for task in tasks if not task.done()]
            log.warning("%s: second SIGTERM; cutting the drain short", name)
            if running:  # the drain fails what is left at once, then the exit goes on as usual
                loop.call_soon_threadsafe(running[0].cancel)
            else:
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


# The BentoML release the patch below was written against and checked on (requirements.lock pins it;
# tests/test_lifecycle.py fails when the installed one differs, so an upgrade re-reads BentoML's
# ``Arbiter.stop`` before it ships). On another version the patch is not applied, with a warning.
BENTOML_PATCHED_FOR = "1.4.39"


def keep_bentoml_sockets_through_the_drain() -> bool:
    """BentoML's process manager, on SIGTERM, deletes the directory of its Unix sockets *before* it
    stops the processes (its ``Arbiter.stop`` runs its cleanup first, then circus's stop). The
    front's calls to the model worker during the drain then find no socket to connect to: its
    ``front_drained`` call failed, so an idle worker waited ``FLUX_DRAIN_TIMEOUT_S + 10`` s before
    exiting, and any call not on an already open connection failed. Call in the process that runs
    ``bentoml serve`` (it imports service.py): the cleanup then runs after the processes are gone,
    with circus's own socket cleanup. BentoML's ``Arbiter`` (bentoml/_internal/utils/circus) adds
    the ``exit_stack`` cleanup to circus's ``stop`` in that order; BentoML's graceful-shutdown work
    on circus (bentoml/BentoML#5024, and #3813 for the errors seen stopping) left it so. Applied on
    ``BENTOML_PATCHED_FOR`` only; True if it is in place."""
    from importlib.metadata import version

    from bentoml._internal.utils import circus as bentoml_circus
    from circus.arbiter import Arbiter as CircusArbiter

    arbiter = bentoml_circus.Arbiter
    if arbiter.stop is CircusArbiter.stop:  # done already
        return True
    if (installed := version("bentoml")) != BENTOML_PATCHED_FOR:
        log.warning(
            "BentoML %s is not %s, which keep_bentoml_sockets_through_the_drain was written for: not "
            "patched (a drain may lose its model worker's socket); check Arbiter.stop and update it",
            installed,
            BENTOML_PATCHED_FOR,
        )
        return False

    def stop_controller_and_close_sockets(self) -> None:
        CircusArbiter.stop_controller_and_close_sockets(self)
        self.exit_stack.__exit__(None, None, None)  # BentoML's cleanup, the socket directory included

    arbiter.stop = CircusArbiter.stop  # circus's: stop the processes (they drain), then the sockets
    arbiter.stop_controller_and_close_sockets = stop_controller_and_close_sockets
    return True
