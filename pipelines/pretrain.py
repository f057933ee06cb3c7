"""DVC stage ``pretrain``: train the backbone ResNet on the prepared data (CIFAR ResNets from scratch), or, with
``pretrain.epochs: 0``, take torchvision's ImageNet ResNet-101 as it is, as the authors did, and score it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from blockdrop import stage
from blockdrop.config import ParamsError, refuse
from blockdrop.models import build_backbone, save_backbone
from blockdrop.predict import accuracy, predict
from blockdrop.train.context import TrainContext
from blockdrop.train.pretrain import pretrain_backbone

MODEL = Path("models/backbone.pt")
IMAGENET_CLASSES = 1000
REPORTS = Path("reports/pretrain")
log = logging.getLogger("blockdrop.pretrain")


def main() -> None:
    ctx = stage.start("pretrain")
    p = ctx.params
    with stage.failures_reported("pretrain"):
        meta, data, normalize = stage.load_data(ctx, "train", "val", "test")
        if p.pretrain.epochs == 0 and meta.num_classes != IMAGENET_CLASSES:
            # Imported weights classify ImageNet's 1000 classes; another label set needs a classifier trained.
            raise refuse(ParamsError(f"pretrain.epochs: 0 uses {p.model.weights} as it is, a {IMAGENET_CLASSES}-class "
                                     f"classifier, but the data has {meta.num_classes} classes: train (epochs > 0)"))
        model = build_backbone(p.model, meta.num_classes, meta.shape[0])
        model = model.to(ctx.device, memory_format=torch.channels_last)
        with stage.tracked_run(ctx, meta.data_sha256) as run:
            loop = TrainContext.for_stage(ctx, run)
            result = pretrain_backbone(model, data["train"], data["val"], normalize, p.pretrain, loop)
            if not ctx.dist.is_main:
                return  # rank 0 alone scores the model and writes the outputs
            if not result.history:  # 0 epochs: nothing trained, the validation score is the imported model's
                result.val_accuracy = accuracy(predict(model, data["val"], normalize, precision=ctx.precision),
                                               data["val"].labels)
            test_acc = accuracy(predict(model, data["test"], normalize, precision=ctx.precision),
                                data["test"].labels)
            metrics = {"test": {"accuracy": test_acc}, "val": {"accuracy": result.val_accuracy},
                       "train": {"images_per_s": result.images_per_s, "epochs": len(result.history)}}
            log.info("backbone ResNet-%d (%s): test accuracy %.4f, %.0f images/s", p.model.depth,
                     f"trained {len(result.history)} epochs" if result.history else f"imported {p.model.weights}",
                     test_acc, result.images_per_s)
            save_backbone(model.cpu(), MODEL)
            stage.publish(run, REPORTS, result.history, metrics, [MODEL])
            ctx.clear_state()


if __name__ == "__main__":
    main()
