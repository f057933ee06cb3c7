"""The ILSVRC2012 folders -> lists of (relative path, label) for our train / val / test splits.

The layout is torchvision's ImageFolder one: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``
(the official val images sorted into class folders, e.g. by the usual valprep.sh). Classes are the sorted
wnids of train, so with all 1000 present the indices are those of torchvision's ImageNet weights. Our ``val`` is
carved out of ILSVRC train; our ``test`` is the ILSVRC val folder (what the authors tested on).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blockdrop.data.prepared import carve_val
from blockdrop.data.sources import DataSourceError

__all__ = ["FolderListing", "carve_folder_splits", "scan_imagenet"]

LAYOUT = "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the val images sorted into their class folders)"


@dataclass(frozen=True)
class FolderListing:
    root: str
    classes: list[str]
    train: tuple[list[str], list[int]]  # paths relative to root, labels
    test: tuple[list[str], list[int]]
    raw_md5: dict[str, str] = field(default_factory=dict)  # "<folder>/ (listing)" -> md5, for meta.json


def _listing_md5(root: Path, paths: list[str]) -> str:
    # 140 GB of JPEGs cannot be hashed on every prepare: the digest covers what a changed, added, removed or
    # truncated file changes, its relative path and its size (one stat per file, seconds for ImageNet).
    h = hashlib.md5()
    for rel in paths:
        h.update(f"{rel}\t{os.stat(root / rel).st_size}\n".encode())
    return h.hexdigest()


def _scan(root: Path, folder: str, expected: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(classes of ``root/folder``, its image paths relative to ``root``, their labels); with ``expected``,
    refuse a folder whose classes differ."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset  # slow import: on use

    directory = root / folder
    try:
        classes, class_to_idx = find_classes(str(directory))
        if expected is not None and classes != expected:
            missing, extra = sorted(set(expected) - set(classes)), sorted(set(classes) - set(expected))
            raise DataSourceError(
                f"ImageNet: {directory} does not hold train's classes ({len(missing)} missing, e.g. {missing[:3]}; "
                f"{len(extra)} not in train, e.g. {extra[:3]}); expected {root}/{LAYOUT}"
            )
        samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # no class folders, or one holding no image
        raise DataSourceError(f"ImageNet: {e}. Expected {root}/{LAYOUT}") from None
    prefix = len(os.path.join(str(root), ""))  # make_dataset joins root/folder/wnid/file: strip root/
    return classes, [path[prefix:] for path, _ in samples], [label for _, label in samples]


def scan_imagenet(root: str | Path) -> FolderListing:
    """List ``root``'s train and val folders with torchvision's ImageFolder rules (``find_classes``,
    ``make_dataset``, ``IMG_EXTENSIONS``); refuse a val folder whose classes are not train's."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataSourceError(f"ImageNet is not in {root}/: put ILSVRC2012 there as {LAYOUT}")
    classes, train_paths, train_labels = _scan(root, "train")
    _, test_paths, test_labels = _scan(root, "val", expected=classes)  # same classes: same indices
    digests = {"train/ (listing)": _listing_md5(root, train_paths), "val/ (listing)": _listing_md5(root, test_paths)}
    return FolderListing(str(root), classes, (train_paths, train_labels), (test_paths, test_labels), digests)


def carve_folder_splits(listing: FolderListing, val_size: int, seed: int, train_limit: int = 0, test_limit: int = 0
                        ) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Our train / val / test as (paths, labels), carved as :func:`~blockdrop.data.split_train_val` does: the
    same permutation of train fixed by ``seed`` picks the same ``val_size`` images.

    Unlike the in-memory splits, every split keeps its shuffled order, and ``test_limit`` keeps a seeded random
    sample of the test images rather than the first ones: the folders list images class by class, so "the first
    n" would be a handful of classes (``head(n)`` in curriculum, a limit for a quick look).
    """
    paths, labels = listing.train
    train_idx, val_idx = carve_val(len(paths), val_size, seed, train_limit)
    test_paths, test_labels = listing.test
    test_idx = torch.randperm(len(test_paths), generator=torch.Generator().manual_seed(seed))
    if test_limit:
        test_idx = test_idx[:test_limit]
    label_tensor, test_tensor = torch.tensor(labels, dtype=torch.int64), torch.tensor(test_labels, dtype=torch.int64)
    return {
        "train": ([paths[i] for i in train_idx.tolist()], label_tensor[train_idx]),
        "val": ([paths[i] for i in val_idx.tolist()], label_tensor[val_idx]),
        "test": ([test_paths[i] for i in test_idx.tolist()], test_tensor[test_idx]),
    }
