"""Backbone pretraining: SGD + Nesterov, a warm-up then cosine (or He et al.'s steps), label smoothing,
optional stochastic depth.

The loop follows cifar10-airbench: the split sits in memory as uint8, each batch is an index slice that
is cropped and flipped as a tensor. A checkpoint is written after every epoch; a rerun with the same
params and data resumes from it instead of starting over.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blockdrop.config import Pretrain
from blockdrop.data import Normalize, Split, batches
from blockdrop.dist import SINGLE, Dist, all_reduce_sum, data_parallel, sync_batchnorm
from blockdrop.models import BlockResNet
from blockdrop.predict import accuracy, predict
from blockdrop.runtime import autocast, compiled
from blockdrop.train.context import TrainContext
from blockdrop.train.guard import check_step, check_weights

__all__ = ["PretrainResult", "drop_path_policy", "lr_multiplier", "pretrain_backbone", "stochastic_depth_forward",
           "warmup_cosine", "warmup_step"]

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    val_accuracy: float = 0.0
    images_per_s: float = 0.0  # training images per second of pure training time (no evaluation)


def drop_path_policy(batch: int, num_blocks: int, p_last: float, generator: torch.Generator) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016) as a BlockDrop policy: block l of K is dropped with
    probability ``p_last * l / K``, independently per image. Training under such random policies makes
    the backbone tolerate the blocks a learned policy will later drop, and dropped blocks are not computed.
    """
    drop = p_last * torch.arange(1, num_blocks + 1) / num_blocks
    return (torch.rand(batch, num_blocks, generator=generator) >= drop).float()


def stochastic_depth_forward(
    model: BlockResNet, x: torch.Tensor, p_last: float, unit: str, generator: torch.Generator, dist: Dist = SINGLE
) -> torch.Tensor:
    """Training logits under stochastic depth with last-block drop probability ``p_last``.

    ``unit="batch"`` is Huang et al.'s form: one draw per mini-batch, and a dropped block is not computed
    at all, forward or backward (at ``p_last`` 0.5 on 15 blocks, 27% of the block compute is saved).
    ``unit="image"`` draws per image (timm's DropPath) and must run every block on every image, with the
    dropped outputs multiplied by 0 (the dense masked formula, BatchNorm over the whole batch).
    """
    if p_last == 0:
        return model(x)
    if unit == "batch":
        return model.forward_skipping(x, drop_path_policy(1, model.num_blocks, p_last, generator)[0])
    policy = dist.local(drop_path_policy(len(x) * dist.world, model.num_blocks, p_last, generator))
    return model.forward_masked(x, policy.to(x.device))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear from 0.1 to 1 over ``warmup`` steps, then cosine down to 0 at ``total``."""
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warmup_step(step: int, total: int, warmup: int) -> float:
    """LR multiplier of He et al.'s CIFAR schedule: the same linear warm-up, then 1, 0.1 from 50% and 0.01
    from 75% of ``total`` steps (their 164 epochs: x0.1 at 32k and 48k of 64k iterations)."""
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return 0.01 if step >= 0.75 * total else 0.1 if step >= 0.5 * total else 1.0


def lr_multiplier(schedule: str) -> Callable[[int, int, int], float]:
    """The multiplier function of ``pretrain.lr_schedule`` (``cosine`` or ``step``)."""
    return {"cosine": warmup_cosine, "step": warmup_step}[schedule]


def pretrain_backbone(
    model: BlockResNet,
    train: Split,
    val: Split,
    normalize: Normalize,
    cfg: Pretrain,
    loop: TrainContext,
) -> PretrainResult:
    """Train ``model`` in place for ``cfg.epochs``; resume from ``loop.checkpoint`` if it belongs to
    ``loop.run_key``.

    ``loop.compile_model``: the training forward runs through ``torch.compile``; ``model`` keeps the weights,
    and validation runs it eagerly. ``loop.dist``: every rank trains; rank 0 alone validates, saves the resume
    state and calls ``loop.on_epoch``/``loop.on_resume``. ``loop.sync_bn``: on GPUs, BatchNorm statistics over
    the global batch (every rank runs the same blocks: the drop draws are shared).
    """
    generator, precision, dist = loop.generator, loop.precision, loop.dist
    device = train.images.device
    model = sync_batchnorm(dist, model, loop.sync_bn)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN and biases
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
    )
    steps_per_epoch = dist.steps(len(train), cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    # The multiplier is a function of the step alone, and the scheduler's step count is saved with the state,
    # so a resumed run continues the same curve.
    multiplier = lr_multiplier(cfg.lr_schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: multiplier(s, total, warmup))
    net = compiled(model, loop.compile_model)

    result = PretrainResult()
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    start, result.history = loop.resume(parts)  # calls loop.on_resume when it continues a killed run
    # Built after resuming: DDP starts by giving every rank rank 0's weights. With stochastic depth per batch a
    # dropped block has no gradient in that step (on every rank: they draw the same blocks).
    forward = data_parallel(
        dist, lambda x: stochastic_depth_forward(net, x, cfg.drop_path, cfg.drop_path_unit, generator, dist),
        [model], skips_blocks=cfg.drop_path > 0 and cfg.drop_path_unit == "batch")

    train_seconds = sum(row["epoch_seconds"] for row in result.history)
    for epoch in range(start, cfg.epochs):
        model.train()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, torch.zeros(()), torch.zeros(())
        crop_size = 0 if epoch >= cfg.epochs - cfg.full_size_epochs else cfg.crop_size  # the last ones: whole images
        stream = batches(train, cfg.batch_size, normalize, generator=generator, shuffle=True,
                         crop_padding=cfg.crop_padding, crop_size=crop_size, flip=cfg.flip, dist=dist)
        for step, (x, y) in enumerate(tqdm(stream, total=steps_per_epoch, desc=f"pretrain {epoch + 1}/{cfg.epochs}",
                                           leave=False, mininterval=5, disable=not dist.is_main), 1):
            with autocast(precision, device):
                logits = forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_step(loss, model.parameters(), epoch + 1, step)  # before a NaN reaches the weights
            optimizer.step()
            scheduler.step()
            seen += len(y)
            loss_sum += loss.detach().cpu() * len(y)
            correct += (logits.argmax(1) == y).sum().cpu()
        epoch_seconds = time.perf_counter() - t0
        check_weights({"backbone": model}, epoch + 1)
        train_seconds += epoch_seconds
        seen, loss_sum, correct = all_reduce_sum(dist, {"seen": seen, "loss": loss_sum, "correct": correct}).values()
        if not dist.is_main:
            continue  # rank 0 validates and saves; the others wait for it in the next step's gradient exchange
        val_acc = accuracy(predict(model, val, normalize, precision=precision), val.labels) if len(val) else 0.0
        row = {
            "epoch": epoch + 1, "train/loss": (loss_sum / seen).item(), "train/accuracy": (correct / seen).item(),
            "val/accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / epoch_seconds, "epoch_seconds": epoch_seconds,
        }
        result.history.append(row)
        log.info("pretrain epoch %d/%d  %s  loss %.4f  train acc %.4f  val acc %.4f  %.0f img/s",
                 epoch + 1, cfg.epochs, f"{crop_size} px crops" if crop_size else "whole images", row["train/loss"],
                 row["train/accuracy"], val_acc, row["images_per_s"])
        loop.epoch_done(epoch + 1, parts, result.history)

    result.val_accuracy = result.history[-1]["val/accuracy"] if result.history else 0.0
    seen_total = sum(r["images_per_s"] * r["epoch_seconds"] for r in result.history)
    result.images_per_s = seen_total / max(train_seconds, 1e-9)
    return result
