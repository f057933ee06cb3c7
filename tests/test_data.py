"""blockdrop.data: raw sources in their real formats, the prepared files, and in-memory batches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fakedata import FASHION_FILES, FakeCifar, fake_fashion, fashion_idx_files, md5, write_fashion
from tinyrepo import make_tiny_repo
from torchvision import datasets

from blockdrop.data import (
    DataIntegrityError,
    DataSourceError,
    Meta,
    Normalize,
    RawData,
    Split,
    batches,
    load_meta,
    load_source,
    load_split,
    random_crop,
    random_flip,
    sources,
    split_train_val,
    write_prepared,
)

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST: read from data.raw only (putting it there is blockdrop.data.fetch's job: test_data_fetch.py)


def check_fashion(raw: RawData, data: dict[str, np.ndarray]) -> None:
    assert raw.train_images.shape == (120, 1, 28, 28) and raw.train_images.dtype == torch.uint8
    assert raw.test_images.shape == (40, 1, 28, 28) and raw.test_images.dtype == torch.uint8
    assert raw.train_labels.dtype == torch.int64 and raw.train_labels.shape == (120,)
    assert torch.equal(raw.train_images[:, 0], torch.from_numpy(data["train_images"]))
    assert torch.equal(raw.test_images[:, 0], torch.from_numpy(data["test_images"]))
    assert raw.train_labels.tolist() == [i % 10 for i in range(120)]
    assert raw.test_labels.tolist() == [(3 * i) % 10 for i in range(40)]
    assert raw.classes == FASHION_CLASSES == datasets.FashionMNIST.classes


@pytest.mark.parametrize("gz", [False, True], ids=["idx", "idx.gz"])
def test_fashion_mnist_from_its_raw_folder(tmp_path: Path, gz: bool) -> None:
    data = fake_fashion()
    write_fashion(tmp_path / "fashion-mnist", data, gz=gz)
    raw = load_source("fashion-mnist", tmp_path / "fashion-mnist", verify_checksums=False)  # fake files
    check_fashion(raw, data)
    assert raw.origin == str(tmp_path / "fashion-mnist")
    # the md5 of the uncompressed bytes either way, as meta.json records them
    assert raw.raw_md5 == {name: md5(blob) for name, blob in fashion_idx_files(data).items()}
    assert sorted(p.name for p in (tmp_path / "fashion-mnist").iterdir()) == sorted(
        f"{n}.gz" if gz else n for n in FASHION_FILES)  # the tracked folder is read, never written


def test_fashion_mnist_is_read_from_the_raw_folder_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare reads what DVC versions: no download, no copy from elsewhere on the machine."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("tried the network"))
    with pytest.raises(DataSourceError) as info:
        load_source("fashion-mnist", tmp_path / "fashion-mnist")
    message = str(info.value)
    assert f"Fashion-MNIST is not in {tmp_path / 'fashion-mnist'}/" in message
    assert "make data" in message and "dvc pull" in message
    assert "\n" not in message and info.value.__cause__ is None
    assert not (tmp_path / "fashion-mnist").exists()


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="mnist"):
        load_source("mnist", tmp_path)


def test_fashion_mnist_wrong_checksum_is_refused_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    data = fake_fashion()
    folder = tmp_path / "fashion-mnist"
    write_fashion(folder, data)
    monkeypatch.setattr(sources, "parse_idx", lambda blob: pytest.fail("parsed an unverified file"))
    with pytest.raises(DataSourceError) as info:
        load_source("fashion-mnist", folder)  # verify_checksums defaults to on
    message = str(info.value)
    first = "train-images-idx3-ubyte"
    assert str(folder / first) in message
    assert sources.FASHION_MNIST_MD5[first] in message  # expected
    assert md5(fashion_idx_files(data)[first]) in message  # found
    assert "\n" not in message and info.value.__cause__ is None


def test_fashion_mnist_damaged_files_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "fashion-mnist"
    write_fashion(folder, fake_fashion(), gz=True)
    whole = (folder / "t10k-images-idx3-ubyte.gz").read_bytes()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    with pytest.raises(DataSourceError, match=r"t10k-images-idx3-ubyte\.gz is unreadable"):
        load_source("fashion-mnist", folder, verify_checksums=False)
    write_fashion(folder, fake_fashion())  # uncompressed beside it: read first
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x28" + bytes(3))  # 40 labels said, 3 there
    with pytest.raises(DataSourceError, match=r"damaged: 3 values for a 40 array"):
        load_source("fashion-mnist", folder, verify_checksums=False)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 in the official python format


def check_cifar(raw: RawData, fake: FakeCifar) -> None:
    assert raw.train_images.shape == (len(fake.train_images), 3, 32, 32) and raw.train_images.dtype == torch.uint8
    assert torch.equal(raw.train_images, torch.from_numpy(fake.train_images))
    assert torch.equal(raw.test_images, torch.from_numpy(fake.test_images))
    assert raw.train_labels.tolist() == fake.train_labels and raw.test_labels.tolist() == fake.test_labels
    assert raw.classes == fake.classes
    # Pixel layout, by hand: row 0 of the first batch starts with the red plane, row-major, so its byte 0
    # is red (0, 0) and byte 1024 + 32*2 + 5 is green at (y=2, x=5).
    row = pickle.loads(fake.files[fake.train_list[0][0]])["data"][0]
    assert raw.train_images[0, 0, 0, 0].item() == row[0]
    assert raw.train_images[0, 1, 2, 5].item() == row[1024 + 32 * 2 + 5]
    assert raw.train_images[0, 2, 31, 30].item() == row[2048 + 32 * 31 + 30]


def test_cifar10_from_archive_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    fake = FakeCifar()
    fake.patch(monkeypatch, datasets.CIFAR10)
    fake.write_archive(tmp_path)
    raw = load_source("cifar10", tmp_path)
    check_cifar(raw, fake)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fake.filename]  # unpacked elsewhere: data.raw untouched
    assert no_network == []


def test_cifar10_from_extracted_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       no_network: list[str]) -> None:
    fake = FakeCifar(seed=1)
    fake.patch(monkeypatch, datasets.CIFAR10)
    fake.write_extracted(tmp_path)
    raw = load_source("cifar10", tmp_path)
    check_cifar(raw, fake)
    assert not (tmp_path / fake.filename).exists()
    assert no_network == []


def test_cifar10_archive_with_wrong_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        no_network: list[str]) -> None:
    fake = FakeCifar()
    fake.patch(monkeypatch, datasets.CIFAR10)
    monkeypatch.setattr(datasets.CIFAR10, "tgz_md5", "0" * 32)  # the archive does not match

    def must_not_unpickle(*args, **kwargs):
        raise AssertionError("a file that failed its checksum was unpickled")

    monkeypatch.setattr(pickle, "load", must_not_unpickle)
    fake.write_archive(tmp_path)
    with pytest.raises(DataSourceError) as info:
        load_source("cifar10", tmp_path)
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and "0" * 32 in message and "make data" in message
    assert not (tmp_path / "cifar-10-batches-py").exists()  # never extracted
    assert info.value.__cause__ is None


def test_cifar10_extracted_file_corrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          no_network: list[str]) -> None:
    fake = FakeCifar()
    fake.patch(monkeypatch, datasets.CIFAR10)
    folder = fake.write_extracted(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled a corrupted file"))
    with pytest.raises(DataSourceError, match="CIFAR10"):
        load_source("cifar10", tmp_path)


def test_cifar100_from_archive_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    fake = FakeCifar(hundred=True)
    fake.patch(monkeypatch, datasets.CIFAR100)
    fake.write_archive(tmp_path)
    raw = load_source("cifar100", tmp_path)
    check_cifar(raw, fake)
    assert len(raw.classes) == 100 and raw.classes[7] == "fine7"
    assert no_network == []


def test_cifar100_missing(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(DataSourceError, match=r"cifar-100-python\.tar\.gz"):
        load_source("cifar100", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# split_train_val


def tiny_raw(n_train: int = 50, n_test: int = 20, channels: int = 1, size: int = 4) -> RawData:
    g = torch.Generator().manual_seed(0)
    return RawData(
        train_images=torch.randint(0, 256, (n_train, channels, size, size), generator=g, dtype=torch.uint8),
        train_labels=torch.arange(n_train) % 3,
        test_images=torch.randint(0, 256, (n_test, channels, size, size), generator=g, dtype=torch.uint8),
        test_labels=torch.arange(n_test) % 3,
        classes=["a", "b", "c"],
        origin="test",
    )


def train_rows(raw: RawData, split: Split) -> list[int]:
    """Which training rows a split holds (every fake image is distinct)."""
    flat = raw.train_images.flatten(1)
    return [int((flat == img).all(1).nonzero()[0]) for img in split.images.flatten(1)]


def test_split_train_val_disjoint_and_covering() -> None:
    raw = tiny_raw()
    assert len({tuple(r.tolist()) for r in raw.train_images.flatten(1)}) == 50  # distinct, so rows are findable
    s = split_train_val(raw, val_size=10, seed=0)
    train, val = train_rows(raw, s["train"]), train_rows(raw, s["val"])
    assert len(train) == 40 and len(val) == 10
    assert sorted(train + val) == list(range(50))
    assert train == sorted(train) and val == sorted(val)  # kept in their original order
    assert torch.equal(s["train"].labels, raw.train_labels[train])
    assert torch.equal(s["test"].images, raw.test_images) and torch.equal(s["test"].labels, raw.test_labels)


def test_split_train_val_seeded() -> None:
    raw = tiny_raw()
    a, b, c = (split_train_val(raw, 10, seed) for seed in (0, 0, 1))
    assert torch.equal(a["val"].images, b["val"].images) and torch.equal(a["train"].images, b["train"].images)
    assert train_rows(raw, a["val"]) != train_rows(raw, c["val"])


def test_split_train_val_limits() -> None:
    raw = tiny_raw()
    full = split_train_val(raw, 10, seed=3)
    s = split_train_val(raw, 10, seed=3, train_limit=7, test_limit=5)
    assert len(s["train"]) == 7 and len(s["test"]) == 5
    assert torch.equal(s["val"].images, full["val"].images)  # the limit never changes val
    assert set(train_rows(raw, s["train"])) <= set(train_rows(raw, full["train"]))
    assert torch.equal(s["test"].images, raw.test_images[:5])


@pytest.mark.parametrize("val_size", [50, 51])
def test_split_train_val_too_big(val_size: int) -> None:
    with pytest.raises(ValueError, match="val_size"):
        split_train_val(tiny_raw(), val_size, seed=0)


# ----------------------------------------------------------------------------------------------------------
# prepared files


def test_write_and_load_prepared(tmp_path: Path) -> None:
    raw = tiny_raw(channels=3)
    splits = split_train_val(raw, 10, seed=0)
    out = tmp_path / "prepared"
    meta = write_prepared(splits, raw, "fake", out)
    assert load_meta(out) == meta
    assert json.loads((out / "meta.json").read_text())["sizes"] == {"train": 40, "val": 10, "test": 20}
    assert (meta.source, meta.classes, meta.shape, meta.num_classes) == ("fake", ["a", "b", "c"], [3, 4, 4], 3)
    for name in ("train", "val", "test"):
        back = load_split(out, name)
        assert torch.equal(back.images, splits[name].images) and torch.equal(back.labels, splits[name].labels)
        assert back.images.dtype == torch.uint8
        assert meta.sha256[f"{name}.pt"] == hashlib.sha256((out / f"{name}.pt").read_bytes()).hexdigest()
    # mean / std per channel on the [0, 1] scale, from train only
    px = splits["train"].images.double() / 255
    for c in range(3):
        assert meta.mean[c] == pytest.approx(px[:, c].mean().item(), abs=1e-6)
        assert meta.std[c] == pytest.approx(px[:, c].std().item(), abs=1e-6)
    joined = "".join(f"{k}:{v};" for k, v in sorted(meta.sha256.items()))
    assert meta.data_sha256 == hashlib.sha256(joined.encode()).hexdigest()


def test_load_split_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "val.pt"))):
        load_split(tmp_path, "val")


def prepared(tmp_path: Path) -> tuple[Path, Meta]:
    raw = tiny_raw(channels=3)
    return tmp_path, write_prepared(split_train_val(raw, 10, seed=0), raw, "fake", tmp_path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_load_split_refuses_a_file_meta_json_does_not_describe(tmp_path: Path, damage: str) -> None:
    out, meta = prepared(tmp_path)
    path = out / "train.pt"
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01  # one bit inside the pixel data: torch.load alone would not notice
    elif damage == "truncate":
        del blob[len(blob) - 100 :]
    else:
        blob = bytearray((out / "val.pt").read_bytes())  # a valid tensor file, but not this split's
    path.write_bytes(bytes(blob))
    with pytest.raises(DataIntegrityError) as info:
        load_split(out, "train")
    assert str(path) in str(info.value) and meta.sha256["train.pt"][:16] in str(info.value)
    assert isinstance(info.value, DataSourceError)  # what stage.failures_reported turns into exit 1
    assert load_split(out, "val", meta).labels.shape == (10,)  # the others still load, meta given or read


def test_load_split_with_unreadable_meta_json(tmp_path: Path) -> None:
    out, _ = prepared(tmp_path)
    (out / "meta.json").write_text('{"source": "fake", "clas')
    with pytest.raises(DataIntegrityError, match=re.escape(str(out / "meta.json"))):
        load_split(out, "test")


def test_meta_records_raw_md5_and_older_meta_still_loads(tmp_path: Path) -> None:
    raw = dataclasses.replace(tiny_raw(), raw_md5={"train-images-idx3-ubyte": "ab" * 16})
    meta = write_prepared(split_train_val(raw, 10, seed=0), raw, "fake", tmp_path)
    assert load_meta(tmp_path).raw_md5 == meta.raw_md5 == {"train-images-idx3-ubyte": "ab" * 16}
    older = json.loads((tmp_path / "meta.json").read_text())
    del older["raw_md5"]  # a meta.json written before the field existed
    (tmp_path / "meta.json").write_text(json.dumps(older))
    assert load_meta(tmp_path).raw_md5 == {} and load_meta(tmp_path).sha256 == meta.sha256
    assert load_split(tmp_path, "test").labels.shape == (20,)


@pytest.mark.parametrize(("split", "label"), [("train", 3), ("test", -1), ("val", 99)])
def test_prepare_refuses_labels_outside_the_classes(tmp_path: Path, split: str, label: int) -> None:
    raw = tiny_raw()  # 3 classes
    splits = split_train_val(raw, 10, seed=0)
    splits[split].labels[4] = label
    with pytest.raises(DataSourceError) as info:
        write_prepared(splits, raw, "fake", tmp_path / "out")
    message = str(info.value)
    assert f"split {split}" in message and "[0, 3)" in message and f"first {label} at index 4" in message
    assert not (tmp_path / "out").exists()  # refused before anything is written


# ----------------------------------------------------------------------------------------------------------
# augmentation and batches


def test_random_crop_is_a_window_of_the_padded_image() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (6, 2, 5, 5), generator=g, dtype=torch.uint8)  # no zeros inside
    p = 2
    out = random_crop(images, p, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last)
    padded = torch.nn.functional.pad(images, (p,) * 4)
    offsets = []
    for i in range(len(images)):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 5])]
        assert len(hits) == 1, f"image {i} is not exactly one window of the padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # the offsets are drawn per image
    again = random_crop(images, p, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_random_crop_zero_padding_is_identity() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    assert torch.equal(random_crop(images, 0), images)


def test_random_crop_covers_all_offsets() -> None:
    # 200 single-pixel-marked images: every one of the (2p+1)^2 offsets shows up.
    images = torch.zeros(200, 1, 3, 3, dtype=torch.uint8)
    images[:, 0, 1, 1] = 255
    out = random_crop(images, 1, torch.Generator().manual_seed(0))
    where = {tuple((o[0] == 255).nonzero()[0].tolist()) if (o == 255).any() else None for o in out}
    # the marked centre pixel lands at (1 - dy + 1, 1 - dx + 1) = every cell of the 3x3 window
    assert where == {(r, c) for r in range(3) for c in range(3)}


def test_random_flip() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1000, 1, 3, 4), generator=g, dtype=torch.uint8)
    out = random_flip(images, torch.Generator().manual_seed(5))
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    flipped = int((mirrored & ~same).sum())
    assert 430 <= flipped <= 570  # Binomial(1000, 1/2): mean 500, std 16
    assert torch.equal(out, random_flip(images, torch.Generator().manual_seed(5)))


def make_split(n: int = 23) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 2, 4, 4), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # an id in a pixel that crop/flip may move...
    return Split(images, torch.arange(n))  # ...so labels carry the id instead


def identity_norm() -> Normalize:
    return Normalize([0.0, 0.0], [1 / 255, 1 / 255], torch.device("cpu"))


def test_batches_cover_every_index_once_per_epoch() -> None:
    split = make_split()
    g = torch.Generator().manual_seed(0)
    seen = [y for _, y in batches(split, 5, identity_norm(), generator=g, shuffle=True)]
    assert [len(y) for y in seen] == [5, 5, 5, 5, 3]
    order = torch.cat(seen).tolist()
    assert sorted(order) == list(range(23)) and order != list(range(23))
    second = torch.cat([y for _, y in batches(split, 5, identity_norm(), generator=g, shuffle=True)]).tolist()
    assert sorted(second) == list(range(23)) and second != order  # a new order each epoch


def test_batches_images_match_labels_without_augmentation() -> None:
    split = make_split()
    for x, y in batches(split, 4, identity_norm(), shuffle=True, generator=torch.Generator().manual_seed(2)):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, split.images[y].float())


def test_batches_limit_and_drop_last() -> None:
    split = make_split()
    norm = identity_norm()
    assert [len(y) for _, y in batches(split, 5, norm, limit=12)] == [5, 5, 2]
    assert [len(y) for _, y in batches(split, 5, norm, limit=12, drop_last=True)] == [5, 5]
    assert [len(y) for _, y in batches(split, 5, norm, drop_last=True)] == [5, 5, 5, 5]
    assert torch.cat([y for _, y in batches(split, 5, norm, limit=12)]).tolist() == list(range(12))
    assert [len(y) for _, y in batches(split, 5, norm, limit=100)] == [5, 5, 5, 5, 3]


def test_batches_augmentation_is_reproducible() -> None:
    split = make_split()

    def run(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [x for x, _ in batches(split, 8, identity_norm(), generator=g, shuffle=True, crop_padding=1, flip=True)]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, c, strict=True))


def test_batches_normalisation(tmp_path: Path) -> None:
    raw = tiny_raw(n_train=64, channels=3, size=6)
    splits = {"train": Split(raw.train_images, raw.train_labels), "val": Split(raw.test_images, raw.test_labels)}
    meta = write_prepared(splits, raw, "fake", tmp_path)
    norm = Normalize(meta.mean, meta.std, torch.device("cpu"))
    x = torch.cat([x for x, _ in batches(splits["train"], 16, norm)])
    per_channel = x.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-4)
    # and by hand for one pixel
    v = raw.train_images[0, 1, 2, 3].item()
    assert x[0, 1, 2, 3].item() == pytest.approx((v / 255 - meta.mean[1]) / meta.std[1], rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# the stages: a raw or prepared file that fails its checksum stops the stage with one line, exit 1


def run_stage(root: Path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("BLOCKDROP_PARENT_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", f"pipelines.{name}"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess, stage: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: stage {stage}: "), proc.stderr
    return errors[0]


@pytest.mark.e2e
def test_stages_refuse_raw_and_prepared_files_that_fail_their_checksums(tmp_path: Path) -> None:
    root = make_tiny_repo(tmp_path / "repo", overrides={"data": {"verify_checksums": True}})
    line = one_error_line(run_stage(root, "prepare"), "prepare")  # the fake idx files are not Zalando's
    assert "data/raw/fashion-mnist/train-images-idx3-ubyte" in line
    assert sources.FASHION_MNIST_MD5["train-images-idx3-ubyte"] in line
    assert not (root / "data" / "prepared").exists()

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["verify_checksums"] = False  # what profiles/tiny.yaml says
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run_stage(root, "prepare")
    assert proc.returncode == 0, proc.stderr
    meta = load_meta(root / "data" / "prepared")
    assert meta.raw_md5["train-labels-idx1-ubyte"] == md5(
        (root / "data/raw/fashion-mnist/train-labels-idx1-ubyte").read_bytes())

    train = root / "data" / "prepared" / "train.pt"
    blob = bytearray(train.read_bytes())
    blob[-2000] ^= 0xFF
    train.write_bytes(bytes(blob))
    line = one_error_line(run_stage(root, "pretrain"), "pretrain")
    assert "data/prepared/train.pt" in line and "prepare" in line
    assert not (root / "models" / "backbone.pt").exists()
