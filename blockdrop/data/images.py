"""The images of a folder tree (``data.source: folder``): what they are, and (cifar-style) their pixels.

:func:`inspect_images` opens every file once with PIL, which reads only the header: its size, mode and format.
That settles the channels (1 if every image is greyscale, else 3, greyscale images then converted), refuses a
file that is not an image by name, and gives the sizes :func:`common_side` decides the one in-memory size from.
:func:`read_images` decodes a list of files into one uint8 ``(N, C, H, W)`` tensor for the in-memory (tensor)
kind of prepared data; the on-disk (folder) kind is decoded per batch by :mod:`blockdrop.data.folder`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blockdrop.data.folder import resize_crop
from blockdrop.data.prepared import Split
from blockdrop.data.sources import BadDataError
from blockdrop.data.tree import FolderListing

__all__ = ["GREY_MODES", "STREAMED_FORMATS", "ImageSurvey", "check_streamable", "common_side", "inspect_images",
           "read_image_splits", "read_images"]

# PIL modes holding one intensity per pixel (with or without alpha): a tree of only these is 1-channel data.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# What torchvision.io.decode_image (and so the per-batch reader of imagenet-style data) decodes.
STREAMED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP"})


@dataclass(frozen=True)
class ImageSurvey:
    """What the headers of a tree's images say."""

    channels: int  # 1: every image greyscale; 3: otherwise
    sizes: list[tuple[int, int]]  # (height, width) of every image, train then test, in listing order
    formats: Counter  # PIL format name -> number of files

    @property
    def same_size(self) -> bool:
        return len(set(self.sizes)) == 1


def inspect_images(listing: FolderListing) -> ImageSurvey:
    """Open every image of ``listing`` (headers only); refuse one PIL cannot identify, naming the file."""
    from PIL import Image, UnidentifiedImageError

    root = Path(listing.root)
    sizes, formats, grey = [], Counter(), True
    for rel in [*listing.train[0], *listing.test[0]]:
        try:
            with Image.open(root / rel) as image:
                width, height = image.size
                mode, fmt = image.mode, image.format or "unknown"
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            why = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else f"unreadable ({e})"
            raise BadDataError(f"data.source: folder: {root / rel} is {why}; remove it (hidden files, named "
                               f".*, are skipped)") from None
        sizes.append((height, width))
        formats[fmt] += 1
        grey = grey and mode in GREY_MODES
    return ImageSurvey(1 if grey else 3, sizes, formats)


def check_streamable(survey: ImageSurvey, root: str | Path) -> None:
    """Refuse formats the per-batch reader of imagenet-style data cannot decode: it is torchvision's decoder,
    which knows fewer formats than PIL (BMP, TIFF, ... decode only in the cifar style)."""
    other = sorted(set(survey.formats) - STREAMED_FORMATS)
    if other:
        raise BadDataError(f"data.source: folder: {root} holds {survey.formats[other[0]]} {other[0]} image(s), "
                           f"which data.transforms: imagenet cannot decode (only {', '.join(sorted(STREAMED_FORMATS))}"
                           f"); convert them, or use data.transforms: cifar")


def common_side(survey: ImageSurvey) -> int:
    """The side every image is resized (shorter side) and centre-cropped to when their sizes differ: the
    smallest shorter side among them, so no image is enlarged. 0 when they all share one size (kept)."""
    return 0 if survey.same_size else min(min(hw) for hw in survey.sizes)


def read_images(root: str | Path, paths: list[str], channels: int, side: int = 0) -> torch.Tensor:
    """uint8 ``(N, channels, H, W)`` of the files ``paths`` under ``root``, decoded with PIL (greyscale
    images converted to RGB when ``channels`` is 3); with ``side``, each resized (shorter side, antialiased) and
    centre-cropped to ``side`` x ``side``, else all must share one size."""
    from PIL import Image

    mode, out = ("L" if channels == 1 else "RGB"), []
    for rel in paths:
        with Image.open(Path(root) / rel) as image:
            pixels = np.asarray(image.convert(mode))
        tensor = torch.from_numpy(pixels.copy())
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        out.append(resize_crop(tensor, side, side) if side else tensor)
    return torch.stack(out).contiguous() if out else torch.zeros((0, channels, side, side), dtype=torch.uint8)


def read_image_splits(root: str | Path, carved: dict[str, tuple[list[str], torch.Tensor]], channels: int,
                      side: int = 0) -> dict[str, Split]:
    """In-memory splits of the (paths, labels) ``carved`` out of a tree (:func:`~blockdrop.data.tree.
    carve_folder_splits`), each decoded by :func:`read_images`."""
    return {name: Split(read_images(root, paths, channels, side), labels) for name, (paths, labels) in carved.items()}
