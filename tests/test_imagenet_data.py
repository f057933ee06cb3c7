"""The ImageNet folder source: prepare's index files, and folder splits read, decoded and cropped per batch.

The data is a tiny ILSVRC2012-style tree written by ``fakedata.write_imagefolder`` (4 classes, 12 train and 4 val
JPEGs each of 40 to 90 px, one of them greyscale, one PNG named .JPEG); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import fake_wnids, write_imagefolder
from test_analysis import fabricate
from test_data import run_stage
from tinyrepo import make_tiny_repo
from torchvision.transforms.v2 import functional as F

from blockdrop.analysis import read_per_image, run_analysis
from blockdrop.config import Analyze
from blockdrop.data import (
    DataIntegrityError,
    DataSourceError,
    FolderSplit,
    Meta,
    Normalize,
    batches,
    carve_folder_splits,
    load_meta,
    load_split,
    scan_imagenet,
    write_folder_prepared,
)
from blockdrop.data.folder import IMAGENET_MEAN, IMAGENET_STD, decode_rgb

RESIZE, SIZE, VAL_SIZE = 64, 56, 8


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, int]]]:
    root = tmp_path_factory.mktemp("raw") / "imagenet"
    return root, write_imagefolder(root)


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = tree
    listing = scan_imagenet(root)
    out = tmp_path_factory.mktemp("prepared")
    write_folder_prepared(carve_folder_splits(listing, VAL_SIZE, seed=0), listing.classes, "imagenet", listing.root,
                          RESIZE, SIZE, listing.raw_md5, out)
    return out


def wnid_labels(split: FolderSplit) -> list[int]:
    """The label each file's folder names."""
    wnids = fake_wnids(4)
    return [wnids.index(p.decode().split("/")[1]) for p in split.paths]


def expected_crop(split: FolderSplit, i: int) -> torch.Tensor:
    """The authors' test transform with torchvision's own ops: Resize(shorter side) then CenterCrop."""
    with open(split.path(i), "rb") as f:
        image = decode_rgb(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
    return F.center_crop(F.resize(image, [RESIZE], antialias=True), [SIZE])


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def collect(split: FolderSplit, seed: int | None, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))
    return list(batches(split, kwargs.pop("batch_size", 16), normalize, generator=generator, **kwargs))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------------------------
# prepare


@pytest.mark.e2e
def test_prepare_stage_writes_indexes_and_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crops = {"crop_padding": 0}
    written: dict[str, dict[str, int]] = {}
    root = make_tiny_repo(tmp_path / "repo", overrides={
        "data": {"source": "imagenet", "raw": "data/raw/imagenet", "transforms": "imagenet", "resize": RESIZE,
                 "image_size": SIZE, "val_size": VAL_SIZE, "train_limit": 0, "test_limit": 0},
        "model": {"depth": 101, "weights": "w.pth"},
        "pretrain": {"crop_size": 0, **crops}, "curriculum": crops, "finetune": crops,
        "evaluate": {"latency_images": 4, "latency_warmup": 1},
    }, write_raw=lambda raw: written.update(write_imagefolder(raw)))
    proc = run_stage(root, "prepare")
    assert proc.returncode == 0, proc.stderr
    out = root / "data" / "prepared"
    meta = load_meta(out)
    assert (meta.kind, meta.root, meta.resize, meta.image_size) == ("folder", "data/raw/imagenet", RESIZE, SIZE)
    assert meta.source == "imagenet" and meta.classes == fake_wnids(4) and meta.shape == [3, SIZE, SIZE]
    assert (meta.mean, meta.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert meta.sizes == {"train": 48 - VAL_SIZE, "val": VAL_SIZE, "test": 16}
    for name in ("train", "val", "test"):
        assert meta.sha256[f"{name}.pt"] == hashlib.sha256((out / f"{name}.pt").read_bytes()).hexdigest()
    # the listing digest: relative path and size of every image, in make_dataset's (sorted) order
    raw = root / "data" / "raw" / "imagenet"
    listing = "".join(f"{rel}\t{(raw / rel).stat().st_size}\n" for rel in sorted(written["train"]))
    assert meta.raw_md5["train/ (listing)"] == hashlib.md5(listing.encode()).hexdigest()

    monkeypatch.chdir(root)  # meta.root is relative to the repository root, where the stages run
    splits = {name: load_split(out, name, meta) for name in ("train", "val", "test")}
    paths = {name: [p.decode() for p in s.paths] for name, s in splits.items()}
    assert sorted(paths["train"] + paths["val"]) == sorted(written["train"])  # disjoint and covering
    assert sorted(paths["test"]) == sorted(written["val"])  # our test split is ILSVRC val
    for name, split in splits.items():
        assert split.labels.dtype == torch.int64
        assert split.labels.tolist() == [written["train" if name != "test" else "val"][p] for p in paths[name]]
    # val holds the images split_train_val's permutation carves out for this seed
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    assert set(paths["val"]) == {sorted(written["train"])[i] for i in perm[48 - VAL_SIZE:].tolist()}


def test_limits_keep_random_subsets(tree) -> None:
    listing = scan_imagenet(tree[0])
    full = carve_folder_splits(listing, VAL_SIZE, seed=3)
    cut = carve_folder_splits(listing, VAL_SIZE, seed=3, train_limit=10, test_limit=6)
    assert cut["train"][0] == full["train"][0][:10] and cut["val"][0] == full["val"][0]
    assert cut["test"][0] == full["test"][0][:6] and len(set(cut["test"][1].tolist())) > 1  # not one class
    assert carve_folder_splits(listing, VAL_SIZE, seed=4)["val"][0] != full["val"][0]
    with pytest.raises(ValueError, match="val_size"):
        carve_folder_splits(listing, 48, seed=0)


def test_val_folder_with_other_classes_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    write_imagefolder(root, classes=3, train_per_class=2, val_per_class=1)
    (root / "val" / fake_wnids(3)[1]).rename(root / "val" / "n09999999")
    with pytest.raises(DataSourceError, match=r"1 missing, e.g. \['n01441764'\]; 1 not in train"):
        scan_imagenet(root)
    with pytest.raises(DataSourceError, match="ImageNet is not in"):
        scan_imagenet(tmp_path / "nowhere")


def test_corrupted_index_file_is_refused(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "prepared"
    copy.mkdir()
    for f in prepared.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    blob = bytearray((copy / "train.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (copy / "train.pt").write_bytes(bytes(blob))
    with pytest.raises(DataIntegrityError, match=r"train\.pt is corrupted"):
        load_split(copy, "train")
    assert len(load_split(copy, "val")) == VAL_SIZE  # the others still load


def test_older_meta_json_loads_as_the_tensor_kind(prepared: Path) -> None:
    fields = json.loads((prepared / "meta.json").read_text())
    for key in ("kind", "root", "resize", "image_size"):
        fields.pop(key)
    assert Meta(**fields).kind == "tensor"


# ----------------------------------------------------------------------------------------------------------
# batches


def test_batches_shapes_labels_and_pixels(prepared: Path) -> None:
    test = load_split(prepared, "test")
    got = collect(test, None, batch_size=5)
    assert [x.shape for x, _ in got] == [(5, 3, SIZE, SIZE)] * 3 + [(1, 3, SIZE, SIZE)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in got)
    labels = torch.cat([y for _, y in got])
    assert labels.tolist() == wnid_labels(test)  # in order, and the folder's class
    pixels = unnormalize(torch.cat([x for x, _ in got]))
    expected = torch.stack([expected_crop(test, i) for i in range(len(test))]).float()
    assert (pixels - expected).abs().max().item() < 1e-3  # the centre crop, exactly, then Normalize


def test_train_crops_are_windows_of_the_resized_image(prepared: Path) -> None:
    train = load_split(prepared, "train").head(8)
    x, y = collect(train, 0, shuffle=True)[0]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    assert y.tolist() == [wnid_labels(train)[i] for i in order.tolist()]
    offsets = set()
    for image, i in zip(unnormalize(x).round().to(torch.uint8), order.tolist(), strict=True):
        with open(train.path(i), "rb") as f:
            resized = F.resize(decode_rgb(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)), [RESIZE],
                               antialias=True)
        h, w = resized.shape[1:]
        found = [(t, left) for t in range(h - SIZE + 1) for left in range(w - SIZE + 1)
                 if torch.equal(resized[:, t:t + SIZE, left:left + SIZE], image)]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 3  # random windows, not the centre


def test_same_seed_same_batches_whatever_the_workers(prepared: Path) -> None:
    kwargs = {"shuffle": True, "flip": True, "limit": 30, "batch_size": 8}
    serial = collect(load_split(prepared, "train", workers=0), 7, **kwargs)
    parallel = collect(load_split(prepared, "train", workers=2), 7, **kwargs)
    assert [len(y) for _, y in serial] == [8, 8, 8, 6]
    assert same(serial, parallel)
    other = collect(load_split(prepared, "train", workers=0), 8, **kwargs)
    assert not same(serial, other)
    # the same images, cropped and flipped differently: ordered by path, the labels agree, the pixels do not
    plain = collect(load_split(prepared, "train"), 7, **{**kwargs, "flip": False})
    assert torch.equal(torch.cat([y for _, y in plain]), torch.cat([y for _, y in serial]))
    assert not torch.equal(torch.cat([x for x, _ in plain]), torch.cat([x for x, _ in serial]))
    dropped = collect(load_split(prepared, "train"), 7, **{**kwargs, "drop_last": True})
    assert [len(y) for _, y in dropped] == [8, 8, 8] and same(dropped, serial[:3])


def test_val_and_test_crops_are_deterministic(prepared: Path) -> None:
    for name in ("val", "test"):
        split = load_split(prepared, name, workers=2)
        first, second = collect(split, 1, shuffle=True), collect(split, 2, shuffle=True)
        assert not same(first, second)  # another order ...
        sums = [torch.cat([x for x, _ in run]).flatten(1).sum(1).sort().values for run in (first, second)]
        assert torch.allclose(*sums)  # ... of the same crops
        assert same(collect(split, None), collect(split, None))


def test_batches_refuse_crop_params_on_folder_splits(prepared: Path) -> None:
    with pytest.raises(ValueError, match="crop_padding"):
        collect(load_split(prepared, "train"), 0, crop_padding=4)


def test_gpu_path_run_on_the_cpu_equals_the_worker_path(prepared: Path) -> None:
    for name in ("train", "test"):  # train: the greyscale JPEG; test: the PNG named .JPEG (the fallback)
        split = load_split(prepared, name, workers=2)
        on_device = FolderSplit(**{**split.__dict__, "device_decode": True})
        assert on_device.decodes_on_device and not split.decodes_on_device
        kwargs = {"shuffle": True, "flip": True, "batch_size": 16}
        assert same(collect(split, 5, **kwargs), collect(on_device, 5, **kwargs))
        assert torch.equal(on_device.images[:], split.images[:])


def test_unreadable_image_is_named(tmp_path: Path, prepared: Path) -> None:
    test = load_split(prepared, "test")
    root = tmp_path / "copy"
    for p in test.paths:
        (root / p.decode()).parent.mkdir(parents=True, exist_ok=True)
        (root / p.decode()).write_bytes(Path(test.path(0)).read_bytes())
    (root / test.paths[2].decode()).write_bytes(b"not an image")
    for workers in (0, 2):  # from a worker too, the error is one line naming the file
        broken = FolderSplit(**{**test.__dict__, "root": str(root), "workers": workers})
        with pytest.raises(DataSourceError) as error:
            collect(broken, None)
        assert str(error.value).startswith(f"{root / test.paths[2].decode()} is not a readable image")
        assert "\n" not in str(error.value)
    (root / test.paths[2].decode()).write_bytes(Path(test.path(0)).read_bytes())
    (root / test.paths[5].decode()).unlink()
    with pytest.raises(FileNotFoundError, match=test.paths[5].decode()) as error:
        collect(FolderSplit(**{**test.__dict__, "root": str(root), "workers": 2}), None, batch_size=4)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# the lazy images view, and the analysis reading images through it


def test_images_view_indexes_like_a_tensor(prepared: Path) -> None:
    test = load_split(prepared, "test")
    view = test.images
    assert view.shape == (16, 3, SIZE, SIZE) and len(view) == 16 and view.device == torch.device("cpu")
    each = torch.stack([expected_crop(test, i) for i in range(16)])
    assert view[3].shape == (3, SIZE, SIZE) and torch.equal(view[3], each[3]) and torch.equal(view[-1], each[15])
    assert torch.equal(view[:4], each[:4]) and torch.equal(view[2:11:3], each[2:11:3])
    assert torch.equal(view[torch.tensor([5, 0, 5])], each[[5, 0, 5]])
    assert torch.equal(view[np.array([7, 1])], each[[7, 1]])
    assert view[0:0].shape == (0, 3, SIZE, SIZE)
    arrays = view.numpy()
    assert arrays.shape == (16, 3, SIZE, SIZE) and len(arrays) == 16
    assert isinstance(arrays[np.array([1, 2])], np.ndarray) and np.array_equal(arrays[4], each[4].numpy())
    assert torch.equal(test.head(4).images[:], each[:4]) and test.head(0) is test


def test_analysis_reads_only_the_images_it_shows(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    test = load_split(prepared, "test")
    data = fabricate(tmp_path, n=len(test), k=6, classes=fake_wnids(4), labels=test.labels.numpy())
    reads: list[int] = []
    read = FolderSplit.read
    monkeypatch.setattr(FolderSplit, "read", lambda self, i: reads.append(i) or read(self, i))
    per_image = read_per_image(tmp_path / "data/evaluate/per_image.csv")
    settings = Analyze(samples_per_policy=1, top_policies=1, policies_per_class=1, extreme_images=1, dpi=60)
    metrics, written = run_analysis(per_image, test.images.numpy(), data["classes"], settings,
                                    tmp_path / "reports/analyze", 0, data["metrics"], {})
    assert all(p.exists() for p in written)
    assert metrics["policies"]["unique"] == per_image["policy"].nunique()
    shown = 1 + 4 + 2  # a sample of the top policy, of each class's top policy, the two extremes
    assert 0 < len(reads) <= shown < len(test)
