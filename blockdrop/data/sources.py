"""Raw datasets -> uint8 tensors, from local copies first and the network last.

Every source returns the same thing: ``(train_images, train_labels, test_images, test_labels, classes)``
with images as uint8 ``(N, C, H, W)`` tensors. torchvision does the reading and checks CIFAR's md5s; the
Fashion-MNIST idx files are checked here against :data:`FASHION_MNIST_MD5`, and every source reports the md5
of the raw files it read (``RawData.raw_md5``, recorded in ``meta.json``).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from blockdrop.files import atomic_write_bytes

__all__ = ["DEBIAN_FASHION_MNIST", "FASHION_MNIST_MD5", "DataSourceError", "RawData", "load_source"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

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


class DataSourceError(RuntimeError):
    """The dataset could not be found or verified; the message says what to do about it."""


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


def _from_torchvision(cls: type, root: Path, download: bool) -> tuple[RawData, list[str]]:
    train, test = (cls(str(root), train=flag, download=download) for flag in (True, False))
    raw = RawData(
        _nchw(train.data), torch.as_tensor(train.targets, dtype=torch.int64),
        _nchw(test.data), torch.as_tensor(test.targets, dtype=torch.int64),
        list(train.classes), origin=str(root),
    )
    return raw, list(train.classes)


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()  # ~0.1 s for the 47 MB train images


def _checked_md5(folder: Path, names: list[str], verify: bool) -> dict[str, str]:
    """The md5 of each raw file; with ``verify``, refuse one that differs from :data:`FASHION_MNIST_MD5`."""
    digests = {n: _md5(folder / n) for n in names}
    for n, found in digests.items():
        expected = FASHION_MNIST_MD5.get(n)
        if verify and found != expected:
            raise DataSourceError(
                f"{folder / n} failed its checksum: expected md5 {expected}, found {found}; delete it and run "
                "prepare again (or set data.verify_checksums: false for data of your own)"
            )
    return digests


def _fashion_mnist(cls: type, raw_dir: Path, verify: bool) -> RawData:
    folder = raw_dir / "FashionMNIST" / "raw"  # torchvision's own layout under the root
    names = [Path(name).stem for name, _ in cls.resources]  # '*-ubyte', uncompressed
    if not all((folder / n).exists() for n in names) and all(
        (DEBIAN_FASHION_MNIST / f"{n}.gz").exists() for n in names
    ):
        # Debian re-compressed the archives (their .gz md5s differ from upstream), so copy the idx
        # files uncompressed; torchvision then reads them as if it had downloaded them. Each copy is
        # atomic: a kill mid-copy must not leave a truncated idx file that the next run takes as present.
        for n in names:
            if not (folder / n).exists():
                try:
                    with gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz") as src:
                        atomic_write_bytes(folder / n, src.read())  # at most 47 MB
                except (OSError, EOFError, zlib.error) as e:  # a truncated or damaged archive
                    raise DataSourceError(
                        f"cannot copy {DEBIAN_FASHION_MNIST / n}.gz to {folder}/ ({type(e).__name__}: {e}); "
                        "reinstall the package (apt-get install --reinstall dataset-fashion-mnist)"
                    ) from None
    local = all((folder / n).exists() for n in names)
    if local:  # checked before torchvision parses them, so a wrong file is named as such
        digests = _checked_md5(folder, names, verify)
    try:
        raw, _ = _from_torchvision(cls, raw_dir, download=not local)
    except Exception as e:  # no network, partial files, a proxy page instead of data ...
        raise DataSourceError(
            f"Fashion-MNIST is not available ({type(e).__name__}: {e}). Do one of: "
            f"(1) put the four idx files in {folder}/, "
            f"(2) `apt-get install dataset-fashion-mnist` (fills {DEBIAN_FASHION_MNIST}), "
            "(3) run with internet access so torchvision can download it."
        ) from None
    if not local:  # torchvision checked the archives it downloaded; check what they unpacked to as well
        digests = _checked_md5(folder, names, verify)
    origin = str(folder) if local else "downloaded by torchvision"
    return RawData(**{**raw.__dict__, "origin": origin, "raw_md5": digests})


def _cifar(cls: type, raw_dir: Path) -> RawData:
    folder, archive = raw_dir / cls.base_folder, raw_dir / cls.filename
    # torchvision checks every batch file's md5 before unpickling it; with only the archive present,
    # download() verifies the archive's published md5, then extracts it (no network needed).
    try:
        raw, _ = _from_torchvision(cls, raw_dir, download=not folder.exists())
    except Exception as e:
        raise DataSourceError(
            f"{cls.__name__} is not available or failed its checksum ({type(e).__name__}: {e}). Put "
            f"{archive.name} (md5 {cls.tgz_md5}) or the extracted {folder.name}/ in {raw_dir}/, "
            "or run with internet access so torchvision can download it."
        ) from None
    # torchvision has just checked each of these files against the md5 it lists: record those.
    checked = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return RawData(**{**raw.__dict__, "raw_md5": {name: md5 for name, md5 in checked}})


def load_source(source: str, raw_dir: str | Path, verify_checksums: bool = True) -> RawData:
    """Read ``source`` (``fashion-mnist``, ``cifar10``, ``cifar100``) as uint8 NCHW tensors.

    ``verify_checksums`` refuses Fashion-MNIST idx files whose md5 is not the published data's (tests turn it
    off for their fake files); torchvision always checks CIFAR's md5s.
    """
    # Imported here, not at the top: torchvision's import pulls in torch._dynamo (~2.5 s on this CPU), and
    # only `prepare` reads raw data; every other stage imports this module for its types.
    from torchvision import datasets

    raw_dir = Path(raw_dir)
    if source == "fashion-mnist":
        return _fashion_mnist(datasets.FashionMNIST, raw_dir, verify_checksums)
    if source == "cifar10":
        return _cifar(datasets.CIFAR10, raw_dir)
    if source == "cifar100":
        return _cifar(datasets.CIFAR100, raw_dir)
    if source == "imagenet":
        raise DataSourceError("imagenet is not read into memory: list its folders with blockdrop.data.scan_imagenet")
    raise DataSourceError(f"unknown data source {source!r}")
