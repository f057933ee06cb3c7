"""The networks a stage builds from ``params.yaml``'s ``model`` section: one rule for both families."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from blockdrop.models.imagenet import ImageNetResNet, PolicyResNet10, imagenet_resnet101, policy_resnet10
from blockdrop.models.resnet import BlockResNet, CifarResNet, cifar_resnet, policy_resnet8

if TYPE_CHECKING:
    from blockdrop.config import Model

__all__ = ["PolicyNet", "build_backbone", "build_policy", "family"]

# What decides the blocks: the CIFAR ResNet-8 or the ImageNet ResNet-10. Both output K logits and have ``fc``.
PolicyNet = CifarResNet | PolicyResNet10


def family(model: nn.Module) -> str:
    """'imagenet' for the ResNet-101 and its ResNet-10 policy, 'cifar' for the CIFAR ResNets."""
    if isinstance(model, ImageNetResNet | PolicyResNet10):
        return "imagenet"
    if isinstance(model, CifarResNet):
        return "cifar"
    raise TypeError(f"not a BlockDrop network: {type(model).__name__}")


def _three_channels(in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(f"the ImageNet networks take RGB images (3 channels), got {in_channels}")


def build_backbone(model_cfg: Model, num_classes: int, in_channels: int) -> BlockResNet:
    """depth 101: ResNet-101 from ``model_cfg.weights`` (torchvision's file); else a CIFAR ResNet, random init."""
    if model_cfg.imagenet:
        _three_channels(in_channels)
        return imagenet_resnet101(model_cfg.weights, num_classes)
    return cifar_resnet(model_cfg.depth, num_classes, in_channels)


def build_policy(backbone: BlockResNet, in_channels: int, model_cfg: Model) -> PolicyNet:
    """The policy network for ``backbone``'s K blocks: the ResNet-10 (from ``model_cfg.policy_weights`` when
    set) for the ImageNet ResNet, the random ResNet-8 for a CIFAR ResNet; each on the image average-pooled by
    ``model_cfg.policy_pool`` (0: the authors' factor, 2 for the ResNet-10 and 1 for the ResNet-8)."""
    if isinstance(backbone, ImageNetResNet):
        _three_channels(in_channels)
        return policy_resnet10(backbone.num_blocks, model_cfg.policy_weights, pool=model_cfg.policy_pool or 2)
    return policy_resnet8(backbone.num_blocks, in_channels, pool=model_cfg.policy_pool or 1)
