"""TrainContext: a stage's loop context carries the stage's settings and logs each epoch at its own step; an
epoch's end saves the state before the callback, and a resume reports the epochs done."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockdrop.config import Params
from blockdrop.stage import StageContext
from blockdrop.train.context import TrainContext


class Recorder:
    """Stands in for the stage's MLflow run."""

    def __init__(self) -> None:
        self.epochs: list[tuple[dict, int]] = []
        self.resumed: list[int] = []

    def log_epoch(self, row: dict[str, float], step: int) -> None:
        self.epochs.append((row, step))

    def mark_resumed(self, epoch: int) -> None:
        self.resumed.append(epoch)


def test_for_stage_takes_the_stage_settings_and_logs_to_its_run() -> None:
    params = Params().model_copy(update={"compile": True})
    ctx = StageContext("finetune", params, torch.device("cpu"), torch.Generator(), "bf16", "k123")
    run = Recorder()
    loop = TrainContext.for_stage(ctx, run)
    assert loop.generator is ctx.generator
    assert (loop.precision, loop.checkpoint, loop.run_key) == ("bf16", Path("checkpoints/finetune.pt"), "k123")
    assert loop.compile_model is True and loop.dist == ctx.dist and loop.sync_bn == params.dist.sync_bn
    loop.on_epoch({"epoch": 3.0, "train/loss": 0.5})
    loop.on_resume(2)
    assert run.epochs == [({"epoch": 3.0, "train/loss": 0.5}, 3)] and run.resumed == [2]


def test_epoch_done_saves_before_the_callback_and_resume_reports_the_epochs_done(tmp_path: Path) -> None:
    state = tmp_path / "s.pt"
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)

    def stop(row: dict) -> None:
        assert state.exists()  # the epoch is saved before the callback runs
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TrainContext(torch.Generator(), "fp32", state, "key", on_epoch=stop).epoch_done(1, {"net": net}, [{"epoch": 1}])
    resumed: list[int] = []
    fresh = torch.nn.Linear(2, 2)
    start, history = TrainContext(torch.Generator(), "fp32", state, "key", on_resume=resumed.append).resume(
        {"net": fresh})
    assert (start, history, resumed) == (1, [{"epoch": 1}], [1])
    torch.testing.assert_close(fresh.weight, net.weight)
    other: list[int] = []  # another run's key: a fresh start, and no resume to report
    assert TrainContext(torch.Generator(), "fp32", state, "other", on_resume=other.append).resume(
        {"net": torch.nn.Linear(2, 2)}) == (0, []) and other == []
