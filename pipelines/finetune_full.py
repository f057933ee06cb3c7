"""DVC stage ``finetune-full``: the fair full-network baseline, the pretrained backbone trained with every block on,
on the budget finetune gives BlockDrop's backbone (``blockdrop.train.finetune_full``)."""

from __future__ import annotations

from pathlib import Path

import torch

from blockdrop import stage
from blockdrop.models import load_backbone, save_backbone
from blockdrop.train.context import TrainContext
from blockdrop.train.finetune_full import finetune_full

BACKBONE = Path("models/backbone.pt")
MODEL = Path("models/backbone_finetuned.pt")
REPORTS = Path("reports/finetune-full")


def main() -> None:
    ctx = stage.start("finetune-full")
    with stage.failures_reported("finetune-full"):
        meta, data, normalize = stage.load_data(ctx, "train", "val")
        backbone = load_backbone(BACKBONE).to(ctx.device, memory_format=torch.channels_last)
        with stage.tracked_run(ctx, meta.data_sha256) as run:
            history = finetune_full(backbone, data["train"], data["val"], normalize, ctx.params.finetune,
                                    TrainContext.for_stage(ctx, run))
            if not ctx.dist.is_main:
                return  # rank 0 alone writes the outputs
            last = history[-1]
            metrics = {"val": {"accuracy": last["val/accuracy"]},
                       "train": {"loss": last["train/loss"], "accuracy": last["train/accuracy"],
                                 "epochs": len(history), "images": sum(int(r["train/images"]) for r in history)}}
            save_backbone(backbone.cpu(), MODEL)
            stage.publish(run, REPORTS, history, metrics, [MODEL])
            ctx.clear_state()


if __name__ == "__main__":
    main()
