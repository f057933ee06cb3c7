"""Real skipping at inference time, and an honest measurement of what it saves.

The masked forward used in training runs every block; only conditional execution saves time. Here a
batch goes through the policy network once, then through the backbone with each block run once, on exactly
the images that keep it (at batch size 1: a dropped block is never called). BatchNorm is folded into the
convolutions for both networks, weights and activations are channels_last, and the full backbone it is
compared with runs the same block loop with every block on, so the timing compares the same kind of code.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from blockdrop.batch_plan import BatchPlan, plan_batch
from blockdrop.models import BasicBlock, BlockResNet, BottleneckBranch, PolicyNet, PolicyResNet8

M = TypeVar("M", bound=nn.Module)

__all__ = ["BatchedSkippingPredictor", "FastResNet", "FullPredictor", "SkippingPredictor", "fold_batchnorm",
           "measure_latency"]


def _conv_bn_pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, BN name) of every convolution followed by a BatchNorm inside ``module``.

    Two layouts hold every pair in these networks: an ``nn.Sequential`` with a BN right after a conv (the
    stems, torchvision's ``downsample``), and attributes ``convN`` / ``bnN`` where ``bnN`` normalises
    ``convN``'s output (our basic and bottleneck branches, torchvision's BasicBlock and ResNet stem).
    """
    pairs = []
    for parent in module.modules():
        if isinstance(parent, nn.Sequential):
            pairs += [(parent, a, b) for (a, conv), (b, bn) in itertools.pairwise(parent.named_children())
                      if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)]
        for n in range(1, 4):
            conv, bn = getattr(parent, f"conv{n}", None), getattr(parent, f"bn{n}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                pairs.append((parent, f"conv{n}", f"bn{n}"))
    return pairs


def fold_batchnorm(model: M) -> M:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the convolution before it.

    Works for both backbones and both policy networks; a BatchNorm left unfolded (a layout not listed in
    ``_conv_bn_pairs``) is an error, not a silent slowdown.
    """
    model = copy.deepcopy(model).eval()
    for parent, conv, bn in _conv_bn_pairs(model):
        setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
        setattr(parent, bn, nn.Identity())
    left = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise TypeError(f"fold_batchnorm: no convolution found before {', '.join(left)}")
    return model


def _prepared(model: M) -> M:
    """BatchNorm folded and weights channels_last: the layout ``Normalize`` gives the images, so no
    convolution converts its input (mixing layouts makes oneDNN reorder tensors at every layer)."""
    return fold_batchnorm(model).to(memory_format=torch.channels_last)


Branch = Callable[[torch.Tensor], torch.Tensor]

MIN_STRETCH = 16.0  # images per stretch, on average, for a block to run in place on them (bench/inference.py)


def _direct(block: nn.Module) -> Branch:
    """A folded residual branch as direct ``F.conv2d`` calls, or the module itself when its layout is unknown.

    Both branch types are convN (-> ReLU) chains once BatchNorm is folded. At batch size 1 a convolution takes
    30-70 us on a CPU core, and going through ``nn.Module.__call__`` for every conv, ReLU and leftover
    ``Identity`` costs about a fifth more (ResNet-32 on 28 px, one core: 2.2 ms against 1.8 ms direct); the
    policy network, a few small layers, pays that tax most, so both sides skip it.
    """
    if not isinstance(block, BasicBlock | BottleneckBranch):
        return block
    convs = [getattr(block, f"conv{n}") for n in (1, 2, 3) if hasattr(block, f"conv{n}")]
    assert all(isinstance(getattr(block, f"bn{n}"), nn.Identity) for n in range(1, len(convs) + 1)), "fold first"
    args = [(c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups) for c in convs]

    def run(x: torch.Tensor) -> torch.Tensor:
        for a in args[:-1]:
            x = F.conv2d(x, *a).relu_()
        return F.conv2d(x, *args[-1])

    return run


class FastResNet:
    """A ``BlockResNet`` made ready for inference: BatchNorm folded, channels_last, branches as direct
    convolution calls. ``fast(x, keep)`` runs block t only on the images where ``keep[:, t]`` holds.

    ``min_stretch``: in a batch, a block runs in place on each stretch of consecutive images (the batch
    sorted by policy, :mod:`blockdrop.batch_plan`) that keeps it when its stretches hold at least this
    many images on average, else once on its keepers gathered into one sub-batch and scattered back.
    """

    def __init__(self, net: BlockResNet, min_stretch: float = MIN_STRETCH) -> None:
        self.net = _prepared(net)
        self.branches = [_direct(b) for b in self.net.blocks]
        # None: an identity shortcut, the residual is x itself (no call)
        self.shortcuts = [None if isinstance(s, nn.Identity) else s for s in self.net.shortcuts]
        self.stem = [m for m in self.net.stem if not isinstance(m, nn.Identity)]
        self.min_stretch = min_stretch

    def __call__(self, x: torch.Tensor, keep: torch.Tensor | None = None, counts: list[int] | None = None
                 ) -> torch.Tensor:
        """Logits with block t run only on the images where the (B, K) bool ``keep[:, t]`` is true (None:
        every block on); ``counts`` (K ints, the images keeping each block) when the caller has them.

        A block kept by all B images runs on the whole batch, one kept by none is not called, otherwise it
        runs on its keepers only: in place on the stretches of the sorted batch, or gathered and scattered
        back by whole-tensor indexing; no Python work per image either way. Every image goes through the
        shortcut, so a dropped stage-first block still downsamples (pools and zero-pads on CIFAR, 1x1 conv
        on ImageNet), exactly as ``BlockResNet.forward(x, policy)`` does; the logits are that forward's, in
        the input's order.
        """
        n = len(x)
        if keep is None:
            return self.net.head(self._blocks(self._stem(x), [n] * len(self.branches), None))
        if n == 1:  # one image: every block is run on it or not at all, nothing to sort
            counts = counts if counts is not None else keep.sum(0).tolist()
            return self.net.head(self._blocks(self._stem(x), counts, None))
        plan = plan_batch(keep)
        if plan.order is not None:
            x = x[plan.order]  # the input images, sorted by policy: the one reordering of the batch
        logits = self.net.head(self._blocks(self._stem(x), plan.counts, plan))
        return logits if plan.restore is None else logits[plan.restore]

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.stem:
            x = m(x)
        return x

    def _blocks(self, x: torch.Tensor, counts: list[int], plan: BatchPlan | None) -> torch.Tensor:
        n = len(x)
        for t, (branch, shortcut, count) in enumerate(zip(self.branches, self.shortcuts, counts, strict=True)):
            residual = x if shortcut is None else shortcut(x)
            if count == n:
                # in place on the branch's fresh output: two fewer allocations than relu(a + b)
                x = branch(x).add_(residual).relu_()
            elif not count:
                x = residual
            elif plan is not None and count >= self.min_stretch * len(plan.runs[t]):
                # x and residual are this forward's own tensors (stem output onwards), so writing into a
                # stretch of them is safe; the branch reads its stretch before the write
                for a, b in plan.runs[t]:
                    residual[a:b].add_(branch(x[a:b])).relu_()
                x = residual
            else:
                assert plan is not None
                idx = plan.keep[:, t].nonzero().squeeze(1)
                # x[idx] keeps channels_last (index_select would not); with an identity shortcut it is also
                # the sub-batch's residual, so one gather serves both. index_copy_ then writes in place into
                # the residual, already every image's output where the block is dropped; it may be x itself,
                # which is safe: x[idx] is a copy, taken before the write
                sub = x[idx]
                out = branch(sub).add_(sub if shortcut is None else residual[idx]).relu_()
                x = residual.index_copy_(0, idx, out)
        return x


def _fast_policy(policy_net: PolicyNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """The policy network's logits through :class:`FastResNet` when it is a CIFAR ResNet-8 (a ``BlockResNet``
    itself, every block on), else as the folded channels_last module (ImageNet's torchvision ResNet-10)."""
    if not isinstance(policy_net, PolicyResNet8):
        return _prepared(policy_net)
    fast, pool = FastResNet(policy_net), policy_net.pool
    return lambda x: fast(F.avg_pool2d(x, pool) if pool > 1 else x)


class FullPredictor:
    """The full backbone, BatchNorm folded: the baseline of the speedup, through the same code as
    BlockDrop's predictors (:class:`FastResNet`) with every block on."""

    def __init__(self, backbone: BlockResNet) -> None:
        self.fast = FastResNet(backbone)
        self.backbone = self.fast.net

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.fast(image.contiguous(memory_format=torch.channels_last))


class SkippingPredictor:
    """BlockDrop at batch size 1: policy network, then the backbone with dropped blocks not computed."""

    def __init__(self, backbone: BlockResNet, policy_net: PolicyNet) -> None:
        self.fast, self.policy = FastResNet(backbone), _fast_policy(policy_net)
        self.backbone = self.fast.net

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        image = image.contiguous(memory_format=torch.channels_last)
        # p >= 0.5  <=>  logit >= 0: no sigmoid needed; one .tolist() is the only sync with the device.
        keep = self.policy(image) >= 0
        actions = keep[0].tolist()
        return self.fast(image, keep, [int(a) for a in actions]), actions


class BatchedSkippingPredictor:
    """BlockDrop at any batch size: the policy network once on the batch, greedy actions (p >= 0.5, read as
    logit >= 0), then each block once on the images that keep it (:class:`FastResNet`). Returns the logits
    and the (B, K) bool actions.

    Grouped by block rather than by policy: a batch of 256 test images holds dozens of distinct policies but
    only K blocks, so each convolution runs on the largest sub-batch possible and the Python work per batch
    is K iterations plus one per stretch of images, whatever the batch holds. The batch is sorted by policy
    first, so a block's keepers mostly lie in a few stretches it runs on in place (no copies).
    """

    def __init__(self, backbone: BlockResNet, policy_net: PolicyNet) -> None:
        if policy_net.fc.out_features != backbone.num_blocks:
            raise ValueError(f"policy decides {policy_net.fc.out_features} blocks, backbone has {backbone.num_blocks}")
        self.fast, self.policy = FastResNet(backbone), _fast_policy(policy_net)
        self.backbone = self.fast.net

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.contiguous(memory_format=torch.channels_last)
        keep = self.policy(images) >= 0
        return self.fast(images, keep), keep

    @torch.inference_mode()
    def policy_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The (B, K) logits of the folded policy network (block t is kept where its logit is >= 0)."""
        return self.policy(images.contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def backbone_under(self, images: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Logits of the folded backbone under given (B, K) 0/1 ``actions``, without the policy network."""
        return self.fast(images.contiguous(memory_format=torch.channels_last), actions > 0.5)


def measure_latency(
    full: Callable[[torch.Tensor], object],
    blockdrop: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    warmup: int,
    threads: int = 0,
    others: dict[str, Callable[[torch.Tensor], object]] | None = None,
) -> dict[str, float]:
    """Median per-image latency of both predictors on the same images, taking turns at going first.

    The first ``warmup`` images are run but not timed (allocator, caches, lazy initialisation).
    ``threads`` > 0 times a CPU run on that many threads (restored afterwards). At batch size 1 these
    small convolutions barely use a second core (about 3% faster on two), so one thread per request is
    how a CPU server would run them; the thread count is part of the result. ``others``: more predictors by
    name, timed in the same turns (each gets ``<name>_ms``); ``speedup`` stays full / BlockDrop.
    """
    previous = torch.get_num_threads()
    used = 0 if images.is_cuda else threads or previous  # 0: timed on the GPU
    torch.set_num_threads(used or previous)
    predictors = {"full": full, "blockdrop": blockdrop, **(others or {})}
    try:
        times = _time_in_turns(predictors, images, warmup)
    finally:
        torch.set_num_threads(previous)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"full_ms": ms["full"], "blockdrop_ms": ms["blockdrop"], "speedup": ms["full"] / ms["blockdrop"],
            "images": len(times["full"]), "threads": used, **{f"{name}_ms": ms[name] for name in others or {}}}


def _time_in_turns(
    predictors: dict[str, Callable[[torch.Tensor], object]],
    images: torch.Tensor,
    warmup: int,
) -> dict[str, list[float]]:
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)

    def timed(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in predictors}
    order = list(predictors.items())
    for i in range(len(images)):
        x = images[i : i + 1]
        turn = (i + 1) % len(order)  # each goes first equally often (two: BlockDrop first on even images)
        for name, fn in order[turn:] + order[:turn]:
            t = timed(fn, x)
            if i >= warmup:
                times[name].append(t)
    return times
