"""A stage stops when what started it is gone: the Prefect flow, or, for a torchrun worker, its launcher.

The flow runs each stage through DVC as a child process and puts its own pid in ``$BLOCKDROP_SUPERVISOR_PID``.
If the flow process is killed (SIGKILL, OOM killer), nothing would stop that child: it would train on,
unsupervised, and write outputs that no flow records. :func:`watch_supervisor` checks once a second that the
supervisor still lives and, when it does not, stops this process with one line on stderr.
:func:`watch_launcher` does the same for a worker of ``torchrun`` and the launcher that started it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import psutil

__all__ = ["SUPERVISOR_ENV", "watch_launcher", "watch_supervisor"]

SUPERVISOR_ENV = "BLOCKDROP_SUPERVISOR_PID"
CHECK_EVERY_S = 1.0
GRACE_S = 5.0  # after SIGTERM, how long a handler may take before the process is ended outright


def _alive(pid: int, created: float) -> bool:
    """True while the process that was ``pid`` at start still runs (not reused, not a zombie)."""
    try:
        process = psutil.Process(pid)
        return process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch(stage: str, pid: int, created: float, what: str) -> None:
    while _alive(pid, created):
        time.sleep(CHECK_EVERY_S)
    # Best effort: this stderr is often a pipe the dead flow was reading, so writing may fail (EPIPE).
    with contextlib.suppress(OSError):
        print(f"error: stage {stage}: {what} that started it (pid {pid}) is gone: stopping", file=sys.stderr,
              flush=True)
    # SIGTERM first, so a handler (if the stage has one) may still clean up; by default it ends the process.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)


def watch_supervisor(stage: str) -> threading.Thread | None:
    """Start a daemon thread that ends this process once ``$BLOCKDROP_SUPERVISOR_PID`` is gone; None (and
    nothing started) when the variable is unset, as under plain ``dvc repro``."""
    value = os.environ.get(SUPERVISOR_ENV)
    if not value:
        return None
    return _start_watch(stage, int(value), "the flow")


def watch_launcher(stage: str) -> threading.Thread:
    """Start a daemon thread that ends this torchrun worker once its launcher (the parent process) is gone.

    torchrun starts every worker in a session of its own, so a SIGKILL of the launcher's process group (a
    killed ``dvc repro``, a test) never reaches the workers: without this they would train on, unsupervised,
    and rank 0 would write outputs that no run asked for any more."""
    return _start_watch(stage, os.getppid(), "the torchrun launcher")


def _start_watch(stage: str, pid: int, what: str) -> threading.Thread:
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        created = -1.0  # already gone: the thread stops this process at its first check
    thread = threading.Thread(target=_watch, args=(stage, pid, created, what), name="supervisor-watch", daemon=True)
    thread.start()
    return thread
