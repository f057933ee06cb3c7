"""blockdrop.data.fetch and ``make data``: the raw folder filled from Debian's package or the network, checked
against the published md5s; and the real Fashion-MNIST, which only the ``real_data`` tests read."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

import pytest
from fakedata import FASHION_FILES, fake_fashion, fashion_idx_files, md5, write_fashion

from blockdrop.data import fetch, load_source, sources

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Debian's package holding fake Fashion-MNIST (gzipped, as Debian ships it), whose md5s are pinned."""
    files = fashion_idx_files(fake_fashion())
    write_fashion(tmp_path / "debian", fake_fashion(), gz=True)
    monkeypatch.setattr(fetch, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setattr(fetch, "FASHION_MNIST_MD5", {n: md5(b) for n, b in files.items()})
    return files


def test_fashion_mnist_is_copied_from_debian_uncompressed(tmp_path: Path, fake_debian: dict[str, bytes],
                                                          no_network: list[str]) -> None:
    dest = tmp_path / "data" / "raw" / "fashion-mnist"
    assert "Debian" in fetch.fetch("fashion-mnist", dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == fake_debian  # no temporary file left
    assert fetch.fetch("fashion-mnist", dest) == "present"  # a second call touches nothing
    assert no_network == []


def test_a_debian_file_that_is_not_the_published_data_is_refused(tmp_path: Path, fake_debian: dict[str, bytes],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "FASHION_MNIST_MD5", {**fetch.FASHION_MNIST_MD5, "t10k-images-idx3-ubyte": "0" * 32})
    dest = tmp_path / "fashion-mnist"
    with pytest.raises(sources.DataSourceError, match=r"^t10k-images-idx3-ubyte: md5 \w+, expected the published 0+$"):
        fetch.fetch("fashion-mnist", dest)
    assert sorted(p.name for p in dest.iterdir()) == ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


def test_a_damaged_debian_archive_leaves_no_partial_file(tmp_path: Path, fake_debian: dict[str, bytes]) -> None:
    debian = fetch.DEBIAN_FASHION_MNIST
    whole = (debian / "t10k-images-idx3-ubyte.gz").read_bytes()
    (debian / "t10k-images-idx3-ubyte.gz").write_bytes(whole[: len(whole) // 2])  # as if a copy was cut short
    dest = tmp_path / "fashion-mnist"
    with pytest.raises(sources.DataSourceError, match=r"t10k-images-idx3-ubyte\.gz.*reinstall"):
        fetch.fetch("fashion-mnist", dest)
    # the files before it were copied whole; of the damaged one, neither a truncated file nor a temporary one
    assert sorted(p.name for p in dest.iterdir()) == ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


def test_with_no_debian_package_and_no_network_the_message_says_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    monkeypatch.setattr(fetch, "DEBIAN_FASHION_MNIST", tmp_path / "no-such-debian-dir")
    with pytest.raises(sources.DataSourceError) as info:
        fetch.fetch("fashion-mnist", tmp_path / "fashion-mnist")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "dvc pull" in message
    assert str(tmp_path / "fashion-mnist") in message and "\n" not in message
    assert no_network, "torchvision should have tried (and failed) to download"
    assert not list((tmp_path / "fashion-mnist").iterdir())


def test_your_own_data_is_never_fetched(tmp_path: Path) -> None:
    for source in ("imagenet", "folder"):
        with pytest.raises(sources.DataSourceError, match=rf"^{source} data is not fetched: put it in "):
            fetch.fetch(source, tmp_path / source)


# ----------------------------------------------------------------------------------------------------------
# The real Fashion-MNIST, through the project's own `make data`


@pytest.fixture(scope="module")
def real_fashion_mnist() -> Path:
    """``make data`` in this checkout: Debian's package (apt-get, as root), else a download, else the test is
    skipped with make data's own explanation."""
    proc = subprocess.run(["make", "-s", "data"], cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"make data could not put Fashion-MNIST in place: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return REPO / "data" / "raw" / "fashion-mnist"


@pytest.mark.real_data
@pytest.mark.e2e
def test_real_fashion_mnist_matches_the_pinned_md5s(real_fashion_mnist: Path) -> None:
    """The pinned md5s are those of the real data, with the idx headers and sizes of Fashion-MNIST's
    60000 + 10000 28x28 images."""
    raw = load_source("fashion-mnist", real_fashion_mnist)  # verify_checksums: on
    assert raw.raw_md5 == sources.FASHION_MNIST_MD5
    sizes = {n: (real_fashion_mnist / n).stat().st_size for n in FASHION_FILES}
    assert sizes == {"train-images-idx3-ubyte": 47040016, "train-labels-idx1-ubyte": 60008,
                     "t10k-images-idx3-ubyte": 7840016, "t10k-labels-idx1-ubyte": 10008}
    header = (real_fashion_mnist / "train-images-idx3-ubyte").read_bytes()[:16]
    assert struct.unpack(">iiii", header) == (2051, 60000, 28, 28)  # idx3 magic, N, H, W
    assert raw.train_images.shape == (60000, 1, 28, 28) and raw.test_labels.shape == (10000,)
    assert set(raw.train_labels.tolist()) == set(range(10))


@pytest.mark.real_data
@pytest.mark.e2e
def test_make_data_gives_the_committed_dvc_file(real_fashion_mnist: Path) -> None:
    """Published data hashes the same everywhere: the .dvc file in git is what make data writes on any machine,
    and the folder matches it (DVC's own md5 of a folder: md5 of its sorted listing of file md5s)."""
    tracked = REPO / "data" / "raw" / "fashion-mnist.dvc"
    diff = subprocess.run(["git", "diff", "--exit-code", "--", str(tracked)], cwd=REPO, capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout
    listing = sorted(({"md5": sources.FASHION_MNIST_MD5[n], "relpath": n} for n in FASHION_FILES),
                     key=lambda d: d["relpath"])
    expected = hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"
    assert f"md5: {expected}" in tracked.read_text()
