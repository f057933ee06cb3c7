"""A running stage's output, teed: to the terminal as it comes, and to its Prefect task run's log.

DVC runs a stage's command as a child that inherits this process's file descriptors 1 and 2; redirecting them
through a pipe is the only way to see that output when DVC runs in this process.
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import os
import sys
import threading
from collections import deque

from prefect import get_run_logger
from prefect.logging.handlers import APILogHandler

__all__ = ["StageOutput"]


class StageOutput:
    """While open, whatever this process and its children write to fd 1 and 2 (the stage's own output,
    DVC's and Prefect's console messages) still reaches the terminal as it comes, and each line also goes
    to this task run's log in the Prefect API (through a logger with only the API handler: the console
    handler writes to fd 2, which would loop) and to ``tail``. DVC's log records are kept too
    (:meth:`dvc_said`). Open it inside a Prefect task run."""

    def __init__(self, stage: str, tail: int = 40) -> None:
        self.stage = stage
        self.tail: deque[str] = deque(maxlen=tail)
        self._api = logging.getLogger("blockdrop.flow.stage_output")
        self._api.propagate = False
        self._api.setLevel(logging.INFO)
        if not self._api.handlers:
            self._api.addHandler(APILogHandler())
        self._extra = dict(getattr(get_run_logger(), "extra", {}))

    def __enter__(self) -> StageOutput:
        sys.stdout.flush(), sys.stderr.flush()
        self._saved = os.dup(1), os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 1), os.dup2(write, 2)
        os.close(write)
        self.dvc_messages = logging.handlers.BufferingHandler(capacity=1_000_000)  # DVC's, to tell what it did
        dvc_logger = logging.getLogger("dvc")
        self._dvc_level = dvc_logger.level
        dvc_logger.setLevel(logging.INFO)  # "Running stage ...", "... didn't change, skipping", as its CLI says
        dvc_logger.addHandler(self.dvc_messages)
        # The thread runs in a copy of this context: Prefect's settings (the API's URL) live in context vars.
        context = contextvars.copy_context()
        self._pump = threading.Thread(target=context.run, args=(self._forward, read), daemon=True)
        self._pump.start()
        return self

    def _forward(self, read: int) -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            for raw in iter(pipe.readline, b""):
                os.write(self._saved[0], raw)
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                self._api.info("%s | %s", self.stage, line, extra=self._extra)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("dvc").removeHandler(self.dvc_messages)
        logging.getLogger("dvc").setLevel(self._dvc_level)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(self._saved[0], 1), os.dup2(self._saved[1], 2)  # closes our pipe's last write ends
        self._pump.join()
        os.close(self._saved[0]), os.close(self._saved[1])

    def dvc_said(self, text: str) -> bool:
        """Whether one of DVC's log messages while open contained ``text``."""
        return any(text in record.getMessage() for record in self.dvc_messages.buffer)
