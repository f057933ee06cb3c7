"""A stop request (SIGTERM, Ctrl-C) as an exception, so that a stage can end its run before it exits.

By default SIGTERM ends a Python process on the spot: no ``finally`` runs, and the stage's MLflow run stays
RUNNING. Within :func:`sigterm_raises` it raises :class:`StageStopped` in the main thread instead, as Ctrl-C
raises KeyboardInterrupt; :func:`exit_code` is the status a shell reports for a process ended by that signal.
Whoever sends the SIGTERM is served alike: ``kill``, DVC or a flow stopping the stage, the torchrun launcher
stopping its workers, or :mod:`blockdrop.supervision` when the flow or launcher that started the stage is gone
(it waits a few seconds for the stage to end before ending it outright).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["StageStopped", "exit_code", "sigterm_raises", "stop_signal"]


class StageStopped(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt: ``except Exception`` in a stage lets it pass."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def stop_signal(stop: StageStopped | KeyboardInterrupt) -> signal.Signals:
    """The signal behind ``stop``: SIGTERM (or whichever :class:`StageStopped` names), SIGINT for Ctrl-C."""
    return signal.Signals(stop.signum) if isinstance(stop, StageStopped) else signal.SIGINT


def exit_code(stop: StageStopped | KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process that signal ended: 143 for SIGTERM, 130 for
    SIGINT."""
    return 128 + int(stop_signal(stop))


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`StageStopped` in the main thread; the handler before it is put
    back on exit. Only the first SIGTERM raises: later ones, while the first is being handled, are ignored
    (a second Ctrl-C still interrupts). Nothing changes outside the main thread (Python delivers signals to
    the main thread only), nor when SIGTERM is ignored (whoever started this process chose that)."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        yield
        return
    owner, raised = os.getpid(), False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if os.getpid() != owner:  # a forked child (a DataLoader worker) inherited the handler: end as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not raised:
            raised = True
            raise StageStopped(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        # None: a handler set outside Python, which cannot be put back; the default is the nearest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
