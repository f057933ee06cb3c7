"""Put a source's raw files into its ``data.raw`` folder, from where they are on this machine or the network.

``prepare`` reads only ``data.raw`` (a DVC-tracked folder); this module fills it the first time, and
``ops/data.py`` (``make data``) then tracks the result with DVC. Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` package when it is installed, else from torchvision's mirrors; CIFAR from torchvision's
mirror. Every file written is checked against its published md5 before it is moved into place, so a folder
this module fills holds the published bytes, and DVC records the same hash on every machine.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tempfile
import zlib
from pathlib import Path

from blockdrop.data.sources import FASHION_MNIST_MD5, DataSourceError
from blockdrop.files import atomic_write_bytes, fsync_dir

__all__ = ["DEBIAN_FASHION_MNIST", "FETCHABLE", "fetch", "has_raw"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FETCHABLE = ("fashion-mnist", "cifar10", "cifar100")  # imagenet and folder: the user brings them


def _cifar_class(source: str) -> type:
    """torchvision's dataset class of ``cifar10`` or ``cifar100``: its file names, URL and md5s."""
    from torchvision import datasets  # slow import: on use

    return datasets.CIFAR10 if source == "cifar10" else datasets.CIFAR100


def has_raw(source: str, raw: str | Path) -> bool:
    """Whether ``raw`` holds what ``source`` reads (the files' presence, not their checksums)."""
    folder = Path(raw)
    if source == "fashion-mnist":
        return all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in FASHION_MNIST_MD5)
    if source in ("cifar10", "cifar100"):
        cls = _cifar_class(source)
        return (folder / cls.base_folder).is_dir() or (folder / cls.filename).is_file()
    return folder.is_dir() and any(folder.iterdir())


def _checked(name: str, data: bytes) -> bytes:
    found = hashlib.md5(data).hexdigest()
    if found != FASHION_MNIST_MD5[name]:
        raise DataSourceError(f"{name}: md5 {found}, expected the published {FASHION_MNIST_MD5[name]}")
    return data


def _fashion_from_debian(dest: Path) -> None:
    # Debian re-compressed the archives (their .gz md5s differ from upstream's), so the idx files are stored
    # uncompressed; their md5s are the published ones. Each write is atomic: a kill mid-copy must not leave a
    # truncated file that the next run takes as present.
    for name in FASHION_MNIST_MD5:
        try:
            with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz") as src:
                data = src.read()  # at most 47 MB
        except (OSError, EOFError, zlib.error) as e:  # a truncated or damaged archive
            raise DataSourceError(f"cannot read {DEBIAN_FASHION_MNIST / name}.gz ({type(e).__name__}: {e}); "
                                  "reinstall the package (apt-get install --reinstall dataset-fashion-mnist)") from None
        atomic_write_bytes(dest / name, _checked(name, data))


def _fashion_from_network(dest: Path) -> None:
    from torchvision import datasets  # torchvision checks the archives' md5s as it downloads them

    with tempfile.TemporaryDirectory(prefix="blockdrop-fetch-") as tmp:
        try:
            datasets.FashionMNIST(tmp, train=True, download=True)
        except Exception as e:  # no network, a proxy page instead of data ...
            why = " ".join(str(e).split())  # torchvision's message spans lines: the stage reports one
            raise DataSourceError(
                f"Fashion-MNIST could not be fetched ({type(e).__name__}: {why}). Do one of: "
                f"(1) `apt-get install dataset-fashion-mnist` (fills {DEBIAN_FASHION_MNIST}), "
                f"(2) put the four idx files in {dest}/, (3) `dvc pull` from a remote that has them."
            ) from None
        for name in FASHION_MNIST_MD5:
            atomic_write_bytes(dest / name, _checked(name, (Path(tmp) / "FashionMNIST" / "raw" / name).read_bytes()))


def _cifar_from_network(source: str, dest: Path) -> None:
    from torchvision.datasets.utils import download_url

    cls = _cifar_class(source)
    with tempfile.TemporaryDirectory(prefix="blockdrop-fetch-") as tmp:
        try:
            download_url(cls.url, tmp, cls.filename, cls.tgz_md5)  # refuses a download whose md5 differs
        except Exception as e:
            why = " ".join(str(e).split())
            raise DataSourceError(f"{cls.__name__} could not be fetched ({type(e).__name__}: {why}); put "
                                  f"{cls.filename} (md5 {cls.tgz_md5}) in {dest}/") from None
        shutil.move(Path(tmp) / cls.filename, dest / f".{cls.filename}.partial")
        (dest / f".{cls.filename}.partial").rename(dest / cls.filename)  # whole or absent


def fetch(source: str, raw: str | Path) -> str:
    """Fill ``raw`` with ``source``'s published raw files; return where they came from. A folder that already
    holds them is left alone ("present")."""
    dest = Path(raw)
    if has_raw(source, dest):
        return "present"
    if source not in FETCHABLE:
        raise DataSourceError(f"{source} data is not fetched: put it in {dest}/ yourself (see the README)")
    dest.mkdir(parents=True, exist_ok=True)
    if source == "fashion-mnist":
        if all((DEBIAN_FASHION_MNIST / f"{n}.gz").exists() for n in FASHION_MNIST_MD5):
            _fashion_from_debian(dest)
            origin = f"Debian's dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})"
        else:
            _fashion_from_network(dest)
            origin = "torchvision's mirrors"
    else:
        _cifar_from_network(source, dest)
        origin = "torchvision's mirror"
    fsync_dir(dest)
    return origin
