"""The finetuned BlockDrop model as one module: the form that is logged to MLflow and served.

``forward(x)`` takes normalised images (as ``blockdrop.data.Normalize`` makes them), runs the policy
network greedily (block t is kept when its probability is at least 0.5, as in evaluation), then the
backbone under that policy, and returns the class logits. The two networks stay reachable as
``backbone`` and ``policy_net``, so evaluation and FLOP counting work on a model loaded from the registry.
"""

from __future__ import annotations

import torch
from torch import nn

from blockdrop.models.factory import PolicyNet
from blockdrop.models.resnet import BlockResNet

__all__ = ["BlockDropNet"]


class BlockDropNet(nn.Module):
    def __init__(self, backbone: BlockResNet, policy_net: PolicyNet) -> None:
        super().__init__()
        if policy_net.fc.out_features != backbone.num_blocks:
            raise ValueError(f"policy decides {policy_net.fc.out_features} blocks, backbone has {backbone.num_blocks}")
        self.backbone, self.policy_net = backbone, policy_net

    def actions(self, x: torch.Tensor) -> torch.Tensor:
        """The greedy (B, K) 0/1 policy, the same rule as ``blockdrop.predict.run_policy``."""
        return (torch.sigmoid(self.policy_net(x).float()) >= 0.5).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self.backbone(x, self.actions(x))
