"""Stage 1 of BlockDrop: train the policy network alone, with a curriculum, on a frozen backbone.

In curriculum epoch e the policy decides only the last min(K, e + 1) blocks; the others are forced on
and left out of the loss. Starting with the blocks whose removal hurts least (the last ones) lets the
policy learn to drop blocks before it can wreck the early features every later block depends on.

With ``unlock_every`` > 0 a block is unlocked every that many training steps instead of every epoch: the
fast GPU profiles show the policy many images per epoch, and one block per epoch would then spend most of
the stage's time before the policy may touch the first blocks.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from tqdm import tqdm

from blockdrop import rl
from blockdrop.config import Curriculum
from blockdrop.data import Normalize, Split, batches
from blockdrop.dist import all_reduce_sum, data_parallel, sync_batchnorm
from blockdrop.models import BlockResNet, PolicyNet
from blockdrop.predict import policy_summary, run_policy
from blockdrop.runtime import compiled
from blockdrop.train.block_costs import CostTable
from blockdrop.train.context import TrainContext
from blockdrop.train.guard import check_step, check_weights
from blockdrop.train.rollout import rollout

__all__ = ["KeptPolicy", "learnable_blocks", "train_curriculum"]

log = logging.getLogger(__name__)


def learnable_blocks(epoch: int, step: int, steps_per_epoch: int, num_blocks: int, unlock_every: int) -> torch.Tensor:
    """The blocks the policy decides on at 0-based ``step`` of ``epoch``: one more per epoch (``unlock_every``
    0, the authors' schedule) or per ``unlock_every`` training steps. The global step is derived from the
    epoch, so a resumed run unlocks exactly as an unbroken one."""
    if unlock_every == 0:
        return rl.curriculum_mask(epoch, num_blocks)
    return rl.curriculum_mask((epoch * steps_per_epoch + step) // unlock_every, num_blocks)


class KeptPolicy:
    """The policy's weights as they were after ``curriculum.keep_epoch``: what ``models/policy_cl.pt`` holds and
    finetuning starts from. A part of the resume state, so a run resumed after that epoch still has it."""

    def __init__(self) -> None:
        self.weights: dict[str, Any] | None = None

    def keep(self, policy_net: torch.nn.Module) -> None:
        self.weights = copy.deepcopy(policy_net.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"]


def train_curriculum(
    backbone: BlockResNet,
    policy_net: PolicyNet,
    train: Split,
    val: Split,
    normalize: Normalize,
    cfg: Curriculum,
    loop: TrainContext,
    kept: KeptPolicy | None = None,
    costs: CostTable | None = None,
) -> list[dict[str, float]]:
    """Train ``policy_net`` in place; return one history row per epoch.

    ``kept`` (with ``cfg.keep_epoch`` > 0): receives the policy's weights after that epoch, and travels in the
    resume state (the default, without it, leaves the resume state as it was).

    ``costs`` (``curriculum.cost``): what each block costs in the reward (None: 1/K each, the paper's). A table
    measured at the stage's start (latency) travels in the resume state, so a resumed run keeps its weights.
    While only the last blocks are learnable, the forced-on blocks count as run (``a_k = 1``) with their own
    weights, as the paper's ``blocks / K`` counts them: the used fraction is always of the whole network, its
    floor is the forced-on blocks' share, and the policy moves it through the learnable blocks' weights alone. So
    a reward means the same in every epoch, and once every block is unlocked it is finetuning's reward.

    ``loop.compile_model``: the training forwards run through ``torch.compile``; the networks passed in keep
    the weights. ``loop.dist``: rank 0 alone validates, saves the resume state and calls
    ``loop.on_epoch``/``loop.on_resume``. ``loop.sync_bn``: on GPUs, synchronised BatchNorm where every rank
    runs every layer.
    """
    generator, precision, dist = loop.generator, loop.precision, loop.dist
    backbone.eval().requires_grad_(False)  # frozen: BN uses its running statistics, no weight changes
    policy_net = sync_batchnorm(dist, policy_net, loop.sync_bn)
    optimizer = torch.optim.Adam(policy_net.parameters(), lr=cfg.lr)
    parts = {"policy": policy_net, "optimizer": optimizer}
    if kept is not None and cfg.keep_epoch:
        parts["kept"] = kept
    if costs is not None and costs.measured:
        parts["costs"] = costs
    start, history = loop.resume(parts)  # calls loop.on_resume when it continues a killed run
    weights = None if costs is None else costs.reward_weights  # after resume: the table the run began with
    num_blocks = backbone.num_blocks
    steps = dist.steps(min(cfg.images_per_epoch, len(train)), cfg.batch_size)
    scored = val.head(cfg.val_images)  # a per-epoch curve only: it draws no random numbers, changes no weights
    backbone_fwd, policy_fwd = compiled(backbone, loop.compile_model), compiled(policy_net, loop.compile_model)
    # Compiled, the frozen backbone runs the dense masked form: in eval mode it gives the sparse form's
    # logits, and its shapes do not change with the actions, so one graph serves every step.
    step_rollout = data_parallel(dist, lambda x, y, learnable: rollout(
        backbone_fwd, policy_fwd, x, y, alpha=cfg.alpha, penalty=cfg.penalty, learnable=learnable,
        generator=generator, precision=precision, masked=loop.compile_model, dist=dist, weights=weights), [policy_net],
        skips_blocks=False)

    for epoch in range(start, cfg.epochs):
        learnable = learnable_blocks(epoch, 0, steps, num_blocks, cfg.unlock_every)
        policy_net.train()
        totals = {"reward": 0.0, "accuracy": 0.0, "blocks": 0.0, "advantage": 0.0}
        seen = 0
        stream = batches(train, cfg.batch_size, normalize, generator=generator, shuffle=True,
                         crop_padding=cfg.crop_padding, flip=cfg.flip, limit=cfg.images_per_epoch, dist=dist)
        for step, (x, y) in enumerate(tqdm(stream, total=steps, desc=f"curriculum {epoch + 1}/{cfg.epochs}",
                                           leave=False, mininterval=5, disable=not dist.is_main), 1):
            learnable = learnable_blocks(epoch, step - 1, steps, num_blocks, cfg.unlock_every)
            r = step_rollout(x, y, learnable)
            loss = rl.policy_gradient_loss(r.bounded, r.actions, r.advantage, learnable, beta=cfg.beta,
                                           entropy=cfg.entropy)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_step(loss, policy_net.parameters(), epoch + 1, step)
            optimizer.step()
            n = len(y)
            seen += n
            totals["reward"] += r.reward.sum().item()
            totals["accuracy"] += (r.logits.argmax(1) == y).sum().item()
            totals["blocks"] += r.actions.sum().item()
            totals["advantage"] += r.advantage.sum().item()
        check_weights({"policy": policy_net}, epoch + 1)
        sums = all_reduce_sum(dist, {**totals, "seen": seen})
        seen, totals = sums.pop("seen"), sums
        if not dist.is_main:
            continue  # rank 0 validates and saves; the others wait for it in the next step's gradient exchange
        # Validate the greedy policy under the same curriculum (as unlocked at the epoch's end): the forced-on
        # blocks stay on.
        logits, actions = run_policy(backbone, policy_net, scored, normalize, precision=precision,
                                     learnable=learnable)
        summary = policy_summary(logits, actions, scored.labels, cfg.penalty, weights)
        row = {
            "epoch": epoch + 1, "unlocked_blocks": int(learnable.sum()),
            **{f"train/{k}": v / seen for k, v in totals.items()},
            "val/accuracy": summary["accuracy"], "val/blocks_mean": summary["blocks_mean"],
            "val/reward": summary["reward"],
        }
        history.append(row)
        log.info("curriculum epoch %d/%d  unlocked %d/%d  train reward %.3f acc %.3f blocks %.2f  "
                 "val acc %.4f blocks %.2f", epoch + 1, cfg.epochs, row["unlocked_blocks"], num_blocks,
                 row["train/reward"], row["train/accuracy"], row["train/blocks"], row["val/accuracy"],
                 row["val/blocks_mean"])
        if "kept" in parts and epoch + 1 == cfg.keep_epoch:
            kept.keep(policy_net)
        loop.epoch_done(epoch + 1, parts, history)
    return history
