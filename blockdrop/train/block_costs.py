"""What running each residual block costs: the per-block weights of the reward's usage term.

The paper's reward for a correct prediction is ``1 - u^2`` with ``u`` the fraction of the K blocks run, as if
every block cost the same (``cost: blocks``). On real hardware they do not: a CIFAR stage-first block does 3/4
of the FLOPs of its neighbours (its first convolution has half the input channels), and time per FLOP depends on
the map's size and channels (an early 16-channel block on a 28x28 map is not timed like a late 64-channel one on
7x7), on the batch and on the device. With per-block weights ``w_k`` summing to 1, ``u = sum_k w_k a_k``
charges each block its share of the cost:

* ``blocks``: ``w_k = 1/K``, the paper's reward. :class:`CostTable` then hands :func:`blockdrop.rl.reward` no
  weights at all, so it keeps computing ``blocks / K`` as it always did (a sum of 1/K weights rounds differently).
* ``flops``: each block's share of the blocks' FLOPs for one image of the data's shape (:mod:`blockdrop.flops`).
* ``latency``: each block's share of the blocks' times, each block timed alone on this machine at the stage's
  batch size (per process) and precision: the median over a few rounds, after warm-up rounds.

Only the residual branch counts, as in the FLOPs convention: the shortcut (and an ImageNet downsample) runs
whether the block does or not.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.nn.functional as F

from blockdrop.config import Cost
from blockdrop.dist import SINGLE, Dist, all_reduce_sum
from blockdrop.flops import count_flops
from blockdrop.models import BlockResNet
from blockdrop.runtime import autocast

__all__ = ["COSTS", "CostTable", "block_costs", "block_flops", "block_latency", "cost_table", "shares"]

log = logging.getLogger(__name__)
COSTS: tuple[str, ...] = get_args(Cost)  # blocks, flops, latency
WARMUP_ROUNDS = 3  # untimed passes first: allocator, kernel selection, caches
TIMED_ROUNDS = 10  # then this many timed passes; each block's time is its median


@dataclass
class CostTable:
    """A stage's per-block costs: the ``weights`` its reward uses and what they were derived from.

    ``flops``: FLOPs of each block for one image; ``latency_s``: each block's median time per batch of
    ``batch_size`` on ``device`` (``latency`` only). It is a part of a training loop's resume state when it was
    measured, so a resumed run keeps the table its first epochs trained with.
    """

    kind: str
    weights: torch.Tensor  # (K,) float64, sums to 1
    flops: tuple[int, ...] = ()
    latency_s: tuple[float, ...] = ()
    batch_size: int = 0
    device: str = ""
    precision: str = ""

    @property
    def reward_weights(self) -> torch.Tensor | None:
        """What :func:`blockdrop.rl.reward` takes: ``None`` for ``blocks`` (the paper's ``blocks / K``, bit for
        bit), else the weights."""
        return None if self.kind == "blocks" else self.weights

    @property
    def measured(self) -> bool:
        """True when the weights were measured here (``latency``): another run would give others."""
        return self.kind == "latency"

    def to_json(self) -> dict[str, Any]:
        """The table as written to ``reports/<stage>/block_costs.json`` and logged to the stage's run."""
        rows = []
        for k, w in enumerate(self.weights.tolist()):
            row: dict[str, Any] = {"block": k, "weight": w}
            if self.flops:
                row["flops"] = self.flops[k]
            if self.latency_s:
                row["latency_s"] = self.latency_s[k]
            rows.append(row)
        out: dict[str, Any] = {"cost": self.kind, "num_blocks": len(rows)}
        if self.measured:
            out.update(batch_size=self.batch_size, device=self.device, precision=self.precision,
                       warmup_rounds=WARMUP_ROUNDS, timed_rounds=TIMED_ROUNDS)
        return {**out, "blocks": rows}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "latency_s": torch.tensor(self.latency_s, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"].to(torch.float64)
        if weights.shape != self.weights.shape:
            raise ValueError(f"a cost table of {len(weights)} blocks, not {len(self.weights)}")
        self.weights, self.latency_s = weights, tuple(state["latency_s"].tolist())


def shares(costs: torch.Tensor) -> torch.Tensor:
    """``costs`` divided by their sum (float64): the weights, summing to 1."""
    costs = costs.to(torch.float64)
    total = costs.sum()
    if not (costs >= 0).all() or total <= 0:
        raise ValueError(f"block costs must be non-negative with a positive sum, got {costs.tolist()}")
    return costs / total


def block_flops(backbone: BlockResNet, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """FLOPs of each residual block for one image of ``image_shape`` (C, H, W): :func:`blockdrop.flops.count_flops`
    on a CPU copy, so the network, wherever it lives, keeps its mode and device."""
    return count_flops(copy.deepcopy(backbone).cpu(), tuple(image_shape)).blocks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def block_latency(backbone: BlockResNet, image_shape: tuple[int, ...], batch_size: int, precision: str = "fp32",
                  warmup: int = WARMUP_ROUNDS, repeats: int = TIMED_ROUNDS) -> torch.Tensor:
    """Median seconds of each residual block alone on a batch of ``batch_size`` images, on the backbone's device.

    A round is one pass through the network in eval mode (every block on, so each block sees its real input
    shape) that times each block's ``relu(shortcut + branch)`` between two device synchronisations. Timing every
    block in every round, rather than one block's repeats in a row, spreads a busy machine's slow spells over all
    blocks alike. The input is drawn from a private generator: the global random state is left as it was.
    """
    param = next(backbone.parameters())
    device = param.device
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch_size, *image_shape, generator=g).to(device, memory_format=torch.channels_last)
    was_training = backbone.training
    backbone.eval()
    times: list[list[float]] = [[] for _ in range(backbone.num_blocks)]
    try:
        for round_ in range(warmup + repeats):
            with autocast(precision, device):
                x = backbone.stem(x0)
                for t, (block, shortcut) in enumerate(zip(backbone.blocks, backbone.shortcuts, strict=True)):
                    residual = shortcut(x)
                    _sync(device)
                    start = time.perf_counter()
                    x = F.relu(residual + block(x))
                    _sync(device)
                    if round_ >= warmup:
                        times[t].append(time.perf_counter() - start)
    finally:
        backbone.train(was_training)
    return torch.tensor([statistics.median(ts) for ts in times], dtype=torch.float64)


def cost_table(kind: str, backbone: BlockResNet, image_shape: tuple[int, ...], *, batch_size: int = 1,
               precision: str = "fp32", dist: Dist = SINGLE) -> CostTable:
    """The cost table of ``kind`` (``blocks``, ``flops`` or ``latency``) for ``backbone`` on images of
    ``image_shape`` (C, H, W). ``batch_size`` and ``precision``: what ``latency`` times (the stage's batch per
    process). With several processes (``dist``) every rank times its blocks and all take the mean, so each
    rank's reward uses the same weights."""
    if kind not in COSTS:
        raise ValueError(f"unknown block cost {kind!r}: one of {', '.join(COSTS)}")
    flops = block_flops(backbone, image_shape)
    if kind == "blocks":
        k = backbone.num_blocks
        return CostTable(kind, torch.full((k,), 1 / k, dtype=torch.float64), flops)
    if kind == "flops":
        return CostTable(kind, shares(torch.tensor(flops, dtype=torch.float64)), flops)
    seconds = block_latency(backbone, image_shape, batch_size, precision)
    if dist.enabled:
        summed = all_reduce_sum(dist, {str(t): s for t, s in enumerate(seconds.tolist())})
        seconds = torch.tensor([summed[str(t)] / dist.world for t in range(len(seconds))], dtype=torch.float64)
    device = str(next(backbone.parameters()).device)
    table = CostTable(kind, shares(seconds), flops, tuple(seconds.tolist()), batch_size, device, precision)
    log.info("block costs: latency at batch %d on %s (%s), weights %s", batch_size, device, precision,
             " ".join(f"{w:.3f}" for w in table.weights.tolist()))
    return table


def block_costs(kind: str, backbone: BlockResNet, image_shape: tuple[int, ...], **kwargs: Any) -> torch.Tensor:
    """The (K,) float64 weights of :func:`cost_table`, summing to 1."""
    return cost_table(kind, backbone, image_shape, **kwargs).weights
