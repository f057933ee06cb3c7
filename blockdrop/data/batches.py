"""Batches sliced from an in-memory split, augmented a whole batch at a time (as in cifar10-airbench).

A batch is an index slice of the uint8 tensor, cropped and flipped with tensor ops, then converted to
normalised floats on the device. Nothing here loops over images in Python. A folder split (ImageNet) is
streamed instead by :func:`blockdrop.data.folder.folder_batches`, behind the same call.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from blockdrop.data.folder import FolderSplit, folder_batches
from blockdrop.data.prepared import Split
from blockdrop.dist import SINGLE, Dist

__all__ = ["Normalize", "batches", "random_crop", "random_flip"]


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                size: int = 0) -> torch.Tensor:
    """Pad a (B, C, H, W) batch with zeros by ``padding`` and cut a random ``size`` x ``size`` window per
    image (``size`` 0: the input's own H x W)."""
    b, _, h, w = images.shape
    out_h, out_w = (size, size) if size else (h, w)
    if padding == 0 and (out_h, out_w) == (h, w):
        return images
    padded = torch.nn.functional.pad(images, (padding,) * 4) if padding else images
    dy = torch.randint(0, h + 2 * padding - out_h + 1, (b,), generator=generator)
    dx = torch.randint(0, w + 2 * padding - out_w + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(out_h))[:, :, None].to(images.device)  # (B, H', 1)
    cols = (dx[:, None] + torch.arange(out_w))[:, None, :].to(images.device)  # (B, 1, W')
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indexing around the channel slice gives (B, H', W', C); permuting back yields NCHW
    # strides that are already channels_last.
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class Normalize:
    """uint8 batch -> float32 in (x/255 - mean) / std, in channels_last layout."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def batches(
    split: Split | FolderSplit,
    batch_size: int,
    normalize: Normalize,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = False,
    crop_padding: int = 0,
    crop_size: int = 0,
    flip: bool = False,
    limit: int | None = None,
    drop_last: bool = False,
    dist: Dist = SINGLE,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of at most ``limit`` images of ``split`` (already on its device).

    ``generator`` (a CPU generator) drives the shuffle and the augmentation, so a run is reproducible.
    A folder split crops its images itself (random for train, centred otherwise): padding and crop size are
    for the in-memory splits (params.yaml refuses them for ImageNet).

    ``dist`` with several ranks: ``batch_size`` is the global batch, each rank gets its own rows of it
    (:meth:`Dist.rows`) and the last incomplete batch is dropped. The order and the augmentation of the whole
    global batch are still drawn on every rank, so every rank's generator stays in step (:mod:`blockdrop.dist`).
    """
    drop_last = drop_last or dist.enabled
    if isinstance(split, FolderSplit):
        if crop_padding or crop_size:
            raise ValueError("crop_padding / crop_size apply to in-memory splits; a folder split crops to image_size")
        yield from folder_batches(split, batch_size, normalize, generator=generator, shuffle=shuffle, flip=flip,
                                  limit=limit, drop_last=drop_last, dist=dist)
        return
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if limit is not None:
        order = order[:limit]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size].to(split.images.device)
        images = split.images[idx]
        if crop_padding or crop_size:
            images = random_crop(images, crop_padding, generator, crop_size)
        if flip:
            images = random_flip(images, generator)
        yield normalize(dist.local(images)), split.labels[dist.local(idx)]
