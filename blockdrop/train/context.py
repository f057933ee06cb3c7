"""What a training loop needs besides its networks, data and section of params: one :class:`TrainContext`.

The three loops (pretrain, curriculum, finetune) share the same surroundings: the seeded generator, the
precision, where the per-epoch resume state lives and the key it must carry, what to call after an epoch or a
resume, whether to compile, and the process's place in a data-parallel job. A stage builds it in one call
(:meth:`TrainContext.for_stage`); a test or a benchmark builds it directly.

It lives beside the loops, not in :mod:`blockdrop.stage`, which every stage imports: a change here must rerun
the three training stages only (dvc.yaml lists it in their deps alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from blockdrop.dist import SINGLE, Dist
from blockdrop.train.resume import Stateful, resume_state, save_state

if TYPE_CHECKING:
    from blockdrop.stage import StageContext

__all__ = ["EpochLog", "TrainContext"]


class EpochLog(Protocol):
    """Where a stage records its epochs: its MLflow run (:func:`blockdrop.stage.tracked_run`)."""

    def log_epoch(self, row: dict[str, float], step: int) -> None: ...
    def mark_resumed(self, epoch: int) -> None: ...


@dataclass(frozen=True)
class TrainContext:
    """How a training loop runs, apart from what it trains.

    ``checkpoint``: the per-epoch resume state, resumed only if it was saved under ``run_key``
    (:mod:`blockdrop.train.resume`). ``on_epoch``: called with each epoch's history row (e.g. log it);
    ``on_resume``: called with the epochs already done when a run continues a killed one (e.g. tag the run).
    ``compile_model``: the training forwards run through ``torch.compile`` (:func:`blockdrop.runtime.compiled`).
    ``dist``: one rank of a data-parallel job (:mod:`blockdrop.dist`); rank 0 alone validates, saves the resume
    state and calls ``on_epoch``/``on_resume``. ``sync_bn``: on GPUs, BatchNorm statistics over the global
    batch for the networks whose every layer runs on every rank.
    """

    generator: torch.Generator  # CPU generator for data order, augmentation and sampling
    precision: str
    checkpoint: Path
    run_key: str
    on_epoch: Callable[[dict[str, float]], None] | None = None
    on_resume: Callable[[int], None] | None = None
    compile_model: bool = False
    dist: Dist = SINGLE
    sync_bn: bool = True

    @classmethod
    def for_stage(cls, ctx: StageContext, run: EpochLog) -> TrainContext:
        """The context of a DVC stage's loop: the stage's generator, precision, resume state and key, and rank;
        the ``compile`` and ``dist.sync_bn`` params; each epoch's row logged to ``run`` with the epoch as its
        step, and a resume marked on it."""
        return cls(ctx.generator, ctx.precision, ctx.state_path, ctx.run_key,
                   on_epoch=lambda row: run.log_epoch(row, step=int(row["epoch"])), on_resume=run.mark_resumed,
                   compile_model=ctx.params.compile, dist=ctx.dist, sync_bn=ctx.params.dist.sync_bn)

    def resume(self, parts: dict[str, Stateful]) -> tuple[int, list[dict[str, float]]]:
        """Load the saved state into ``parts`` and the generator; return (epochs done, history so far).

        When a run continues (epochs done > 0), rank 0 calls ``on_resume`` with the epochs done."""
        start, history = resume_state(self.checkpoint, self.run_key, parts, self.generator, self.dist)
        if start and self.on_resume is not None and self.dist.is_main:
            self.on_resume(start)
        return start, history

    def epoch_done(self, epoch: int, parts: dict[str, Stateful], history: list[dict[str, float]]) -> None:
        """Rank 0 after ``epoch`` epochs (1-based): save the resume state, then call ``on_epoch`` with the last
        row of ``history`` (saved first, so a failure in the callback loses no epoch)."""
        save_state(self.checkpoint, self.run_key, epoch, parts, self.generator, history)
        if self.on_epoch is not None:
            self.on_epoch(history[-1])
