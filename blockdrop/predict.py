"""Predictions over whole splits: backbone logits, and BlockDrop's greedy policy with its logits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from blockdrop import rl
from blockdrop.data import Normalize, Split, batches
from blockdrop.models import BlockResNet, PolicyNet
from blockdrop.runtime import autocast

__all__ = ["accuracy", "policy_summary", "predict", "run_policy"]


@torch.no_grad()
def predict(
    model: BlockResNet,
    split: Split,
    normalize: Normalize,
    batch_size: int = 500,
    precision: str = "fp32",
    policy_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits (float32, on CPU) for every image of ``split``; ``policy_fn(x)`` supplies a policy per batch."""
    was_training = model.training
    model.eval()
    device = split.images.device
    out = []
    for x, _ in batches(split, batch_size, normalize):
        with autocast(precision, device):
            out.append(model(x, None if policy_fn is None else policy_fn(x)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max is the label."""
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


@torch.no_grad()
def run_policy(
    backbone: BlockResNet,
    policy_net: PolicyNet,
    split: Split,
    normalize: Normalize,
    batch_size: int = 500,
    precision: str = "fp32",
    learnable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, greedy actions) of BlockDrop on every image of ``split``; blocks outside ``learnable``
    are forced on, as the curriculum does."""
    backbone_mode, policy_mode = backbone.training, policy_net.training
    backbone.eval(), policy_net.eval()
    device = split.images.device
    all_logits, all_actions = [], []
    for x, _ in batches(split, batch_size, normalize):
        with autocast(precision, device):
            actions = (torch.sigmoid(policy_net(x).float()) >= 0.5).float()
            if learnable is not None:
                actions[:, ~learnable.to(device)] = 1.0
            all_logits.append(backbone(x, actions).float().cpu())
        all_actions.append(actions.cpu())
    backbone.train(backbone_mode), policy_net.train(policy_mode)
    return torch.cat(all_logits), torch.cat(all_actions)


def policy_summary(logits: torch.Tensor, actions: torch.Tensor, labels: torch.Tensor, penalty: float,
                   weights: torch.Tensor | None = None) -> dict:
    """Accuracy, blocks used (mean, std) and mean reward of a greedy run (``weights``: the blocks' shares of the
    cost in the reward, as :func:`blockdrop.rl.reward`)."""
    correct = logits.argmax(1) == labels.cpu()
    blocks = actions.sum(1)
    return {
        "accuracy": correct.float().mean().item(),
        "blocks_mean": blocks.mean().item(),
        "blocks_std": blocks.std(unbiased=False).item(),
        "reward": rl.reward(actions, correct, penalty, weights).mean().item(),
    }
