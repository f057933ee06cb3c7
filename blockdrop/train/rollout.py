"""One policy-gradient step's worth of evidence: sample a policy, run the backbone, score it.

Both RL stages share this. The greedy policy (keep a block iff p >= 0.5) is run beside the sampled one
and its reward is the baseline (self-critical training, Rennie et al. 2017): a sampled policy is
reinforced only when it beats what the policy would do greedily on the same image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from blockdrop import rl
from blockdrop.dist import SINGLE, Dist
from blockdrop.models import BlockResNet, PolicyNet
from blockdrop.runtime import autocast

__all__ = ["Rollout", "rollout"]


@dataclass
class Rollout:
    bounded: torch.Tensor  # p', the probabilities the actions were sampled from (with grad)
    actions: torch.Tensor  # sampled 0/1 actions, forced-on blocks included
    greedy: torch.Tensor  # greedy 0/1 actions, forced-on blocks included
    logits: torch.Tensor  # backbone logits under the sampled actions (with grad when asked)
    greedy_logits: torch.Tensor  # backbone logits under the greedy actions (with grad when asked)
    full_logits: torch.Tensor | None  # backbone logits with every block on (with grad), when asked
    reward: torch.Tensor  # reward of the sampled actions
    baseline: torch.Tensor  # reward of the greedy actions
    greedy_correct: torch.Tensor

    @property
    def advantage(self) -> torch.Tensor:
        return self.reward - self.baseline


def rollout(
    backbone: BlockResNet,
    policy_net: PolicyNet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    alpha: float,
    penalty: float,
    learnable: torch.Tensor,
    generator: torch.Generator,
    precision: str = "fp32",
    backbone_grad: bool = False,
    greedy_grad: bool = False,
    masked: bool = False,
    skip_unused: bool = False,
    dist: Dist = SINGLE,
    weights: torch.Tensor | None = None,
    full: bool = False,
) -> Rollout:
    """Sample actions from the policy on ``x`` and score both them and the greedy actions on ``y``.

    ``backbone_grad`` / ``greedy_grad``: keep the graph of the backbone's logits under the sampled / the
    greedy actions, for a loss on them. ``masked``: run both through the paper's dense masked formula
    instead of the sparse forward (they differ only in train mode, in what the kept blocks' BatchNorm
    sees). Both policies are always scored by the same forward, as in the authors' code: the advantage
    must measure the policies' difference, not a difference between two ways of running the backbone.
    ``skip_unused`` (with ``masked``): a block no image of the batch keeps is not run, as the authors' forward.
    ``dist``: ``x`` is this rank's part of a global batch; the samples are drawn for the whole of it.
    ``weights``: the blocks' shares of the cost in the reward (:func:`blockdrop.rl.reward`; None: 1/K each).
    ``full``: also run every block on ``x``, with the graph (``full_logits``; finetune's ``distill``).
    """
    with autocast(precision, x.device):
        probs = torch.sigmoid(policy_net(x).float())
    bounded = rl.bound_probs(probs, alpha)
    actions = rl.force_on(rl.sample_actions(bounded.detach(), generator, dist), learnable)
    greedy = rl.force_on(rl.greedy_actions(probs.detach()), learnable)
    run = backbone
    if masked:  # a test double's forward_masked need not take skip_unused: pass it only when asked
        run = functools.partial(backbone.forward_masked, skip_unused=True) if skip_unused else backbone.forward_masked
    with torch.set_grad_enabled(backbone_grad), autocast(precision, x.device):
        logits = run(x, actions).float()
    with torch.set_grad_enabled(greedy_grad), autocast(precision, x.device):
        greedy_logits = run(x, greedy).float()
    greedy_correct = greedy_logits.detach().argmax(1) == y
    full_logits = None
    if full:
        with autocast(precision, x.device):
            full_logits = run(x, torch.ones_like(actions)).float()
    return Rollout(
        bounded=bounded, actions=actions, greedy=greedy, logits=logits, greedy_logits=greedy_logits,
        full_logits=full_logits,
        reward=rl.reward(actions, logits.detach().argmax(1) == y, penalty, weights),
        baseline=rl.reward(greedy, greedy_correct, penalty, weights), greedy_correct=greedy_correct,
    )
