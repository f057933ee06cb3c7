"""DVC stage ``pretrain``: train the backbone ResNet from scratch on the prepared data."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from blockdrop import stage, tracking
from blockdrop.models import cifar_resnet, save_backbone
from blockdrop.predict import accuracy, predict
from blockdrop.train.pretrain import pretrain_backbone

MODEL = Path("models/backbone.pt")
REPORTS = Path("reports/pretrain")
log = logging.getLogger("blockdrop.pretrain")


def main() -> None:
    ctx = stage.start("pretrain")
    p = ctx.params
    with stage.failures_reported("pretrain"):
        meta, data, normalize = stage.load_data(ctx, "train", "val", "test")
        model = cifar_resnet(p.model.depth, meta.num_classes, meta.shape[0])
        model = model.to(ctx.device, memory_format=torch.channels_last)
        with tracking.stage_run("pretrain", p, data_sha256=meta.data_sha256) as run:
            result = pretrain_backbone(
                model, data["train"], data["val"], normalize, p.pretrain, ctx.generator, ctx.precision,
                checkpoint=ctx.state_path, run_key=ctx.run_key,
                on_epoch=lambda row: run.log_epoch(row, step=int(row["epoch"])),
                on_resume=run.mark_resumed,
            )
            test_acc = accuracy(predict(model, data["test"], normalize, precision=ctx.precision),
                                data["test"].labels)
            metrics = {"test": {"accuracy": test_acc}, "val": {"accuracy": result.val_accuracy},
                       "train": {"images_per_s": result.images_per_s, "epochs": len(result.history)}}
            log.info("backbone ResNet-%d: test accuracy %.4f, %.0f images/s", p.model.depth, test_acc,
                     result.images_per_s)
            save_backbone(model.cpu(), MODEL)
            stage.publish(run, REPORTS, result.history, metrics, [MODEL])
            ctx.clear_state()


if __name__ == "__main__":
    main()
