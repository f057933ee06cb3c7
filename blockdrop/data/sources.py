"""Raw datasets -> uint8 tensors, read from one folder: the source's DVC-tracked raw data (``data.raw``).

Every source returns the same thing, a :class:`RawData`: images as uint8 ``(N, C, H, W)`` tensors, int64 labels,
the class names, and the md5 of each raw file read (recorded in ``meta.json``). Nothing here reaches outside
``data.raw``: that folder is a DVC dependency of ``prepare``, so what the stage reads is what DVC versions.
Putting the files there (Debian's package, a download, ``dvc pull``) is :mod:`blockdrop.data.fetch`'s job.

Layouts under ``data.raw``:

- ``fashion-mnist``: the four idx files, uncompressed or ``.gz``; each is checked against
  :data:`FASHION_MNIST_MD5` (the md5 of the uncompressed bytes) unless ``data.verify_checksums`` is off.
- ``cifar10`` / ``cifar100``: torchvision's extracted folder (``cifar-10-batches-py/``) or the official archive
  (``cifar-10-python.tar.gz``); torchvision checks every file against the md5s it lists.
"""

from __future__ import annotations

import gzip
import hashlib
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_MD5", "BadDataError", "DataSourceError", "RawData", "load_source"]

# md5 of the four *uncompressed* idx files. Zalando publishes md5s of its .gz archives (torchvision's
# `FashionMNIST.resources`), but Debian's package re-compressed them (its .gz md5s differ), so the digest both
# decompress to is what is pinned here. Computed from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1
# (47040016, 60008, 7840016 and 10008 bytes; idx headers 60000 x 28 x 28 and 10000 x 28 x 28), and equal to the
# uncompressed md5s other loaders list beside the upstream archive md5s (they extract the md5-checked upstream
# .gz, then check these), so upstream's bytes and Debian's are the same.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]  # label order, as Zalando (and torchvision) list them

FETCH_HINT = "run `make data` (puts the default dataset there and tracks it with DVC) or `dvc pull`"


class DataSourceError(RuntimeError):
    """The dataset could not be found or verified; the message says what to do about it."""


class BadDataError(DataSourceError):
    """The data is there but breaks its layout's rules (an empty class folder, a file that is not an image, test
    classes that are not train's). Like an invalid setting, only the user can fix it, so a stage exits 2 (a
    flow does not retry it) rather than the 1 of data that is missing or fails a checksum, which ``dvc pull``
    or ``make data`` may put right."""


@dataclass(frozen=True)
class RawData:
    train_images: torch.Tensor  # uint8 (N, C, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    origin: str  # where it was read from, for the log and meta.json
    raw_md5: dict[str, str] = field(default_factory=dict)  # raw file name -> md5, for meta.json


def _nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(images, dtype=torch.uint8)
    return t.unsqueeze(1).contiguous() if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def parse_idx(data: bytes) -> np.ndarray:
    """An idx file's array (LeCun's format: zero bytes, a type code, the number of dimensions, each dimension as
    a big-endian int32, then the values). Fashion-MNIST's are all unsigned bytes (type 0x08)."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError("not an idx file of unsigned bytes")
    dims = np.frombuffer(data, dtype=">i4", count=data[3], offset=4).tolist()
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims))
    if values.size != int(np.prod(dims)):
        raise ValueError(f"{values.size} values for a {'x'.join(map(str, dims))} array (truncated?)")
    return values.reshape(dims).copy()  # writable, owning its memory: torch shares it without a warning


def _read_idx(folder: Path, name: str) -> bytes:
    """The uncompressed bytes of idx file ``name`` in ``folder``, stored as is or gzipped."""
    plain, packed = folder / name, folder / f"{name}.gz"
    try:
        if plain.exists():
            return plain.read_bytes()
        if packed.exists():
            with gzip.open(packed) as f:
                return f.read()
    except (OSError, EOFError, zlib.error) as e:  # a truncated or damaged archive
        raise DataSourceError(f"{packed} is unreadable ({type(e).__name__}: {e}); {FETCH_HINT}") from None
    raise DataSourceError(f"Fashion-MNIST is not in {folder}/ ({name} is missing): {FETCH_HINT}")


def _fashion_mnist(folder: Path, verify: bool) -> RawData:
    blobs = {name: _read_idx(folder, name) for name in FASHION_MNIST_MD5}
    digests = {name: hashlib.md5(blob).hexdigest() for name, blob in blobs.items()}
    for name, found in digests.items():  # checked before parsing, so a wrong file is named as such
        if verify and found != FASHION_MNIST_MD5[name]:
            raise DataSourceError(
                f"{folder / name} failed its checksum: expected md5 {FASHION_MNIST_MD5[name]}, found {found}; "
                f"{FETCH_HINT} (or set data.verify_checksums: false for data of your own)"
            )
    try:
        arrays = {name: parse_idx(blob) for name, blob in blobs.items()}
    except ValueError as e:
        raise DataSourceError(f"Fashion-MNIST in {folder}/ is damaged: {e}; {FETCH_HINT}") from None
    return RawData(
        _nchw(arrays["train-images-idx3-ubyte"]), torch.as_tensor(arrays["train-labels-idx1-ubyte"], dtype=torch.int64),
        _nchw(arrays["t10k-images-idx3-ubyte"]), torch.as_tensor(arrays["t10k-labels-idx1-ubyte"], dtype=torch.int64),
        list(FASHION_MNIST_CLASSES), origin=str(folder), raw_md5=digests,
    )


def _cifar(cls: type, folder: Path) -> RawData:
    from torchvision.datasets.utils import check_integrity, extract_archive

    extracted, archive = folder / cls.base_folder, folder / cls.filename
    with tempfile.TemporaryDirectory(prefix="blockdrop-cifar-") as tmp:
        root = folder
        if not extracted.is_dir() and archive.is_file():
            # Unpacked outside data.raw: the tracked folder must stay exactly what DVC recorded.
            if not check_integrity(str(archive), cls.tgz_md5):
                raise DataSourceError(f"{archive} failed its checksum (expected md5 {cls.tgz_md5}); {FETCH_HINT}")
            extract_archive(str(archive), tmp)
            root = Path(tmp)
        try:  # torchvision checks every batch file's md5 before unpickling it
            train, test = (cls(str(root), train=flag, download=False) for flag in (True, False))
        except Exception as e:
            raise DataSourceError(
                f"{cls.__name__} is not in {folder}/ or failed its checksum ({type(e).__name__}: {e}). Put "
                f"{archive.name} (md5 {cls.tgz_md5}) or the extracted {extracted.name}/ there; {FETCH_HINT}"
            ) from None
    # torchvision has just checked each of these files against the md5 it lists: record those.
    checked = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return RawData(
        _nchw(train.data), torch.as_tensor(train.targets, dtype=torch.int64),
        _nchw(test.data), torch.as_tensor(test.targets, dtype=torch.int64),
        list(train.classes), origin=str(folder), raw_md5={name: md5 for name, md5 in checked},
    )


def load_source(source: str, raw: str | Path, verify_checksums: bool = True) -> RawData:
    """Read ``source`` (``fashion-mnist``, ``cifar10``, ``cifar100``) from its raw folder ``raw``.

    ``verify_checksums`` refuses Fashion-MNIST idx files whose md5 is not the published data's (tests turn it
    off for their fake files); torchvision always checks CIFAR's md5s.
    """
    folder = Path(raw)
    if source == "fashion-mnist":
        return _fashion_mnist(folder, verify_checksums)
    # Imported here, not at the top: torchvision's import pulls in torch._dynamo (~2.5 s on this CPU), and
    # only `prepare` reads raw data; every other stage imports this module for its types.
    from torchvision import datasets

    if source == "cifar10":
        return _cifar(datasets.CIFAR10, folder)
    if source == "cifar100":
        return _cifar(datasets.CIFAR100, folder)
    if source == "imagenet":
        raise DataSourceError("imagenet is not read into memory: list its folders with blockdrop.data.scan_imagenet")
    if source == "folder":
        raise DataSourceError("folder is read image by image: list it with blockdrop.data.scan_folder, decode it "
                              "with blockdrop.data.read_images")
    raise DataSourceError(f"unknown data source {source!r}")
