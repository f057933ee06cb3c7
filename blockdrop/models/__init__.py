"""The backbone ResNets and the policy networks (CIFAR and ImageNet families)."""

from blockdrop.models.blockdrop_net import BlockDropNet
from blockdrop.models.factory import PolicyNet, build_backbone, build_policy, family
from blockdrop.models.imagenet import (
    BottleneckBranch,
    ImageNetResNet,
    PolicyResNet10,
    imagenet_resnet101,
    policy_resnet10,
)
from blockdrop.models.io import (
    load_backbone,
    load_blockdrop,
    load_policy,
    save_backbone,
    save_blockdrop,
    save_policy,
)
from blockdrop.models.pretrained import check_torchvision_arch, load_torchvision_weights
from blockdrop.models.resnet import (
    BasicBlock,
    BlockResNet,
    CifarResNet,
    PolicyResNet8,
    Shortcut,
    cifar_resnet,
    policy_resnet8,
)

__all__ = [
    "BasicBlock", "BlockDropNet", "BlockResNet", "BottleneckBranch", "CifarResNet", "ImageNetResNet", "PolicyNet",
    "PolicyResNet8", "PolicyResNet10", "Shortcut", "build_backbone", "build_policy", "check_torchvision_arch",
    "cifar_resnet", "family", "imagenet_resnet101", "load_backbone", "load_blockdrop", "load_policy",
    "load_torchvision_weights", "policy_resnet8", "policy_resnet10", "save_backbone", "save_blockdrop", "save_policy",
]
