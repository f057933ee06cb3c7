"""The backbone ResNets and the policy network."""

from blockdrop.models.resnet import BasicBlock, CifarResNet, Shortcut, cifar_resnet, policy_resnet8

__all__ = ["BasicBlock", "CifarResNet", "Shortcut", "cifar_resnet", "policy_resnet8"]
from blockdrop.models.blockdrop_net import BlockDropNet
from blockdrop.models.io import (
    load_backbone,
    load_blockdrop,
    load_policy,
    save_backbone,
    save_blockdrop,
    save_policy,
)

__all__ += ["BlockDropNet", "load_backbone", "load_blockdrop", "load_policy", "save_backbone", "save_blockdrop",
            "save_policy"]
