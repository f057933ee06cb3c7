"""Data-parallel training under ``torchrun``: who this process is, which rows of a batch it takes, and the
``DistributedDataParallel`` wrapper of a training step. With one process every function here is the
identity, so a loop written against it runs unchanged (and bit for bit as before) without ``torchrun``.

How the ranks stay in step without exchanging anything but gradients:

- Every rank holds the same seeded CPU generator and draws from it exactly what one process would: the
  epoch's permutation and the random numbers of the *whole* global batch (crops, flips, sampled policies,
  stochastic depth). Each then keeps only its own rows, ``rows(n)``. So the generators never diverge, the
  saved state of rank 0 resumes every rank, and rank r sees exactly the images, augmentations and samples
  that rows ``r*n/W .. (r+1)*n/W`` of the one-process batch would have had.
- The batch size in params is the global batch; each rank takes ``batch_size / nproc`` of it. The last
  incomplete batch of an epoch is dropped, so every step has the same global batch on every rank.
- Gradients are averaged by ``DistributedDataParallel``. It only hooks ``forward``, and our steps call
  several networks and methods (``forward_masked``, the sparse forward, a policy then a backbone twice), so
  :func:`data_parallel` wraps a whole step: one module holding the trained networks, whose ``forward`` is the
  step. Blocks a step skips have no gradient on that rank: ``find_unused_parameters`` lets DDP count them.
- BatchNorm is per rank on CPU (torch's ``SyncBatchNorm`` runs on GPUs only); on GPUs :func:`sync_batchnorm`
  converts the networks whose every layer runs on every rank. A network that skips blocks per image cannot
  sync: a rank whose images all drop a block would not enter that block's collective, and the others would wait.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

__all__ = ["Dist", "all_reduce_sum", "data_parallel", "init", "launched", "resumed_alike", "shutdown",
           "sync_batchnorm"]

T = TypeVar("T")
N = TypeVar("N", int, float, torch.Tensor)
TIMEOUT = datetime.timedelta(minutes=30)  # a rank waits this long for the others (rank 0 validates alone)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes outputs, checkpoints, logs and MLflow runs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (a multiple of ``world``): the ``rank``-th of ``world``
        equal consecutive parts."""
        if n % self.world:
            raise ValueError(f"a global batch of {n} does not split into {self.world} equal parts")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def steps(self, images: int, batch_size: int) -> int:
        """Steps in an epoch of ``images``: several ranks drop the last incomplete global batch
        (:func:`blockdrop.data.batches`), one process keeps it."""
        return images // batch_size if self.enabled else math.ceil(images / batch_size)

    def local(self, batch: Sequence[T] | torch.Tensor) -> Any:
        """This rank's rows of ``batch`` (a tensor or a list over the global batch); ``batch`` itself for one
        process."""
        return batch[self.rows(len(batch))] if self.enabled else batch


SINGLE = Dist()


def launched() -> bool:
    """True inside a process started by ``torchrun`` (it sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group ``torchrun`` set up (NCCL on CUDA, gloo on CPU) and return this process's
    :class:`Dist` and device (``cuda:<local_rank>`` on GPUs). Without ``torchrun``: one process, ``device``."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE, device
    me = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", me.local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                      device_id=device if device.type == "cuda" else None)
    return me, device


def shutdown() -> None:
    """Leave the process group (once every rank is done), so the process exits without a warning."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(dist: Dist, values: dict[str, N]) -> dict[str, N]:
    """Each of ``values`` (numbers or 0-d tensors) summed over every rank, in one collective, and returned as
    the type it came in; ``values`` itself, untouched, for one process."""
    if not dist.enabled:
        return values
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    if torch_dist.get_backend() == "nccl":
        t = t.cuda()
    torch_dist.all_reduce(t)
    return {key: torch.tensor(total, dtype=v.dtype) if isinstance(v, torch.Tensor) else type(v)(total)
            for (key, v), total in zip(values.items(), t.tolist(), strict=True)}


def resumed_alike(dist: Dist, epoch: int, checkpoint: object) -> None:
    """Raise ``RuntimeError`` unless every rank resumes after the same ``epoch``: rank 0 writes the resume state
    and every rank reads it, so on several machines ``checkpoint`` must be on a filesystem they all see."""
    if not dist.enabled:
        return
    epochs: list[int] = [0] * dist.world
    torch_dist.all_gather_object(epochs, epoch)
    if len(set(epochs)) > 1:
        raise RuntimeError(f"ranks would resume after different epochs {epochs}: every rank reads {checkpoint}, "
                           "which must be on a filesystem all machines share")


class _Step(nn.Module):
    """One training step as a module, so ``DistributedDataParallel`` sees every trained network in it."""

    def __init__(self, networks: Sequence[nn.Module], step: Callable[..., Any]) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.step = step

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.step(*args, **kwargs)


def data_parallel(dist: Dist, step: Callable[..., T], networks: Sequence[nn.Module],
                  skips_blocks: bool) -> Callable[..., T]:
    """``step`` itself for one process; else ``step`` under ``DistributedDataParallel`` over the trainable
    parameters of ``networks`` (call it as ``step``; gradients are averaged over the ranks in ``backward``).

    ``skips_blocks``: the step may leave some parameters without a gradient (dropped blocks), so DDP looks
    for them in each step's graph. The wrapper broadcasts rank 0's weights and buffers when it is built, and
    rank 0's buffers (BatchNorm's running statistics) before each step, as DDP does.
    """
    if not dist.enabled:
        return step
    device = next(iter(networks[0].parameters())).device
    return nn.parallel.DistributedDataParallel(_Step(networks, step), device_ids=[device] if device.type == "cuda"
                                               else None, find_unused_parameters=skips_blocks)


def sync_batchnorm(dist: Dist, network: nn.Module, enabled: bool) -> nn.Module:
    """``network`` with its BatchNorm layers synchronised across ranks, when ``enabled``, the job has several
    ranks and runs on CUDA; else ``network`` unchanged. The state dict keeps its keys either way."""
    device = next(iter(network.parameters())).device
    if not (enabled and dist.enabled and device.type == "cuda"):
        return network
    return nn.SyncBatchNorm.convert_sync_batchnorm(network)
