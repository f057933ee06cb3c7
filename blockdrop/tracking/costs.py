"""What tracking costs a stage, measured inside the stage: importing mlflow, every tracking call, logging the model.

The package imports this module first, so the import of mlflow timed here is the process's first (unless the
caller imported mlflow itself before). A stage logs the totals as ``tracking/*`` metrics of its run, and appends
them to ``$BLOCKDROP_TRACKING_TIMES`` (a JSON-lines file) when that is set: ``bench/overhead.py`` reads them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

_t_import = time.perf_counter()
import mlflow  # noqa: E402, F401  (timed: the cost of importing it belongs to tracking)

IMPORT_S = time.perf_counter() - _t_import

__all__ = ["IMPORT_S", "TIMES_ENV", "Clock", "clock", "cost_metrics", "process_seconds", "record_times", "timed"]

TIMES_ENV = "BLOCKDROP_TRACKING_TIMES"  # a JSON-lines file: each stage appends the time its tracking took
F = TypeVar("F", bound=Callable[..., Any])


class Clock:
    """Seconds this process spent in tracking calls, importing mlflow included; model logging also apart."""

    def __init__(self) -> None:
        self.total, self.log_model = IMPORT_S, 0.0

    @contextmanager
    def __call__(self, model: bool = False) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.total += dt
            if model:
                self.log_model += dt


clock = Clock()  # the process's one clock


def timed(method: F) -> F:
    """``method`` with its time added to :data:`clock`."""

    @wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with clock():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def process_seconds() -> float | None:
    """How long this process has lived (the stage's whole cost, imports included); None if unknown."""
    try:
        import psutil  # an mlflow dependency

        return time.time() - psutil.Process().create_time()
    except Exception:
        return None


def cost_metrics() -> dict[str, float]:
    """What tracking cost this process so far: ``seconds`` (importing mlflow included) of ``process_seconds``
    (the process's life so far) and their ratio ``share``, plus ``import_seconds`` and ``log_model_seconds``."""
    metrics = {"seconds": clock.total, "import_seconds": IMPORT_S, "log_model_seconds": clock.log_model}
    if process_s := process_seconds():
        metrics |= {"process_seconds": process_s, "share": clock.total / process_s}
    return metrics


def record_times(stage: str, block_s: float) -> None:
    """Append this stage's tracking times to ``$BLOCKDROP_TRACKING_TIMES`` (nothing when it is unset);
    ``block_s``: how long the stage's ``with stage_run(...)`` block took, its work included."""
    path = os.environ.get(TIMES_ENV)
    if not path:
        return
    row = {"stage": stage, "tracking_s": clock.total, "import_s": IMPORT_S, "log_model_s": clock.log_model,
           "run_block_s": block_s, "process_s": process_seconds()}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
