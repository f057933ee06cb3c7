"""The ImageNet networks: torchvision's ResNet-101 with skippable blocks, and the ResNet-10 policy.

``ImageNetResNet`` is torchvision's ResNet (bottleneck blocks, 3-4-23-3 for ResNet-101) laid out as a
``BlockResNet``: each of the K = 33 bottlenecks is a residual branch in ``blocks`` and its shortcut in
``shortcuts`` (torchvision's ``downsample``, a 1x1 conv + BN, at each stage's first block). Every block can
be skipped for real; a dropped stage-first block still runs its downsample, as in the authors'
FlatResNet224, because the next block needs the new shape. The downsample's FLOPs are therefore part of
what always runs, the authors' FLOPs convention. Layer names inside a branch are torchvision's
(conv1..bn3), so its weights map one to one.

``PolicyResNet10`` is the authors' Policy224: the image average-pooled by 2 (224 -> 112), a ResNet-10
(ResNet-18's layout with one basic block per stage), global pooling and ``Linear(512, K)`` logits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock

from blockdrop.models.pretrained import check_torchvision_arch, load_torchvision_weights
from blockdrop.models.resnet import BlockResNet

__all__ = ["BottleneckBranch", "ImageNetResNet", "PolicyResNet10", "imagenet_resnet101", "policy_resnet10",
           "torchvision_key"]

RESNET101 = (3, 4, 23, 3)
EXPANSION = 4  # a bottleneck's output has 4x the channels of its 3x3 conv


class BottleneckBranch(nn.Module):
    """The residual branch of torchvision's Bottleneck: 1x1 - 3x3 (stride here) - 1x1, BN after each,
    returning bn3's output before the addition (the network adds the shortcut and applies the ReLU)."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * EXPANSION)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


class ImageNetResNet(BlockResNet):
    """torchvision's bottleneck ResNet (ResNet-101 by default) with every block skippable; random init."""

    def __init__(self, num_classes: int = 1000, layers: Sequence[int] = RESNET101) -> None:
        super().__init__()
        self.blocks_per_stage = tuple(layers)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        blocks, shortcuts = [], []
        channels = 64
        for stage, n in enumerate(self.blocks_per_stage):
            width, stride = 64 * 2**stage, 1 if stage == 0 else 2
            for b in range(n):
                s = stride if b == 0 else 1
                blocks.append(BottleneckBranch(channels, width, s))
                # every stage starts with a change of width (64 -> 256 in the first), so it has a downsample
                shortcuts.append(nn.Sequential(nn.Conv2d(channels, width * EXPANSION, 1, s, bias=False),
                                               nn.BatchNorm2d(width * EXPANSION)) if b == 0 else nn.Identity())
                channels = width * EXPANSION
        self.blocks, self.shortcuts = nn.ModuleList(blocks), nn.ModuleList(shortcuts)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def depth(self) -> int:
        """3 convolutions per bottleneck, plus the stem and the classifier: 101 for 3-4-23-3."""
        return 3 * sum(self.blocks_per_stage) + 2


def torchvision_key(key: str, layers: Sequence[int] = RESNET101) -> str:
    """The name in ``ImageNetResNet`` of a torchvision ResNet state-dict key.

    conv1/bn1 -> stem.0/stem.1; layerI.J.downsample.* -> shortcuts.<t>.*; layerI.J.* -> blocks.<t>.*;
    fc.* unchanged; t counts blocks across stages.
    """
    match = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", key)
    if match is None:
        return re.sub(r"^conv1\.", "stem.0.", re.sub(r"^bn1\.", "stem.1.", key))
    stage, b, rest = int(match[1]) - 1, int(match[2]), match[3]
    t = sum(layers[:stage]) + b
    if rest.startswith("downsample."):
        return f"shortcuts.{t}.{rest.removeprefix('downsample.')}"
    return f"blocks.{t}.{rest}"


def imagenet_resnet101(weights: str | Path, num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-101 with torchvision's ImageNet weights from the local file ``weights`` (hash-checked).

    The file must be torchvision's resnet101 (it must load strictly into ``torchvision.models.resnet101()``),
    else ``CheckpointError``. With ``num_classes`` other than 1000 the classifier is a fresh
    ``Linear(2048, num_classes)``, random: the network must then be trained before it means anything.
    """
    state = load_torchvision_weights(weights)
    check_torchvision_arch(state, "resnet101", weights)
    with torch.device("meta"):  # no random init of 44M parameters that the file replaces at once
        model = ImageNetResNet(1000)
    model.load_state_dict({torchvision_key(k): v for k, v in state.items()}, strict=True, assign=True)
    if num_classes != 1000:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


class PolicyResNet10(torchvision.models.ResNet):
    """The authors' Policy224: ``avg_pool2d(x, 2)``, then a ResNet-10 ([1, 1, 1, 1] basic blocks), pool, fc.

    A torchvision ``ResNet``, so its parameter names are ResNet-18's (conv1, bn1, layerN.0.*, fc): the
    first block of each stage loads from ResNet-18 under its own name. Outputs K logits (callers apply
    sigmoid for the keep-probabilities).
    """

    def __init__(self, num_blocks: int, pool: int = 2) -> None:
        super().__init__(TorchvisionBasicBlock, [1, 1, 1, 1], num_classes=num_blocks)
        self.pool = pool  # the authors' 2; params model.policy_pool may choose another

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 224 -> 112 at the authors' pool of 2: the policy looks at a quarter of the pixels
        return super().forward(F.avg_pool2d(x, self.pool) if self.pool > 1 else x)


def policy_resnet10(num_blocks: int, weights: str | Path = "", pool: int = 2) -> PolicyResNet10:
    """BlockDrop's ImageNet policy network deciding ``num_blocks`` blocks; random init without ``weights``.

    With ``weights`` (torchvision's resnet18 file, hash-checked) the stem and each stage's first block,
    downsample included, are copied from ResNet-18, as the authors' ``load_weights_to_flatresnet`` did;
    the K-way ``fc`` stays random.
    """
    policy = PolicyResNet10(num_blocks, pool)
    if weights:
        state = load_torchvision_weights(weights)
        check_torchvision_arch(state, "resnet18", weights)
        first = {k: v for k, v in state.items() if re.match(r"(conv1|bn1|layer\d+\.0)\.", k)}
        missing, unexpected = policy.load_state_dict(first, strict=False)
        assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)
    return policy
