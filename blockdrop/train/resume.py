"""Per-epoch training state, so a rerun after an interruption picks up where the last epoch ended.

The state holds everything that decides what happens next (weights, optimizer and scheduler state, the
data generator's state, the history so far), so a resumed run gives the same numbers as an unbroken one.
It belongs to one ``run_key`` (:func:`blockdrop.lineage.resume_key`: the params of the stage and of every
stage upstream, and the md5 of its deps). A state that cannot be resumed (other key, tensors that do not fit,
a truncated file) is moved aside to ``<state>.stale`` with one log line saying why, and training starts fresh:
a leftover file never crashes a stage nor silently mixes two runs.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from blockdrop.dist import SINGLE, Dist, resumed_alike
from blockdrop.files import CheckpointError, load_checkpoint, save_atomic

__all__ = ["Stateful", "resume_state", "save_state", "set_aside"]

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def save_state(path: Path, run_key: str, epoch: int, parts: dict[str, Stateful],
               generator: torch.Generator, history: list[dict[str, float]]) -> None:
    """Write the state after ``epoch`` epochs (atomically: an interruption keeps the previous one)."""
    save_atomic({"run_key": run_key, "epoch": epoch, "generator": generator.get_state(), "history": history,
                 **{name: part.state_dict() for name, part in parts.items()}}, path)


def set_aside(path: Path, why: str) -> Path:
    """Move the state at ``path`` to ``<path>.stale`` (replacing an older one), logging ``why`` once."""
    stale = path.with_name(path.name + ".stale")
    try:
        os.replace(path, stale)
    except OSError as e:  # a folder in the way, a read-only mount: the first save_state overwrites it anyway
        log.warning("not resuming from %s: %s; could not move it aside (%s), starting fresh", path, why, e)
        return path
    log.warning("not resuming from %s: %s; moved it to %s and starting fresh", path, why, stale)
    return stale


def resume_state(path: Path, run_key: str, parts: dict[str, Stateful], generator: torch.Generator,
                 dist: Dist = SINGLE) -> tuple[int, list[dict[str, float]]]:
    """Load the state saved for ``run_key`` into ``parts`` and ``generator``; return (epochs done, history).

    (0, []) with ``parts`` and ``generator`` untouched when there is no state, or when it cannot be resumed
    (then it is set aside, see :func:`set_aside`). In a distributed job (``dist``) every rank reads the state,
    rank 0 alone sets one aside, and all must come back with the same epoch (:func:`blockdrop.dist.resumed_alike`).
    """
    epoch, history = _read_state(path, run_key, parts, generator, may_set_aside=dist.is_main)
    resumed_alike(dist, epoch, path)
    return epoch, history


def _read_state(path: Path, run_key: str, parts: dict[str, Stateful], generator: torch.Generator,
                may_set_aside: bool) -> tuple[int, list[dict[str, float]]]:
    if not path.exists():
        return 0, []

    def fresh_start(why: str) -> tuple[int, list[dict[str, float]]]:
        if may_set_aside:
            set_aside(path, why)
        return 0, []

    try:
        state = load_checkpoint(path, required=("run_key", "epoch", "history", "generator"))
    except CheckpointError as e:
        return fresh_start(str(e).removeprefix(f"checkpoint {path} "))
    if state["run_key"] != run_key:
        return fresh_start("it was written with other params or inputs")
    fresh = {name: copy.deepcopy(part.state_dict()) for name, part in parts.items()}
    loading = "epoch"
    try:
        epoch, history = int(state["epoch"]), list(state["history"])
        for loading, part in parts.items():
            part.load_state_dict(state[loading])
        loading = "generator"
        generator.set_state(state["generator"])
    except Exception as e:  # a part missing or of another shape: load_state_dict may have copied half of it
        for name, part in parts.items():
            part.load_state_dict(fresh[name])
        why = " ".join(str(e).split())[:300]  # torch's message spans lines: one log line
        return fresh_start(f"its {loading!r} does not fit this stage ({type(e).__name__}: {why})")
    log.info("resuming from %s after epoch %d", path, epoch)
    return epoch, history
