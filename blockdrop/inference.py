"""Real skipping at inference time, and an honest measurement of what it saves.

The masked forward used in training runs every block; only conditional execution saves time. Here a
single image goes through the policy network once, then through the backbone with the dropped blocks
never called. BatchNorm is folded into the convolutions for both networks (and for the full backbone
it is compared with), so the timing compares the same kind of code on both sides.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from blockdrop.models import BlockResNet, PolicyNet

M = TypeVar("M", bound=nn.Module)

__all__ = ["FullPredictor", "SkippingPredictor", "fold_batchnorm", "measure_latency"]


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


class FullPredictor:
    """The full backbone, BatchNorm folded: the baseline of the speedup."""

    def __init__(self, backbone: BlockResNet) -> None:
        self.backbone = fold_batchnorm(backbone)

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)


class SkippingPredictor:
    """BlockDrop at batch size 1: policy network, then the backbone with dropped blocks not computed."""

    def __init__(self, backbone: BlockResNet, policy_net: PolicyNet) -> None:
        self.backbone, self.policy_net = fold_batchnorm(backbone), fold_batchnorm(policy_net)

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        # p >= 0.5  <=>  logit >= 0: no sigmoid needed; one .tolist() is the only sync with the device.
        actions = (self.policy_net(image)[0] >= 0).tolist()
        return self.backbone.forward_skipping(image, actions), actions


def measure_latency(
    full: Callable[[torch.Tensor], object],
    blockdrop: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    warmup: int,
    threads: int = 0,
) -> dict[str, float]:
    """Median per-image latency of both predictors on the same images, alternating which goes first.

    The first ``warmup`` images are run but not timed (allocator, caches, lazy initialisation).
    ``threads`` > 0 times a CPU run on that many threads (restored afterwards). At batch size 1 these
    small convolutions barely use a second core (about 3% faster on two), so one thread per request is
    how a CPU server would run them; the thread count is part of the result.
    """
    previous = torch.get_num_threads()
    used = 0 if images.is_cuda else threads or previous  # 0: timed on the GPU
    torch.set_num_threads(used or previous)
    try:
        times = _time_alternating(full, blockdrop, images, warmup)
    finally:
        torch.set_num_threads(previous)
    full_ms, bd_ms = (1e3 * statistics.median(times[k]) for k in ("full", "blockdrop"))
    return {"full_ms": full_ms, "blockdrop_ms": bd_ms, "speedup": full_ms / bd_ms, "images": len(times["full"]),
            "threads": used}


def _time_alternating(
    full: Callable[[torch.Tensor], object],
    blockdrop: Callable[[torch.Tensor], object],
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

    times: dict[str, list[float]] = {"full": [], "blockdrop": []}
    for i in range(len(images)):
        x = images[i : i + 1]
        order = [("full", full), ("blockdrop", blockdrop)]
        for name, fn in order if i % 2 else order[::-1]:
            t = timed(fn, x)
            if i >= warmup:
                times[name].append(t)
    return times
