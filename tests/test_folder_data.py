"""``data.source: folder``: a tree of images of your own, scanned, inspected, refused when it breaks the rules,
and read in both styles (cifar: decoded into memory at one size; imagenet: kept on disk, read per batch).

The trees are written by ``fakedata.write_image_tree``: three classes (dark, light, red), PNG and JPEG files of
two sizes, greyscale and colour images; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakedata import TREE_CLASSES, write_image_tree

from blockdrop.config import ParamsError, check_data_fit, dataset_name, parse_params
from blockdrop.data import (
    BadDataError,
    DataSourceError,
    Normalize,
    batches,
    carve_folder_splits,
    check_streamable,
    common_side,
    inspect_images,
    load_meta,
    load_split,
    read_image_splits,
    read_images,
    scan_folder,
    write_folder_prepared,
    write_prepared,
)
from blockdrop.data.folder import IMAGENET_MEAN, IMAGENET_STD
from blockdrop.tracking import registry_name


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, int]]]:
    root = tmp_path_factory.mktemp("raw") / "flowers"
    return root, write_image_tree(root, train_per_class=8, test_per_class=4)


def refusal(root: Path) -> str:
    """The one-line message of the tree's refusal, scanned and inspected as prepare does."""
    with pytest.raises(BadDataError) as info:
        inspect_images(scan_folder(root))
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------------
# scanning and inspecting


def test_scan_lists_classes_files_and_sizes_and_skips_hidden_files(tree) -> None:
    root, written = tree
    listing = scan_folder(root)
    assert listing.classes == sorted(TREE_CLASSES) == ["dark", "light", "red"]
    assert sorted(listing.train[0]) == sorted(written["train"]) and len(listing.train[0]) == 24  # no .DS_Store
    assert sorted(listing.test[0]) == sorted(written["test"]) and len(listing.test[0]) == 12
    assert [written["train"][p] for p in listing.train[0]] == listing.train[1]
    assert set(listing.raw_md5) == {"train/ (listing)", "test/ (listing)"}
    survey = inspect_images(listing)
    assert survey.channels == 3  # red is colour: the greyscale images are converted
    assert set(survey.sizes) == {(20, 20), (24, 28)} and len(survey.sizes) == 36
    assert dict(survey.formats) == {"PNG": 18, "JPEG": 18}
    assert not survey.same_size and common_side(survey) == 20  # the smallest shorter side
    splits = carve_folder_splits(listing, val_size=6, seed=0, test_limit=10)
    assert {k: len(v[0]) for k, v in splits.items()} == {"train": 18, "val": 6, "test": 10}
    assert sorted(splits["train"][0] + splits["val"][0]) == sorted(listing.train[0])


def test_an_all_greyscale_tree_is_one_channel_and_one_size_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "grey"
    write_image_tree(root, train_per_class=3, test_per_class=2, sizes=((18, 26),), all_grey=True)
    listing = scan_folder(root)
    survey = inspect_images(listing)
    assert survey.channels == 1 and survey.same_size and common_side(survey) == 0
    images = read_images(listing.root, listing.train[0], survey.channels)
    assert images.shape == (9, 1, 18, 26) and images.dtype == torch.uint8  # kept as they are, not square
    means = {label: images[torch.tensor(listing.train[1]) == label].float().mean().item() for label in range(3)}
    assert means[0] < 90 < means[1] and 70 < means[2] < 140  # dark, light, red's luminance (~96)


def test_cifar_style_decodes_at_one_size_and_writes_tensor_prepared_data(tree, tmp_path: Path) -> None:
    root, _ = tree
    listing = scan_folder(root)
    survey = inspect_images(listing)
    carved = carve_folder_splits(listing, val_size=6, seed=0)
    splits = read_image_splits(listing.root, carved, survey.channels, common_side(survey))
    assert splits["train"].images.shape == (18, 3, 20, 20) and splits["test"].images.shape == (12, 3, 20, 20)
    red = splits["train"].images[splits["train"].labels == 2].float().mean(dim=(0, 2, 3))
    dark = splits["train"].images[splits["train"].labels == 0].float()
    assert red[0] > 150 > 80 > red[1]  # red stays red
    assert torch.equal(dark[:, 0], dark[:, 1]) and torch.equal(dark[:, 1], dark[:, 2])  # grey: R = G = B
    meta = write_prepared(splits, listing, "folder", tmp_path / "prepared", root=listing.root)
    assert (meta.kind, meta.shape, meta.classes) == ("tensor", [3, 20, 20], ["dark", "light", "red"])
    assert meta.dataset == "flowers" and load_meta(tmp_path / "prepared") == meta
    pixels = splits["train"].images.double() / 255
    assert meta.mean == [round(v, 6) for v in pixels.mean(dim=(0, 2, 3)).tolist()]


def test_imagenet_style_reads_greyscale_batches_with_one_channel(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "raw" / "grey"
    write_image_tree(root, train_per_class=4, test_per_class=2, all_grey=True)
    listing = scan_folder(root)
    survey = inspect_images(listing)
    check_streamable(survey, root)
    meta = write_folder_prepared(carve_folder_splits(listing, 3, seed=0), listing.classes, "folder", listing.root,
                                 24, 16, listing.raw_md5, tmp_path / "prepared", channels=survey.channels)
    assert meta.shape == [1, 16, 16] and meta.kind == "folder" and meta.dataset == "grey"
    assert meta.mean == [round(sum(IMAGENET_MEAN) / 3, 6)] and meta.std == [round(sum(IMAGENET_STD) / 3, 6)]
    train = load_split(tmp_path / "prepared", "train", meta)
    assert train.channels == 1 and train.images.shape == (9, 1, 16, 16)
    x, y = next(batches(train, 4, Normalize(meta.mean, meta.std, torch.device("cpu")),
                        generator=torch.Generator().manual_seed(0), shuffle=True, flip=True))
    assert x.shape == (4, 1, 16, 16) and y.shape == (4,)
    assert train.images[0:2].shape == (2, 1, 16, 16)


def test_imagenet_style_refuses_formats_its_decoder_cannot_read(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "bmp"
    write_image_tree(root, train_per_class=2, test_per_class=1)
    Image.new("RGB", (20, 20), (200, 50, 50)).save(root / "test" / "red" / "extra.bmp")
    survey = inspect_images(scan_folder(root))
    assert survey.formats["BMP"] == 1
    with pytest.raises(BadDataError, match=r"holds 1 BMP image\(s\), which data.transforms: imagenet cannot decode"):
        check_streamable(survey, root)


# ----------------------------------------------------------------------------------------------------------
# refusals: one line naming the file or folder


def test_an_empty_class_folder_is_refused_by_name(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image_tree(root, train_per_class=2, test_per_class=1)
    for f in (root / "test" / "light").iterdir():
        f.unlink()
    (root / "test" / "light" / ".DS_Store").write_bytes(b"x")  # hidden: still empty
    assert f"the class folder {root / 'test' / 'light'} holds no image" in refusal(root)


def test_a_missing_test_or_train_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image_tree(root, train_per_class=2, test_per_class=1)
    (root / "test").rename(root / "val")
    assert f"{root / 'test'}/ is missing" in refusal(root)
    (root / "val").rename(root / "test")
    (root / "train").rename(root / "training")
    assert f"{root / 'train'}/ is missing" in refusal(root)
    with pytest.raises(DataSourceError, match="does not exist"):
        scan_folder(tmp_path / "nowhere")


@pytest.mark.parametrize(("name", "content"), [("notes.txt", b"my notes\n"), ("fake.png", b"not a png at all")])
def test_a_file_that_is_not_an_image_is_refused_by_name(tmp_path: Path, name: str, content: bytes) -> None:
    root = tmp_path / "pets"
    write_image_tree(root, train_per_class=2, test_per_class=1)
    (root / "train" / "red" / name).write_bytes(content)
    message = refusal(root)
    assert f"{root / 'train' / 'red' / name} is not an image PIL can read" in message


def test_test_classes_that_differ_from_train_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image_tree(root, train_per_class=2, test_per_class=1)
    (root / "test" / "red").rename(root / "test" / "blue")
    message = refusal(root)
    assert f"{root / 'test'} does not hold train's classes (1 missing, e.g. ['red']; 1 not in train, e.g. " \
           "['blue'])" in message


# ----------------------------------------------------------------------------------------------------------
# names


def test_a_folder_source_is_named_by_its_folder_in_the_registry() -> None:
    assert dataset_name("folder", "data/raw/flowers") == "flowers"
    assert dataset_name("folder", "data/raw/flowers/") == "flowers"
    assert dataset_name("cifar10", "data/raw/cifar10") == "cifar10"
    assert registry_name(dataset_name("folder", "data/raw/flowers"), 32) == "blockdrop-flowers-resnet32"
    assert registry_name("fashion-mnist", 32) == "blockdrop-fashion-mnist-resnet32"  # unchanged
    assert registry_name("My Photos: été", 20) == "blockdrop-My-Photos-ete-resnet20"
    assert registry_name("..", 20) == "blockdrop-folder-resnet20"


def test_a_greyscale_folder_is_refused_for_the_rgb_resnet101() -> None:
    zero = {"crop_padding": 0}
    params = parse_params({
        "data": {"source": "folder", "raw": "data/raw/xrays", "transforms": "imagenet", "resize": 40, "image_size": 32},
        "model": {"depth": 101, "weights": "models/pretrained/resnet101-63fe2227.pth"},
        "pretrain": {"crop_size": 0, **zero}, "curriculum": zero, "finetune": zero,
    })
    sizes = {"train": 100, "val": 10, "test": 20}
    with pytest.raises(ParamsError, match=r"^model\.depth: the ResNet-101 takes RGB images, the prepared data has 1"):
        check_data_fit(params, "pretrain", [1, 32, 32], sizes)
    check_data_fit(params, "pretrain", [3, 32, 32], sizes)
