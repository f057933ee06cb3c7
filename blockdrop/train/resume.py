"""Per-epoch training state, so a rerun after an interruption picks up where the last epoch ended.

The state holds everything that decides what happens next (weights, optimizer and scheduler state, the
data generator's state, the history so far), so a resumed run gives the same numbers as an unbroken one.
It belongs to one ``run_key`` (a hash of the stage's params and inputs): a checkpoint left by a run with
other params is ignored, not resumed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from blockdrop.files import load_checkpoint, save_atomic

__all__ = ["Stateful", "resume_state", "save_state"]

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def save_state(path: Path, run_key: str, epoch: int, parts: dict[str, Stateful],
               generator: torch.Generator, history: list[dict[str, float]]) -> None:
    """Write the state after ``epoch`` epochs (atomically: an interruption keeps the previous one)."""
    save_atomic({"run_key": run_key, "epoch": epoch, "generator": generator.get_state(), "history": history,
                 **{name: part.state_dict() for name, part in parts.items()}}, path)


def resume_state(path: Path, run_key: str, parts: dict[str, Stateful],
                 generator: torch.Generator) -> tuple[int, list[dict[str, float]]]:
    """Load the state saved for ``run_key`` into ``parts`` and ``generator``; return (epochs done, history)."""
    if not path.exists():
        return 0, []
    state = load_checkpoint(path)
    if state.get("run_key") != run_key:
        log.info("ignoring %s: it was written with other params or inputs", path)
        return 0, []
    for name, part in parts.items():
        part.load_state_dict(state[name])
    generator.set_state(state["generator"])
    log.info("resuming from %s after epoch %d", path, state["epoch"])
    return state["epoch"], state["history"]
