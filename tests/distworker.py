"""A rank of a real gloo group for ``tests/test_dist.py``, in a module of its own: ``torch.multiprocessing.spawn``
imports the function's module in every child, and this one imports only torch and ``blockdrop.dist``."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

from blockdrop.dist import Dist, all_reduce_sum, resumed_alike


def in_group(rank: int, world: int, init: str, results) -> None:
    """One rank of a real gloo group (torch.multiprocessing.spawn): sums over ranks, and the resume check."""
    torch_dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    me = Dist(rank, world)
    sums = all_reduce_sum(me, {"seen": rank + 1, "loss": torch.tensor(0.5 * rank)})
    resumed_alike(me, 3, "checkpoints/x.pt")  # every rank after epoch 3: fine
    try:
        resumed_alike(me, rank, "checkpoints/x.pt")
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    results.put((rank, sums["seen"], type(sums["seen"]).__name__, float(sums["loss"]), refused))
    torch_dist.destroy_process_group()
