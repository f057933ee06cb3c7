"""The watchdog that kills a stage's processes once ``flow.task_timeout_s`` has passed.

Prefect's own task timeout cannot interrupt a synchronous task (DVC runs the stage's command and waits for
it), so the flow kills the command's process tree itself and reports a timeout (``stages.StageTimeoutError``).
"""

from __future__ import annotations

import threading
from contextlib import suppress

import psutil

__all__ = ["KILL_GRACE_S", "Watchdog"]

KILL_GRACE_S = 5.0  # after SIGTERM, how long a timed-out stage's processes get before SIGKILL


class Watchdog:
    """Kills the processes a stage started (DVC runs its command as a child of this process) once
    ``timeout_s`` has passed (0: never); ``fired`` says whether it did. Only children that appeared after the
    block began are touched: a temporary Prefect server, also a child of this process, lives on."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.fired = timeout_s, False
        self._before = {p.pid for p in psutil.Process().children()}
        self._timer = threading.Timer(timeout_s, self._kill) if timeout_s > 0 else None

    def __enter__(self) -> Watchdog:
        if self._timer:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer:
            self._timer.cancel()

    def _kill(self) -> None:
        self.fired = True
        started = [p for p in psutil.Process().children() if p.pid not in self._before]
        tree = list(started)
        for p in started:
            with suppress(psutil.Error):
                tree += p.children(recursive=True)
        for p in tree:
            with suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(tree, timeout=KILL_GRACE_S)
        for p in alive:
            with suppress(psutil.Error):
                p.kill()
