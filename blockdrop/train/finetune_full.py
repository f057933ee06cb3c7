"""The fair full-network baseline: the pretrained backbone trained further with every block on, on exactly the
budget the ``finetune`` stage gives BlockDrop's backbone.

BlockDrop's backbone is not the pretrained one: finetuning trains it for ``finetune.epochs`` more epochs. Set
against the pretrained backbone alone, BlockDrop's accuracy mixes what the policy does with what that extra
training does. This loop gives the full network the same extra training, and nothing else differs:

* the same images in the same order, with the same crops and flips: the same ``batches`` call on the same
  seeded generator, which also draws, after each batch, the uniforms finetune draws to sample the policy's
  actions (``rl.sample_actions``), so the generator, and with it every later batch, stays in step with finetune's;
* the same optimizer: Adam with Adam's defaults at the backbone's rate (``finetune.backbone_lr``, or
  ``finetune.lr`` when 0), the same step decay (``finetune.lr_decay_epoch``, ``finetune.lr_decay``), one step per
  batch, the last incomplete batch kept (dropped only under several processes, as in finetune);
* the same precision (bf16 autocast where the stage trains in bf16), BatchNorm in train mode, and the same
  data-parallel rule under ``torchrun``.

What differs is what makes it the full network: every block runs on every image, and the loss is the
cross-entropy of its logits (finetune's loss is the policy gradient plus the cross-entropy under the sampled
actions, plus ``greedy_ce`` times the one under the greedy actions; with every block on, both cross-entropies
are the same one, and Adam's steps do not depend on a constant factor on the loss).

``keep`` trains a *static* subnetwork on the same budget instead: a fixed set of blocks, the same for every
image, run and trained alone (``bench/static_subnets.py`` sets it to the blocks BlockDrop's policy keeps most
often, to ask what the per-image choice is worth over a fixed one).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blockdrop import rl
from blockdrop.config import Finetune
from blockdrop.data import Normalize, Split, batches
from blockdrop.dist import SINGLE, Dist, all_reduce_sum, data_parallel, sync_batchnorm
from blockdrop.models import BlockResNet
from blockdrop.predict import accuracy, predict
from blockdrop.runtime import autocast, compiled
from blockdrop.train.budget import backbone_lr, lr_factor
from blockdrop.train.context import TrainContext
from blockdrop.train.guard import check_step, check_weights

__all__ = ["finetune_full", "keep_in_step_with_policy_sampling"]

log = logging.getLogger(__name__)


def keep_in_step_with_policy_sampling(generator: torch.Generator, batch: int, num_blocks: int,
                                      dist: Dist = SINGLE) -> None:
    """Draw from ``generator`` what finetune's policy sampling draws for a batch of ``batch`` images on this rank
    (the uniforms of ``rl.sample_actions`` over the global batch), and discard it."""
    rl.sample_actions(torch.zeros(batch, num_blocks), generator, dist)


def finetune_full(
    backbone: BlockResNet,
    train: Split,
    val: Split,
    normalize: Normalize,
    cfg: Finetune,
    loop: TrainContext,
    keep: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Train ``backbone`` in place with every block on, on finetune's budget; return one history row per epoch.

    Of ``cfg`` it reads the budget alone: ``epochs``, ``images_per_epoch``, ``batch_size``, ``lr``,
    ``backbone_lr``, ``lr_decay_epoch``, ``lr_decay``, ``crop_padding`` and ``flip``; never the policy's keys.
    ``loop`` as for finetune (:class:`TrainContext`): rank 0 alone validates, saves the resume state and calls
    ``loop.on_epoch``/``loop.on_resume``; ``loop.sync_bn``: on GPUs, synchronised BatchNorm (every rank runs every
    layer of the full network). ``keep``: a 0/1 mask of the blocks to run, the same for every image (None: all).
    """
    generator, precision, dist = loop.generator, loop.precision, loop.dist
    backbone.requires_grad_(True)
    backbone = sync_batchnorm(dist, backbone, loop.sync_bn)
    base_lr = backbone_lr(cfg)
    optimizer = torch.optim.Adam(backbone.parameters(), lr=base_lr)
    parts = {"backbone": backbone, "optimizer": optimizer}
    start, history = loop.resume(parts)  # calls loop.on_resume when it continues a killed run
    steps = dist.steps(min(cfg.images_per_epoch, len(train)), cfg.batch_size)
    net = compiled(backbone, loop.compile_model)

    def policy(x: torch.Tensor) -> torch.Tensor | None:
        return None if keep is None else keep.to(x.device, torch.float32).expand(len(x), -1)

    forward = data_parallel(dist, lambda x: net(x, policy(x)), [backbone], skips_blocks=keep is not None)

    for epoch in range(start, cfg.epochs):
        optimizer.param_groups[0]["lr"] = base_lr * lr_factor(epoch, cfg)  # set, never multiplied: resume-safe
        backbone.train()
        seen, loss_sum, correct = 0, torch.zeros(()), torch.zeros(())
        stream = batches(train, cfg.batch_size, normalize, generator=generator, shuffle=True,
                         crop_padding=cfg.crop_padding, flip=cfg.flip, limit=cfg.images_per_epoch, dist=dist)
        for step, (x, y) in enumerate(tqdm(stream, total=steps, desc=f"finetune-full {epoch + 1}/{cfg.epochs}",
                                           leave=False, mininterval=5, disable=not dist.is_main), 1):
            keep_in_step_with_policy_sampling(generator, len(y), backbone.num_blocks, dist)
            with autocast(precision, x.device):
                logits = forward(x).float()
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_step(loss, backbone.parameters(), epoch + 1, step)  # before a NaN reaches the weights
            optimizer.step()
            seen += len(y)
            loss_sum += loss.detach().cpu() * len(y)
            correct += (logits.detach().argmax(1) == y).sum().cpu()
        check_weights({"backbone": backbone}, epoch + 1)
        seen, loss_sum, correct = all_reduce_sum(dist, {"seen": seen, "loss": loss_sum, "correct": correct}).values()
        if not dist.is_main:
            continue  # rank 0 validates and saves; the others wait for it in the next step's gradient exchange
        val_acc = (accuracy(predict(backbone, val, normalize, precision=precision, policy_fn=policy), val.labels)
                   if len(val) else 0.0)
        row = {"epoch": epoch + 1, "train/loss": float(loss_sum / seen), "train/accuracy": float(correct / seen),
               "train/images": int(seen), "val/accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        log.info("finetune-full epoch %d/%d  loss %.4f  train acc %.4f  val acc %.4f  (%d images, lr %.2g)",
                 epoch + 1, cfg.epochs, row["train/loss"], row["train/accuracy"], val_acc, row["train/images"],
                 row["lr"])
        loop.epoch_done(epoch + 1, parts, history)
    backbone.eval()
    return history
