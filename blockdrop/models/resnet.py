"""ResNets that can run a per-image block policy: the shared machinery, and the CIFAR family.

``BlockResNet`` is what every stage sees: a ``stem``, K residual *branches* in ``blocks``, one shortcut per
block in ``shortcuts`` (identity, or whatever downsamples at a stage's first block), and a classifier
``head``. The CIFAR ResNets here (He et al. 2016, option A shortcuts) and torchvision's ResNet-101
(``blockdrop.models.imagenet``) both fill it in. Four ways to run one:

* ``forward(x)``: the full network, every block on.
* ``forward(x, policy)``: one 0/1 action per image and block; each block runs only on the images that
  keep it (a sub-batch), so the output is what it would be had the dropped blocks been skipped, and
  gradients reach exactly the blocks each image kept.
* ``forward_masked(x, policy)``: the paper's dense formula for the same thing: every block runs on every
  image and a dropped block's output is multiplied by 0. It saves no time; stochastic depth uses it.
  ``skip_unused=True`` adds the authors' batch-wide skip: a block no image keeps is not run.
* ``forward_skipping(x, actions)``: *real* skipping for a batch that shares one policy (batch size 1 at
  inference): a dropped block is never computed, which is where BlockDrop's speedup comes from.

A CIFAR network of depth 6n+2 has three stages of n basic blocks (16, 32, 64 channels, strides 1, 2, 2),
so K = 3n residual blocks that a policy can switch on or off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "BlockResNet", "CifarResNet", "Shortcut", "cifar_resnet", "policy_resnet8"]


class BasicBlock(nn.Module):
    """The residual branch conv-BN-ReLU-conv-BN; the addition and the final ReLU live in the network."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Shortcut(nn.Module):
    """Parameter-free shortcut: average-pool by the stride, then zero-pad the new channels.

    It has no weights and costs no FLOPs under the paper's convention, and it always runs, even when the
    block beside it is skipped, because the next block needs the downsampled shape.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # ceil_mode: an odd side (7 for a 28x28 image pooled by 2 before the policy) gives the stride-2
            # convolution's ceil(7/2) = 4, not 3; on even sides it changes nothing
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))  # zeros appended along the channel dim
        return x


class BlockResNet(nn.Module):
    """A ResNet laid out for BlockDrop: ``stem``, then block t is ``x = relu(shortcuts[t](x) + blocks[t](x))``
    where it runs and ``x = shortcuts[t](x)`` where it is dropped, then ``head``.

    Subclasses build ``stem``, ``blocks`` (the residual branches, without the addition and final ReLU),
    ``shortcuts`` (one per block), ``fc`` and ``blocks_per_stage``; the ways of running a policy live here,
    so both families run them identically. A dropped stage-first block keeps its shortcut, as in the
    authors' FlatResNet: the next block needs the downsampled shape.
    """

    stem: nn.Sequential
    blocks: nn.ModuleList
    shortcuts: nn.ModuleList
    fc: nn.Linear
    blocks_per_stage: tuple[int, ...]

    @property
    def depth(self) -> int:
        """The layer count in the network's name (32, 110, 101): weighted layers on the main path."""
        raise NotImplementedError

    @property
    def in_channels(self) -> int:
        return self.stem[0].in_channels

    @property
    def num_blocks(self) -> int:
        """K, the number of residual blocks a policy decides on."""
        return len(self.blocks)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the full network, or of the network under a (batch, K) 0/1 ``policy``.

        Under a policy, block t of image i contributes only where ``policy[i, t] = 1``; elsewhere the image
        passes through the shortcut. This is the masked form of the paper,
        ``x = relu(residual + block(x)) * a + residual * (1 - a)``, computed sparsely: each block runs on
        the sub-batch of images that keep it, so dropped blocks cost nothing, forward or backward (at the
        ~50% of blocks BlockDrop keeps, a training step is about 1.3x faster than the dense formula on a
        CPU). In train mode a block's BatchNorm then sees only the images that run it, the same images
        whose statistics its running averages stand for at test time; ``forward_masked`` is the dense
        formula, where it sees the whole batch. Both give the same logits in eval mode. The skipped path
        has no ReLU, as in the authors' code: with parameter-free CIFAR shortcuts the residual is already
        non-negative (every block ends in a ReLU; pooling and zero padding keep that), while a dropped
        ImageNet stage-first block hands on its downsample's BatchNorm output as it is.
        """
        x = self.stem(x)
        keep = None if policy is None else policy > 0.5
        for t, (block, shortcut) in enumerate(zip(self.blocks, self.shortcuts, strict=True)):
            residual = shortcut(x)
            if keep is None or bool(keep[:, t].all()):
                x = F.relu(residual + block(x))
                continue
            idx = keep[:, t].nonzero().squeeze(1)
            if len(idx):
                out = F.relu(residual[idx] + block(x[idx]))
                residual = residual.index_put((idx,), out)  # keeps channels_last, unlike index_copy
            x = residual
        return self.head(x)

    def forward_masked(self, x: torch.Tensor, policy: torch.Tensor, skip_unused: bool = False) -> torch.Tensor:
        """The dense masked formula, every block on every image: the paper's training form, and the
        reference ``forward`` must match in eval mode.

        ``skip_unused``: a block that no image of the batch keeps is not run at all, as in the authors'
        ``FlatResNet.forward``: the logits are the same, but its BatchNorm running statistics are not updated
        and its weights get no gradient (``finetune.execution: masked``)."""
        x = self.stem(x)
        # one device-to-host copy for the whole forward, not one per block
        unused = (~(policy > 0.5).any(0)).tolist() if skip_unused else [False] * len(self.blocks)
        for t, (block, shortcut) in enumerate(zip(self.blocks, self.shortcuts, strict=True)):
            residual = shortcut(x)
            if unused[t]:
                x = residual
                continue
            a = policy[:, t].to(x.dtype).view(-1, 1, 1, 1)
            x = F.relu(residual + block(x)) * a + residual * (1 - a)
        return self.head(x)

    def forward_skipping(self, x: torch.Tensor, actions: Sequence[bool] | torch.Tensor) -> torch.Tensor:
        """Logits with real skipping: the blocks whose action is 0 are not computed at all.

        ``actions`` holds K booleans shared by the whole batch (BlockDrop's inference runs at batch size 1).
        """
        if len(actions) != self.num_blocks:
            raise ValueError(f"expected {self.num_blocks} actions, got {len(actions)}")
        keep = [bool(a) for a in actions]
        x = self.stem(x)
        for block, shortcut, on in zip(self.blocks, self.shortcuts, keep, strict=True):
            residual = shortcut(x)
            x = F.relu(residual + block(x)) if on else residual
        return self.head(x)


class CifarResNet(BlockResNet):
    """ResNet with ``blocks_per_stage`` basic blocks in each of three stages (16/32/64 channels)."""

    def __init__(self, blocks_per_stage: Sequence[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.blocks_per_stage = tuple(blocks_per_stage)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        blocks, shortcuts = [], []
        channels = 16
        for stage, n in enumerate(self.blocks_per_stage):
            width, stride = 16 * 2**stage, 1 if stage == 0 else 2
            for b in range(n):
                s = stride if b == 0 else 1
                blocks.append(BasicBlock(channels, width, s))
                shortcuts.append(Shortcut(channels, width, s) if (s > 1 or channels != width) else nn.Identity())
                channels = width
        self.blocks, self.shortcuts = nn.ModuleList(blocks), nn.ModuleList(shortcuts)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def depth(self) -> int:
        """6n+2: the stem, two convolutions per block, the classifier."""
        return 2 * sum(self.blocks_per_stage) + 2


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3) -> CifarResNet:
    """The CIFAR ResNet of ``depth`` = 6n + 2 layers (20, 32, 56, 110, ...): K = 3n blocks."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes, in_channels)


class PolicyResNet8(CifarResNet):
    """BlockDrop's CIFAR policy network: a ResNet-8 whose K outputs are logits of keep-probabilities, looking
    at the image average-pooled by ``pool`` (1: the whole image, as the authors; 2: a quarter of the FLOPs)."""

    def __init__(self, num_blocks: int, in_channels: int = 3, pool: int = 1) -> None:
        super().__init__((1, 1, 1), num_blocks, in_channels)
        self.pool = pool

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(F.avg_pool2d(x, self.pool) if self.pool > 1 else x, policy)


def policy_resnet8(num_blocks: int, in_channels: int = 3, pool: int = 1) -> PolicyResNet8:
    """The CIFAR policy network for ``num_blocks`` blocks (see :class:`PolicyResNet8`)."""
    return PolicyResNet8(num_blocks, in_channels, pool)
