"""A tree of class folders -> lists of (relative path, label) for our train / val / test splits.

The layout is torchvision's ImageFolder one, twice: ``<root>/<train>/<class>/*`` and ``<root>/<test>/<class>/*``.
Classes are the sorted folder names of train, and the test folder must hold the same ones (same names: same
indices). Our ``val`` is carved out of train with the seed (:func:`carve_folder_splits`).

Two sources use it:

- ``imagenet`` (:func:`scan_imagenet`): ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, the official val
  images sorted into class folders (e.g. by the usual valprep.sh); our ``test`` is the ILSVRC val folder (what
  the authors tested on). With all 1000 classes present the indices are those of torchvision's ImageNet weights.
  Files are picked by torchvision's ``IMG_EXTENSIONS``, as ImageFolder does.
- ``folder`` (:func:`scan_folder`): any ``train/<class>/*`` and ``test/<class>/*`` tree. Every file but hidden
  ones (``.DS_Store``, anything under a folder whose name starts with a dot) must be an image: a stray file is
  refused by name rather than silently left out (:mod:`blockdrop.data.images` opens each one).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blockdrop.data.prepared import carve_val
from blockdrop.data.sources import BadDataError, DataSourceError

__all__ = ["FolderListing", "TreeRules", "carve_folder_splits", "scan_folder", "scan_imagenet", "scan_tree"]


@dataclass(frozen=True)
class FolderListing:
    root: str
    classes: list[str]
    train: tuple[list[str], list[int]]  # paths relative to root, labels
    test: tuple[list[str], list[int]]
    raw_md5: dict[str, str] = field(default_factory=dict)  # "<folder>/ (listing)" -> md5, for meta.json


@dataclass(frozen=True)
class TreeRules:
    """How one source's tree is read: its name in messages, its test folder, and which files are images."""

    name: str  # in messages: "ImageNet", "data.source: folder"
    test_folder: str  # "val" (ILSVRC) or "test"
    layout: str  # the expected layout, in messages
    every_file: bool  # True: every non-hidden file is an image (checked later); False: torchvision's extensions


IMAGENET = TreeRules("ImageNet", "val", "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the val images sorted into "
                     "their class folders)", every_file=False)
FOLDER = TreeRules("data.source: folder", "test", "train/<class>/* and test/<class>/* (one folder per class, the "
                   "same classes in both)", every_file=True)


def hidden(rel: str) -> bool:
    """A file or folder whose name starts with a dot (``.DS_Store``, ``.ipynb_checkpoints/``): never data."""
    return any(part.startswith(".") for part in Path(rel).parts)


def _listing_md5(root: Path, paths: list[str]) -> str:
    # 140 GB of JPEGs cannot be hashed on every prepare: the digest covers what a changed, added, removed or
    # truncated file changes, its relative path and its size (one stat per file, seconds for ImageNet).
    h = hashlib.md5()
    for rel in paths:
        h.update(f"{rel}\t{os.stat(root / rel).st_size}\n".encode())
    return h.hexdigest()


def _classes(directory: Path, rules: TreeRules) -> tuple[list[str], dict[str, int]]:
    from torchvision.datasets.folder import find_classes  # slow import: on use

    if not rules.every_file:
        return find_classes(str(directory))  # ImageFolder's own rule, so ImageNet's indices are torchvision's
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not hidden(entry.name))
    if not classes:
        raise BadDataError(f"{rules.name}: {directory} holds no class folder; expected {rules.layout}")
    return classes, {name: i for i, name in enumerate(classes)}


def _scan(root: Path, folder: str, rules: TreeRules, expected: list[str] | None = None
          ) -> tuple[list[str], list[str], list[int]]:
    """(classes of ``root/folder``, its image paths relative to ``root``, their labels); with ``expected``,
    refuse a folder whose classes differ."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # slow import: on use

    directory = root / folder
    try:
        classes, class_to_idx = _classes(directory, rules)
        if expected is not None and classes != expected:
            missing, extra = sorted(set(expected) - set(classes)), sorted(set(classes) - set(expected))
            raise BadDataError(
                f"{rules.name}: {directory} does not hold train's classes ({len(missing)} missing, e.g. "
                f"{missing[:3]}; {len(extra)} not in train, e.g. {extra[:3]}); expected {root}/{rules.layout}"
            )
        if rules.every_file:  # a class folder without a file is refused below, by name
            samples = make_dataset(str(directory), class_to_idx,
                                   is_valid_file=lambda p: not hidden(os.path.relpath(p, directory)),
                                   allow_empty=True)
        else:
            samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # no class folders, or one holding no image
        raise BadDataError(f"{rules.name}: {e}. Expected {root}/{rules.layout}") from None
    counts = torch.bincount(torch.tensor([label for _, label in samples], dtype=torch.int64), minlength=len(classes))
    empty = [classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
    if empty:
        raise BadDataError(f"{rules.name}: the class folder {directory / empty[0]} holds no image"
                           + (f" (nor do {len(empty) - 1} other class folders of {directory})" if len(empty) > 1
                              else ""))
    prefix = len(os.path.join(str(root), ""))  # make_dataset joins root/folder/class/file: strip root/
    return classes, [path[prefix:] for path, _ in samples], [label for _, label in samples]


def scan_tree(root: str | Path, rules: TreeRules) -> FolderListing:
    """List ``root``'s train folder and ``rules.test_folder`` with torchvision's ``find_classes`` and
    ``make_dataset``; refuse a tree without either folder, an empty class folder, or test classes that are not
    train's (:class:`BadDataError`: the data must be fixed). A ``root`` that does not exist is
    :class:`DataSourceError` (the data is not there yet: ``dvc pull``, or put it there)."""
    root, test = Path(root), rules.test_folder
    if not root.is_dir():
        raise DataSourceError(f"{rules.name}: {root}/ does not exist: put the images there as {rules.layout}")
    for folder in ("train", test):
        if not (root / folder).is_dir():
            raise BadDataError(f"{rules.name}: {root / folder}/ is missing; expected {root}/{rules.layout}")
    classes, train_paths, train_labels = _scan(root, "train", rules)
    _, test_paths, test_labels = _scan(root, test, rules, expected=classes)  # same classes: same indices
    digests = {"train/ (listing)": _listing_md5(root, train_paths),
               f"{test}/ (listing)": _listing_md5(root, test_paths)}
    return FolderListing(str(root), classes, (train_paths, train_labels), (test_paths, test_labels), digests)


def scan_imagenet(root: str | Path) -> FolderListing:
    """ILSVRC2012 in ``root``: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, by ImageFolder's rules."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataSourceError(f"ImageNet is not in {root}/: put ILSVRC2012 there as {IMAGENET.layout}")
    return scan_tree(root, IMAGENET)


def scan_folder(root: str | Path) -> FolderListing:
    """A tree of your own in ``root``: ``train/<class>/*`` and ``test/<class>/*``, every non-hidden file listed
    (whether each is an image is :func:`blockdrop.data.images.inspect_images`'s to say)."""
    return scan_tree(root, FOLDER)


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
