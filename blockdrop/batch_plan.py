"""How a batch with per-image block policies is laid out for skipping inference: the images sorted by policy,
and for each block the stretches of consecutive (sorted) images that keep it.

Sorting the batch by its policy, read as a binary number with block 0 as the most significant bit, makes the
images that keep block 0 one contiguous stretch, those that keep block 1 at most two, and in general block t's
keepers at most as many stretches as there are distinct policies, usually far fewer for the early blocks.
A stretch is a view of the activations (the batch is the outermost dimension in both memory formats), so a
block can run on it in place, without the gather and scatter copies that an arbitrary subset needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BatchPlan", "plan_batch"]

MAX_CODE_BITS = 62  # a policy fits an int64 sort key up to this many blocks


@dataclass(frozen=True)
class BatchPlan:
    """The sorted order of a batch and, per block, the (start, stop) stretches of sorted rows keeping it.

    ``order``: sorted row i is input row ``order[i]``, None when the batch is already in order;
    ``restore``: the inverse permutation (logits[restore] puts them back in input order), None likewise;
    ``counts[t]``: images keeping block t; ``runs[t]``: its stretches, ascending and disjoint;
    ``keep``: the (B, K) bool actions in sorted order.
    """

    order: torch.Tensor | None
    restore: torch.Tensor | None
    counts: list[int]
    runs: list[list[tuple[int, int]]]
    keep: torch.Tensor


def plan_batch(keep: torch.Tensor) -> BatchPlan:
    """The :class:`BatchPlan` of (B, K) bool actions ``keep``: a stable sort by policy (ties keep their
    input order), then the stretches of every block from one pass over the sorted actions."""
    n, k = keep.shape
    order = restore = None
    if n > 1 and k <= MAX_CODE_BITS:
        weights = 2 ** torch.arange(k - 1, -1, -1, device=keep.device, dtype=torch.int64)
        codes = (keep.long() * weights).sum(1)
        # descending: images keeping the early blocks come first (any fixed order would do)
        _, perm = torch.sort(codes, descending=True, stable=True)
        if not torch.equal(perm, torch.arange(n, device=keep.device)):
            order, restore = perm, torch.argsort(perm)
            keep = keep[perm]
    # +1 where a stretch starts, -1 one past where it ends, on the columns padded with a False row each side
    padded = torch.zeros(n + 2, k, dtype=torch.int8, device=keep.device)
    padded[1:-1] = keep.to(torch.int8)
    edges = padded.diff(dim=0).t().nonzero()  # (block, row) pairs, sorted by block then row
    runs: list[list[tuple[int, int]]] = [[] for _ in range(k)]
    flat = edges.tolist()  # the one device-to-host copy of the plan
    for (block, start), (_, stop) in zip(flat[::2], flat[1::2], strict=True):
        runs[block].append((start, stop))
    counts = [sum(b - a for a, b in r) for r in runs]
    return BatchPlan(order, restore, counts, runs, keep)
