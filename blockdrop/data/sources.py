"""Raw datasets -> uint8 tensors, from local copies first and the network last.

Every source returns the same thing: ``(train_images, train_labels, test_images, test_labels, classes)``
with images as uint8 ``(N, C, H, W)`` tensors. torchvision does the reading and the checksum checks.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DEBIAN_FASHION_MNIST", "DataSourceError", "RawData", "load_source"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


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


def _fashion_mnist(cls: type, raw_dir: Path) -> RawData:
    folder = raw_dir / "FashionMNIST" / "raw"  # torchvision's own layout under the root
    names = [Path(name).stem for name, _ in cls.resources]  # '*-ubyte', uncompressed
    if not all((folder / n).exists() for n in names) and all(
        (DEBIAN_FASHION_MNIST / f"{n}.gz").exists() for n in names
    ):
        # Debian re-compressed the archives (their .gz md5s differ from upstream), so copy the idx
        # files uncompressed; torchvision then reads them as if it had downloaded them.
        folder.mkdir(parents=True, exist_ok=True)
        for n in names:
            with gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz") as src, open(folder / n, "wb") as dst:
                shutil.copyfileobj(src, dst)
    local = all((folder / n).exists() for n in names)
    try:
        raw, _ = _from_torchvision(cls, raw_dir, download=not local)
    except Exception as e:  # no network, partial files, a proxy page instead of data ...
        raise DataSourceError(
            f"Fashion-MNIST is not available ({type(e).__name__}: {e}). Do one of: "
            f"(1) put the four idx files in {folder}/, "
            f"(2) `apt-get install dataset-fashion-mnist` (fills {DEBIAN_FASHION_MNIST}), "
            "(3) run with internet access so torchvision can download it."
        ) from None
    return RawData(**{**raw.__dict__, "origin": str(folder) if local else "downloaded by torchvision"})


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
    return raw


def load_source(source: str, raw_dir: str | Path) -> RawData:
    """Read ``source`` (``fashion-mnist``, ``cifar10``, ``cifar100``) as uint8 NCHW tensors."""
    # Imported here, not at the top: torchvision's import pulls in torch._dynamo (~2.5 s on this CPU), and
    # only `prepare` reads raw data; every other stage imports this module for its types.
    from torchvision import datasets

    raw_dir = Path(raw_dir)
    if source == "fashion-mnist":
        return _fashion_mnist(datasets.FashionMNIST, raw_dir)
    if source == "cifar10":
        return _cifar(datasets.CIFAR10, raw_dir)
    if source == "cifar100":
        return _cifar(datasets.CIFAR100, raw_dir)
    raise DataSourceError(f"unknown data source {source!r}")
