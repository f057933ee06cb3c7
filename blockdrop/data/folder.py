"""Splits that stay on disk (ImageNet, imagenet-style folders): image files decoded, resized and cropped a batch
at a time.

ILSVRC2012 is 140 GB of JPEGs, so a prepared folder split holds only relative paths and labels; the pixels are
read per batch. Decoding, not the network, is the bottleneck there, so it runs in DataLoader worker processes
(``workers``); on CUDA the workers only read the bytes and nvJPEG decodes the whole batch on the GPU.

The transforms are the authors' (utils.get_transforms): the shorter side resized to ``resize`` (antialiased, as
PIL's Scale did), then a random ``size`` crop for the train split, a centred one for val and test, and a flip
when the caller asks. :func:`resize_crop` is that per-image transform, used by the workers and by the GPU path.

Reproducibility: the main process draws the order *and* every image's crop offsets and flip from the stage's
CPU generator, and sends them to the workers with the index, so a pass gives the same batches whatever the
number of workers (a worker never draws a random number).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from blockdrop.data.sources import DataSourceError
from blockdrop.dist import SINGLE, Dist

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "FolderImages", "FolderSplit", "decode_index", "decode_pixels", "decode_rgb",
    "decode_rgb_batch", "encode_index", "folder_batches", "imagenet_normalization", "resize_crop",
]

# The normalisation the authors (and torchvision's ImageNet weights) use; not measured on our subset.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def imagenet_normalization(channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) of imagenet-style data: ImageNet's constants for RGB; for greyscale data the mean of the
    three, the intensity an RGB-normalised network would see for a grey pixel on average."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [round(sum(IMAGENET_MEAN) / 3, 6)], [round(sum(IMAGENET_STD) / 3, 6)]

Crop = tuple[float, float] | None  # (top, left) as fractions in [0, 1) of the free range; None: the centre
Key = tuple[int, Crop, bool]  # what a worker is sent per image: index in the split, crop, flip


def resize_crop(image: torch.Tensor, resize: int, size: int, crop: Crop = None, flip: bool = False) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, size, size): shorter side resized to ``resize``, then the ``crop`` window
    (torchvision's CenterCrop offsets when None), mirrored when ``flip``. Runs on the image's device."""
    from torchvision.transforms.v2 import functional as F  # imported on first use: torchvision's import is slow

    image = F.resize(image, [resize], antialias=True)  # uint8 stays uint8 (float round trip on CUDA)
    h, w = image.shape[-2:]
    if crop is None:
        top, left = round((h - size) / 2.0), round((w - size) / 2.0)  # CenterCrop's offsets
    else:  # a uniform offset in [0, h - size], as RandomCrop draws it
        top, left = min(int(crop[0] * (h - size + 1)), h - size), min(int(crop[1] * (w - size + 1)), w - size)
    out = image[:, top : top + size, left : left + size]
    return (out.flip(-1) if flip else out).contiguous()


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """Encoded bytes (1-D uint8) -> uint8 (3, H, W) on the CPU. Forced to RGB: ImageNet holds a few
    greyscale and CMYK JPEGs (and one PNG named .JPEG: the format is sniffed from the bytes)."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(data, mode=ImageReadMode.RGB)


def decode_pixels(data: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Encoded bytes -> uint8 (``channels``, H, W) on the CPU: RGB as :func:`decode_rgb`, or greyscale (a
    folder of greyscale images, whose network takes one channel)."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_rgb(data) if channels == 3 else decode_image(data, mode=ImageReadMode.GRAY)


def decode_rgb_batch(datas: list[torch.Tensor], device: torch.device | str, channels: int = 3) -> list[torch.Tensor]:
    """Decode a batch of JPEGs on ``device`` in one call (nvJPEG's batched decoder on CUDA); a batch the
    decoder rejects is decoded file by file, and a file it rejects on the CPU (a PNG named .JPEG, ...).
    ``channels`` 1 decodes greyscale."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        return list(decode_jpeg(datas, mode=mode, device=device))
    except RuntimeError:  # one bad file fails the whole batch: find it
        pass
    out = []
    for data in datas:
        try:
            out.append(decode_jpeg(data, mode=mode, device=device))
        except RuntimeError:
            out.append(decode_pixels(data, channels).to(device))
    return out


def encode_index(paths: list[str], labels: torch.Tensor) -> bytes:
    """A split's index file: the paths as one newline-joined UTF-8 tensor (compact, and loadable with
    ``weights_only``) and the int64 labels."""
    joined = torch.frombuffer(bytearray("\n".join(paths).encode()), dtype=torch.uint8) if paths else \
        torch.zeros(0, dtype=torch.uint8)
    buf = io.BytesIO()
    torch.save({"paths": joined, "labels": labels.to(torch.int64).contiguous()}, buf)
    return buf.getvalue()


def decode_index(data: bytes) -> tuple[np.ndarray, torch.Tensor]:
    """(paths as a numpy bytes array, labels) of an index file. A numpy array, not a list of str: DataLoader
    workers would touch (and so copy) every one of a million Python objects' reference counts."""
    blob = torch.load(io.BytesIO(data), weights_only=True)
    labels = blob["labels"]
    raw = blob["paths"].numpy().tobytes()
    paths = np.array(raw.split(b"\n")) if len(labels) else np.zeros(0, dtype="S1")
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} paths for {len(labels)} labels")
    return paths, labels


@dataclass(frozen=True, eq=False)
class FolderSplit:
    """A split of image files under ``root``: the interface of :class:`~blockdrop.data.prepared.Split`
    (``labels``, ``images``, ``len``, ``head``, ``to``), with the pixels read when a batch asks for them."""

    root: str
    paths: np.ndarray  # bytes, relative to root
    labels: torch.Tensor  # int64 (N,), on the split's device
    resize: int
    size: int
    random_crop: bool = False  # the train split: random crops (val, test: centred)
    workers: int = 0  # DataLoader processes (0: decode in this process)
    device_decode: bool | None = None  # decode in the main process on the device (None: when it is CUDA)
    channels: int = 3  # 3: decoded as RGB (ImageNet); 1: as greyscale (a folder of greyscale images)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def decodes_on_device(self) -> bool:
        return self.device.type == "cuda" if self.device_decode is None else self.device_decode

    @property
    def images(self) -> FolderImages:
        return FolderImages(self)

    def to(self, device: torch.device | str) -> FolderSplit:
        return dataclasses.replace(self, labels=self.labels.to(device))

    def head(self, n: int) -> FolderSplit:
        """The first ``n`` images (all of them when ``n`` is 0): a random sample, as prepare shuffles them."""
        return dataclasses.replace(self, paths=self.paths[:n], labels=self.labels[:n]) if n else self

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def read(self, i: int) -> torch.Tensor:
        """The encoded bytes of image ``i`` (1-D uint8)."""
        with open(self.path(i), "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)

    def decode_on_device(self, datas: list[torch.Tensor], keys: list[Key]) -> torch.Tensor:
        """The GPU path: a batch of encoded files -> uint8 (B, C, size, size) on the split's device."""
        images = decode_rgb_batch(datas, self.device, self.channels)
        return torch.stack([resize_crop(img, self.resize, self.size, crop, flip)
                            for img, (_, crop, flip) in zip(images, keys, strict=True)])


@dataclass(frozen=True)
class _Reader(torch.utils.data.Dataset):
    """What a worker runs per image: read the file, and (CPU path) decode, resize and crop it."""

    split: FolderSplit
    decode: bool

    def __getitem__(self, key: Key) -> torch.Tensor:
        i, crop, flip = key
        data = self.split.read(i)
        if not self.decode:
            return data
        try:
            image = decode_pixels(data, self.split.channels)
        except RuntimeError as e:
            raise DataSourceError(f"{self.split.path(i)} is not a readable image ({e})") from None
        return resize_crop(image, self.split.resize, self.split.size, crop, flip)


def _collate(items: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
    """Decoded images: one stacked batch. Encoded files: one concatenated buffer and the lengths, so a batch
    crosses from the worker in one shared-memory tensor instead of one per file."""
    if items[0].dim() == 3:
        return torch.stack(items)
    return torch.cat(items), [len(x) for x in items]


def _pass(split: FolderSplit, plan: list[list[Key]]) -> Iterator[torch.Tensor]:
    """uint8 (B, C, size, size) on the split's device for each batch of keys in ``plan``, in order."""
    on_device = split.decodes_on_device
    loader = torch.utils.data.DataLoader(
        _Reader(split.to("cpu"), decode=not on_device),  # workers get no CUDA tensor (the labels stay here)
        batch_sampler=plan, num_workers=split.workers, collate_fn=_collate,
        pin_memory=split.device.type == "cuda",
        generator=torch.Generator(),  # its worker seeds (unused) must not consume the global RNG
    )
    # A loader per pass (no persistent workers): passes over one split never share state, and starting the
    # workers (forked) costs a fraction of a second against minutes of decoding per ImageNet pass.
    try:
        for keys, item in zip(plan, loader, strict=True):
            if on_device:
                buffer, lengths = item
                yield split.decode_on_device(list(buffer.split(lengths)), keys)
            else:
                yield item.to(split.device, non_blocking=True)
    except (DataSourceError, FileNotFoundError) as e:
        # From a worker, the message is the worker's whole traceback; the stage reports one line: the last
        # ("<module>.<Error>: <message>"), without its prefix.
        raise type(e)(str(e).strip().splitlines()[-1].split(f"{type(e).__name__}: ", 1)[-1]) from None


def folder_batches(
    split: FolderSplit,
    batch_size: int,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = False,
    flip: bool = False,
    limit: int | None = None,
    drop_last: bool = False,
    dist: Dist = SINGLE,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`blockdrop.data.batches` for a folder split: ``(x, y)`` batches on the split's device.

    The order, then every image's crop (train split) and flip are drawn here from ``generator``, in that order,
    for the whole epoch; with several ranks (``dist``) each decodes only its rows of every global batch.
    """
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if limit is not None:
        order = order[:limit]
    m = len(order)
    crops = torch.rand(m, 2, generator=generator).tolist() if split.random_crop else [None] * m
    flips = (torch.rand(m, generator=generator) < 0.5).tolist() if flip else [False] * m
    keys = [(i, None if c is None else (c[0], c[1]), f) for i, c, f in zip(order.tolist(), crops, flips, strict=True)]
    stop = m - (m % batch_size if drop_last else 0)
    plan = [dist.local(keys[start : min(start + batch_size, stop)]) for start in range(0, stop, batch_size)]
    for batch_keys, images in zip(plan, _pass(split, plan), strict=True):
        idx = torch.tensor([k[0] for k in batch_keys], device=split.labels.device)
        yield normalize(images), split.labels[idx]


class FolderImages:
    """The lazy ``images`` of a folder split: ``shape``, ``device``, ``len`` and indexing (an int, a slice, an
    index tensor or array) return uint8 centre crops on the split's device, decoded on demand."""

    dtype = torch.uint8

    def __init__(self, split: FolderSplit) -> None:
        self.split = split

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.split), self.split.channels, self.split.size, self.split.size))

    @property
    def device(self) -> torch.device:
        return self.split.device

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int | slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(index, np.ndarray):
            index = torch.tensor(index)
        elif isinstance(index, torch.Tensor):
            index = index.cpu()
        positions = torch.arange(len(self.split))[index]  # torch's own rules: negatives, slices, masks
        keys: list[Key] = [(i, None, False) for i in positions.reshape(-1).tolist()]
        if not keys:
            return torch.zeros((0, self.split.channels, self.split.size, self.split.size), dtype=torch.uint8,
                               device=self.device)
        batch = next(_pass(dataclasses.replace(self.split, workers=0), [keys]))
        return batch[0] if positions.dim() == 0 else batch

    def numpy(self) -> NumpyImages:
        """A numpy-indexable view for the analysis figures (not an array: ImageNet's 50k test images would
        take 7.5 GB); an index returns ``numpy`` uint8 images."""
        return NumpyImages(self)


@dataclass(frozen=True)
class NumpyImages:
    """Indexing returns numpy arrays: what :func:`blockdrop.analysis.run_analysis` reads images with."""

    images: FolderImages
    dtype: np.dtype = field(default=np.dtype(np.uint8))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        return self.images[index].cpu().numpy()
