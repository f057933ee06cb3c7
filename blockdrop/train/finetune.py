"""Stage 2 of BlockDrop: train the policy and the backbone together.

No curriculum and no entropy bonus. The backbone, now in train mode, learns to classify under the
policies it is given (cross-entropy of its logits under the *sampled* actions), while the policy keeps
learning from the reward. This is where accuracy lost to dropped blocks comes back: the remaining
blocks adapt to the paths the policy chooses.

``greedy_ce`` (our addition; 0 is the paper's loss) adds the cross-entropy under the *greedy* actions, the
paths evaluation runs. The greedy forward is computed anyway for the self-critical baseline, so this
costs only its backward; in a short finetuning it is worth about half a point of test accuracy.
``backbone_lr`` (ours too; 0 is the paper's single rate) lets the backbone, which must re-learn under
half its blocks, take larger steps than the policy, which the curriculum has already trained.
``distill`` (ours; 0 is the paper's loss) is in-place distillation (Yu and Huang's universally slimmable
networks): each step also runs every block on the batch and trains that full path on the labels, and the
sampled and greedy paths learn the full path's predicted distribution beside the labels (KL divergence,
weight ``distill``; the greedy one's times ``greedy_ce``). The backbone then keeps learning as the whole
network does, and the sub-networks the policy picks are taught by it. On the default it took blocks off but
moved no further along the accuracy-compute frontier than the penalty does (docs/sweeps.md).
``lr_decay_epoch`` / ``lr_decay`` are the authors' step decay (both rates x0.1 from epoch 1600 of 2000).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blockdrop import rl
from blockdrop.config import Finetune
from blockdrop.data import Normalize, Split, batches
from blockdrop.dist import all_reduce_sum, data_parallel, sync_batchnorm
from blockdrop.models import BlockResNet, PolicyNet
from blockdrop.predict import policy_summary, run_policy
from blockdrop.runtime import compiled
from blockdrop.train.block_costs import CostTable
from blockdrop.train.budget import backbone_lr, lr_factor
from blockdrop.train.context import TrainContext
from blockdrop.train.guard import check_step, check_weights
from blockdrop.train.rollout import Rollout, rollout

# lr_factor: blockdrop.train.budget's, shared with finetune-full
__all__ = ["distillation", "finetune_jointly", "lr_factor"]

log = logging.getLogger(__name__)


def distillation(r: Rollout, greedy_weight: float) -> torch.Tensor:
    """KL divergence of the sampled (and, weighted, the greedy) path's prediction from the full path's.

    The full path's distribution is the target, so it is detached: the full network learns from the labels
    alone, and the paths learn from it (a teacher taught by the sub-networks would drift towards them).
    """
    target = F.softmax(r.full_logits.detach(), 1)
    kl = F.kl_div(F.log_softmax(r.logits, 1), target, reduction="batchmean")
    if greedy_weight > 0:
        kl = kl + greedy_weight * F.kl_div(F.log_softmax(r.greedy_logits, 1), target, reduction="batchmean")
    return kl


def finetune_jointly(
    backbone: BlockResNet,
    policy_net: PolicyNet,
    train: Split,
    val: Split,
    normalize: Normalize,
    cfg: Finetune,
    loop: TrainContext,
    costs: CostTable | None = None,
) -> list[dict[str, float]]:
    """Train ``backbone`` and ``policy_net`` in place; return one history row per epoch.

    ``loop.compile_model``: the training forwards run through ``torch.compile`` (it pays with ``execution:
    masked``, whose shapes do not depend on the actions); the networks passed in keep the weights.
    ``loop.dist``: rank 0 alone validates, saves the resume state and calls ``loop.on_epoch``/``loop.on_resume``.
    ``loop.sync_bn``: on GPUs, synchronised BatchNorm where every rank runs every layer: the policy network,
    and the backbone with ``execution: masked`` only (the sparse forward skips blocks per image, so a rank may
    not enter a block the others do).
    ``costs`` (``finetune.cost``): what each block costs in the reward (None: 1/K each, the paper's); a table
    measured at the stage's start (latency) travels in the resume state, so a resumed run keeps its weights.
    """
    generator, precision, dist = loop.generator, loop.precision, loop.dist
    backbone.requires_grad_(True)
    masked = cfg.execution == "masked"
    policy_net = sync_batchnorm(dist, policy_net, loop.sync_bn)
    backbone = sync_batchnorm(dist, backbone, loop.sync_bn and masked)
    base_lrs = (cfg.lr, backbone_lr(cfg))  # policy, backbone: the rates before any decay
    optimizer = torch.optim.Adam([{"params": policy_net.parameters()},
                                  {"params": backbone.parameters(), "lr": base_lrs[1]}], lr=base_lrs[0])
    parts = {"policy": policy_net, "backbone": backbone, "optimizer": optimizer}
    if costs is not None and costs.measured:
        parts["costs"] = costs
    start, history = loop.resume(parts)  # calls loop.on_resume when it continues a killed run
    weights = None if costs is None else costs.reward_weights  # after resume: the table the run began with
    all_blocks = torch.ones(backbone.num_blocks, dtype=torch.bool)
    steps = dist.steps(min(cfg.images_per_epoch, len(train)), cfg.batch_size)
    backbone_fwd, policy_fwd = compiled(backbone, loop.compile_model), compiled(policy_net, loop.compile_model)
    # One step (the policy, then the backbone under the sampled and the greedy actions) as one DDP forward; the
    # sparse forward leaves the blocks no image of a rank kept without a gradient there. The masked forward
    # skips a block no image of the batch keeps (the authors' batch-wide skip) with one process only: under
    # DDP and synchronised BatchNorm every rank must run every layer of it.
    step_rollout = data_parallel(dist, lambda x, y: rollout(
        backbone_fwd, policy_fwd, x, y, alpha=cfg.alpha, penalty=cfg.penalty, learnable=all_blocks,
        generator=generator, precision=precision, backbone_grad=True, greedy_grad=cfg.greedy_ce > 0,
        masked=masked, skip_unused=masked and not dist.enabled, dist=dist, weights=weights, full=cfg.distill > 0),
        [policy_net, backbone],
        skips_blocks=not masked)

    for epoch in range(start, cfg.epochs):
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * lr_factor(epoch, cfg)  # set, never multiplied: resume-safe
        backbone.train(), policy_net.train()
        totals = {"loss": 0.0, "ce": 0.0, "reward": 0.0, "accuracy": 0.0, "blocks": 0.0}
        seen = 0
        stream = batches(train, cfg.batch_size, normalize, generator=generator, shuffle=True,
                         crop_padding=cfg.crop_padding, flip=cfg.flip, limit=cfg.images_per_epoch, dist=dist)
        for step, (x, y) in enumerate(tqdm(stream, total=steps, desc=f"finetune {epoch + 1}/{cfg.epochs}",
                                           leave=False, mininterval=5, disable=not dist.is_main), 1):
            r = step_rollout(x, y)
            pg = rl.policy_gradient_loss(r.bounded, r.actions, r.advantage, reduction=cfg.pg_reduction)
            ce = F.cross_entropy(r.logits, y)
            if cfg.greedy_ce > 0:
                ce = ce + cfg.greedy_ce * F.cross_entropy(r.greedy_logits, y)
            if r.full_logits is not None:
                ce = ce + F.cross_entropy(r.full_logits, y) + cfg.distill * distillation(r, cfg.greedy_ce)
            loss = pg + ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_step(loss, [*policy_net.parameters(), *backbone.parameters()], epoch + 1, step)
            optimizer.step()
            n = len(y)
            seen += n
            totals["loss"] += loss.item() * n
            totals["ce"] += ce.item() * n
            totals["reward"] += r.reward.sum().item()
            totals["accuracy"] += (r.logits.detach().argmax(1) == y).sum().item()
            totals["blocks"] += r.actions.sum().item()
        check_weights({"policy": policy_net, "backbone": backbone}, epoch + 1)
        sums = all_reduce_sum(dist, {**totals, "seen": seen})
        seen, totals = sums.pop("seen"), sums
        if not dist.is_main:
            continue  # rank 0 validates and saves; the others wait for it in the next step's gradient exchange
        logits, actions = run_policy(backbone, policy_net, val, normalize, precision=precision)
        summary = policy_summary(logits, actions, val.labels, cfg.penalty, weights)
        row = {
            "epoch": epoch + 1, **{f"train/{k}": v / seen for k, v in totals.items()},
            "val/accuracy": summary["accuracy"], "val/blocks_mean": summary["blocks_mean"],
            "val/reward": summary["reward"], "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        log.info("finetune epoch %d/%d  loss %.3f  train reward %.3f acc %.3f blocks %.2f  val acc %.4f "
                 "blocks %.2f", epoch + 1, cfg.epochs, row["train/loss"], row["train/reward"],
                 row["train/accuracy"], row["train/blocks"], row["val/accuracy"], row["val/blocks_mean"])
        loop.epoch_done(epoch + 1, parts, history)
    backbone.eval(), policy_net.eval()
    return history
