"""The prepared dataset on disk: one file per split plus ``meta.json``.

``prepare`` writes it once. For the in-memory kind (Fashion-MNIST, CIFAR, cifar-style folders) each file is a
uint8 tensor; every later stage loads whole splits into memory (Fashion-MNIST's 60k images are 47 MB as uint8) and
slices batches out of them, so no stage runs per-image Python code. For the folder kind (ImageNet, imagenet-style
folders) each file is an index of image paths and labels, and :class:`~blockdrop.data.folder.FolderSplit` reads
the images per batch. Every load checks the file against the sha256 ``meta.json`` records (one pass of hashlib
over the bytes already read), so a corrupted or swapped file is refused by name instead of being trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from blockdrop.config import dataset_name
from blockdrop.data.folder import FolderSplit, decode_index, encode_index, imagenet_normalization
from blockdrop.data.sources import DataSourceError, RawData
from blockdrop.files import atomic_write_bytes, fsync_dir, write_json

__all__ = [
    "SPLITS", "ClassedData", "DataIntegrityError", "Meta", "Split", "carve_val", "check_labels", "load_meta",
    "load_split", "split_train_val", "write_folder_prepared", "write_prepared",
]

SPLITS = ("train", "val", "test")


class ClassedData(Protocol):
    """What the prepared files record of their raw data: a :class:`RawData`, or a folder's listing."""

    classes: list[str]
    raw_md5: dict[str, str]


class DataIntegrityError(DataSourceError):
    """A prepared file is unreadable or not the one ``meta.json`` describes (a stage exits 1 with one line)."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def head(self, n: int) -> Split:
        """The first ``n`` images (all of them when ``n`` is 0): a random sample, as splits are shuffled."""
        return Split(self.images[:n], self.labels[:n]) if n else self


@dataclass(frozen=True)
class Meta:
    source: str
    classes: list[str]
    shape: list[int]  # C, H, W
    mean: list[float]  # per channel, on the [0, 1] scale, from the train split
    std: list[float]
    sizes: dict[str, int]
    sha256: dict[str, str]  # file name -> digest
    raw_md5: dict[str, str] = field(default_factory=dict)  # raw file -> md5 (absent from older meta.json files)
    # "tensor": <split>.pt holds the images; "folder": an index of image files under `root` (a path as given in
    # params, relative to the repository root), resized to `resize` and cropped to `image_size` when read.
    # Older meta.json files have none of these fields: the tensor kind. A folder source of the tensor kind
    # records the folder its images were read from in `root` too: its name is the dataset's (`dataset`).
    kind: str = "tensor"
    root: str = ""
    resize: int = 0
    image_size: int = 0

    @property
    def dataset(self) -> str:
        """The dataset's name: the source, or a folder source's folder name (``data/raw/flowers``: flowers)."""
        return dataset_name(self.source, self.root)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def data_sha256(self) -> str:
        """One digest for the whole prepared dataset (the MLflow tag ``data_sha256``)."""
        joined = "".join(f"{k}:{v};" for k, v in sorted(self.sha256.items()))
        return hashlib.sha256(joined.encode()).hexdigest()


def carve_val(n: int, val_size: int, seed: int, train_limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into a training set of ``n`` images: ``val_size`` of them carved out with a
    permutation fixed by ``seed``, and at most ``train_limit`` of the rest kept (0 keeps all), in that order."""
    if val_size >= n:
        raise ValueError(f"data.val_size={val_size} leaves no training images (train has {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx, val_idx = perm[: n - val_size], perm[n - val_size :]
    return (train_idx[:train_limit] if train_limit else train_idx), val_idx


def split_train_val(raw: RawData, val_size: int, seed: int, train_limit: int = 0, test_limit: int = 0
                    ) -> dict[str, Split]:
    """Carve ``val_size`` images out of train with a permutation fixed by ``seed``; optionally keep only
    ``train_limit`` of the rest and the first ``test_limit`` test images (0 keeps all)."""
    train_idx, val_idx = carve_val(len(raw.train_labels), val_size, seed, train_limit)
    train_idx, val_idx = train_idx.sort().values, val_idx.sort().values
    test = slice(0, test_limit or None)
    return {
        "train": Split(raw.train_images[train_idx], raw.train_labels[train_idx]),
        "val": Split(raw.train_images[val_idx], raw.train_labels[val_idx]),
        "test": Split(raw.test_images[test], raw.test_labels[test]),
    }


def check_labels(splits: dict[str, Split], num_classes: int) -> None:
    """Refuse a split holding a label outside ``[0, num_classes)``: it would index past the classifier."""
    for name, split in splits.items():
        bad = (split.labels < 0) | (split.labels >= num_classes)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise DataSourceError(
                f"split {name}: {int(bad.sum())} label(s) outside [0, {num_classes}), the first "
                f"{int(split.labels[first])} at index {first}; the raw data does not match its class list"
            )


def write_prepared(splits: dict[str, Split], raw: RawData | ClassedData, source: str, out_dir: Path,
                   root: str = "") -> Meta:
    """Write ``<split>.pt`` for each split and ``meta.json``, each atomically and flushed; return the meta.
    ``raw`` gives the class names and raw digests; ``root``, a folder source's folder (:attr:`Meta.root`)."""
    check_labels(splits, len(raw.classes))
    out_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, split in splits.items():
        buf = io.BytesIO()  # serialised once: hashed and written from the same bytes
        torch.save({"images": split.images.contiguous(), "labels": split.labels.contiguous()}, buf)
        atomic_write_bytes(out_dir / f"{name}.pt", buf.getvalue())
        digests[f"{name}.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()
    pixels = splits["train"].images.double().div_(255)
    meta = Meta(
        source=source,
        classes=raw.classes,
        shape=list(splits["train"].images.shape[1:]),
        mean=[round(v, 6) for v in pixels.mean(dim=(0, 2, 3)).tolist()],
        std=[round(v, 6) for v in pixels.std(dim=(0, 2, 3)).tolist()],
        sizes={k: len(v) for k, v in splits.items()},
        sha256=digests,
        raw_md5=dict(raw.raw_md5),
        root=str(root),
    )
    write_json(out_dir / "meta.json", meta.__dict__)
    fsync_dir(out_dir)  # the caller renames this folder into place next
    return meta


def write_folder_prepared(splits: dict[str, tuple[list[str], torch.Tensor]], classes: list[str], source: str,
                          root: str, resize: int, image_size: int, raw_md5: dict[str, str], out_dir: Path,
                          channels: int = 3) -> Meta:
    """Write an index file ``<split>.pt`` (relative paths, int64 labels) per split and ``meta.json`` of the
    folder kind for images decoded with ``channels``; the mean and std are the ImageNet constants the authors
    normalise with (:func:`~blockdrop.data.folder.imagenet_normalization`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, (paths, labels) in splits.items():
        blob = encode_index(paths, labels)
        atomic_write_bytes(out_dir / f"{name}.pt", blob)
        digests[f"{name}.pt"] = hashlib.sha256(blob).hexdigest()
    mean, std = imagenet_normalization(channels)
    meta = Meta(source=source, classes=list(classes), shape=[channels, image_size, image_size], mean=mean,
                std=std, sizes={k: len(v[1]) for k, v in splits.items()}, sha256=digests,
                raw_md5=dict(raw_md5), kind="folder", root=str(root), resize=resize, image_size=image_size)
    write_json(out_dir / "meta.json", meta.__dict__)
    fsync_dir(out_dir)  # the caller renames this folder into place next
    return meta


def load_meta(data_dir: str | Path) -> Meta:
    """The prepared dataset's ``meta.json``; a missing or unreadable one is named in the error."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage (dvc repro prepare)")
    try:
        return Meta(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:  # bad JSON or UTF-8, missing or unknown fields
        raise DataIntegrityError(f"{path} is unreadable or corrupted ({type(e).__name__}); run prepare again") from None


def load_split(data_dir: str | Path, name: str, meta: Meta | None = None, *, workers: int = 0) -> Split | FolderSplit:
    """Load ``<name>.pt`` after checking its sha256 against ``meta`` (read from ``data_dir`` when not given).

    A folder dataset gives a :class:`FolderSplit` reading its images with ``workers`` DataLoader processes;
    the train split takes random crops, val and test centred ones (the authors' transform_train / _test).
    """
    data_dir = Path(data_dir)
    path = data_dir / f"{name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage (dvc repro prepare)")
    meta = meta or load_meta(data_dir)
    expected = meta.sha256.get(path.name)
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()  # one pass over bytes read anyway: ~0.1 s for the 47 MB train split
    if found != expected:
        raise DataIntegrityError(
            f"{path} is corrupted or not the file meta.json describes (sha256 {found[:16]}, expected "
            f"{(expected or 'none recorded')[:16]}); run prepare again (dvc repro -f prepare)"
        )
    if meta.kind == "folder" and not Path(meta.root).is_dir():
        raise FileNotFoundError(f"{meta.root} is missing (relative paths: to the repository root, where the stages "
                                f"run): the image folder {data_dir / 'meta.json'} was prepared from")
    try:
        if meta.kind == "folder":
            paths, labels = decode_index(data)
            return FolderSplit(meta.root, paths, labels, meta.resize, meta.image_size, random_crop=name == "train",
                               workers=workers, channels=meta.shape[0])
        blob = torch.load(io.BytesIO(data), weights_only=True)
        return Split(blob["images"], blob["labels"])
    except Exception as e:  # the recorded digest, yet unreadable: written by an incompatible torch, say
        raise DataIntegrityError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
