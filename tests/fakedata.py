"""Writers of tiny datasets in the real on-disk formats (IDX for Fashion-MNIST, pickled batches in a
tar.gz for CIFAR), so the loaders are tested on the exact bytes torchvision reads, without the network.

Imported by the tests (``from fakedata import ...``); no fixtures here, so nothing is shared implicitly.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def idx_images(images: np.ndarray) -> bytes:
    """IDX3: magic 2051 (0x00000803: unsigned byte, 3 dims), then N, H, W as big-endian int32, then pixels."""
    n, h, w = images.shape
    return struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    """IDX1: magic 2049 (0x00000801: unsigned byte, 1 dim), then N as big-endian int32, then labels."""
    return struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def fake_fashion(n_train: int = 120, n_test: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }


def fashion_idx_files(data: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The four uncompressed idx files, by torchvision's names."""
    return dict(zip(FASHION_FILES, (idx_images(data["train_images"]), idx_labels(data["train_labels"]),
                                    idx_images(data["test_images"]), idx_labels(data["test_labels"])), strict=True))


def write_fashion(folder: Path, data: dict[str, np.ndarray], gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in fashion_idx_files(data).items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def cifar_images(n: int, seed: int) -> np.ndarray:
    """Random uint8 images in NCHW (N, 3, 32, 32)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def cifar_batch(images: np.ndarray, labels: list[int], label_key: str) -> bytes:
    """One batch file as the official python version holds it: a dict with ``data`` (N, 3072) uint8,
    each row the 1024 red, then 1024 green, then 1024 blue values of a row-major 32x32 image.

    The official files are Python 2 pickles whose str keys unpickle as str under torchvision's
    ``encoding="latin1"``; a Python 3 pickle with str keys reads back identically.
    """
    data = images.reshape(len(images), 3 * 32 * 32)
    return pickle.dumps({"batch_label": "fake", "data": data, label_key: list(labels)}, protocol=2)


def cifar_meta(names: list[str], key: str) -> bytes:
    return pickle.dumps({key: names}, protocol=2)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


class FakeCifar:
    """A tiny CIFAR-10 (two train batches of 6, a test batch of 4) or CIFAR-100 (one train file of 8,
    one test file of 4), with the md5 lists torchvision should check them against."""

    def __init__(self, hundred: bool = False, seed: int = 0) -> None:
        self.hundred = hundred
        if hundred:
            self.folder, self.filename, self.label_key = "cifar-100-python", "cifar-100-python.tar.gz", "fine_labels"
            self.classes = [f"fine{i}" for i in range(100)]
            meta_name, meta_key = "meta", "fine_label_names"
            train_parts = [("train", 8)]
            test_parts = [("test", 4)]
        else:
            self.folder, self.filename, self.label_key = "cifar-10-batches-py", "cifar-10-python.tar.gz", "labels"
            self.classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
            meta_name, meta_key = "batches.meta", "label_names"
            train_parts = [("data_batch_1", 6), ("data_batch_2", 6)]
            test_parts = [("test_batch", 4)]
        n_classes = len(self.classes)
        self.files: dict[str, bytes] = {}
        self.train_list, self.test_list = [], []
        images, labels = {"train": [], "test": []}, {"train": [], "test": []}
        for split, parts, listing in (("train", train_parts, self.train_list), ("test", test_parts, self.test_list)):
            for i, (name, n) in enumerate(parts):
                imgs = cifar_images(n, seed * 100 + len(self.files) + 7 * i + (50 if split == "test" else 0))
                labs = [(j * 7 + 3 * i + (1 if split == "test" else 0)) % n_classes for j in range(n)]
                blob = cifar_batch(imgs, labs, self.label_key)
                self.files[name] = blob
                listing.append([name, md5(blob)])
                images[split].append(imgs)
                labels[split].extend(labs)
        self.files[meta_name] = cifar_meta(self.classes, meta_key)
        self.meta = {"filename": meta_name, "key": meta_key, "md5": md5(self.files[meta_name])}
        self.train_images = np.concatenate(images["train"])
        self.test_images = np.concatenate(images["test"])
        self.train_labels, self.test_labels = labels["train"], labels["test"]
        self.archive = tar_gz({f"{self.folder}/{name}": blob for name, blob in self.files.items()})
        self.tgz_md5 = md5(self.archive)

    def write_archive(self, raw_dir: Path) -> Path:
        raw_dir.mkdir(parents=True, exist_ok=True)
        path = raw_dir / self.filename
        path.write_bytes(self.archive)
        return path

    def write_extracted(self, raw_dir: Path) -> Path:
        folder = raw_dir / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        for name, blob in self.files.items():
            (folder / name).write_bytes(blob)
        return folder

    def patch(self, monkeypatch, cls: type) -> None:
        """Make torchvision's ``cls`` (CIFAR10 or CIFAR100) expect these files' md5s, and never reach out."""
        monkeypatch.setattr(cls, "tgz_md5", self.tgz_md5)
        monkeypatch.setattr(cls, "train_list", self.train_list)
        monkeypatch.setattr(cls, "test_list", self.test_list)
        monkeypatch.setattr(cls, "meta", self.meta)
        monkeypatch.setattr(cls, "url", f"http://127.0.0.1:9/{self.filename}")


def fake_wnids(classes: int) -> list[str]:
    """WordNet-style class folder names, sorted as ImageNet's are (n + 8 digits)."""
    return [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]


def fake_photo(label: int, height: int, width: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """uint8 (C, H, W): a colour of the class, a gradient across the image and noise, so every crop differs."""
    base = np.array([40 + 50 * (label % 4), 200 - 40 * (label % 5), 60 + 30 * (label % 6)], dtype=np.float64)
    ramp = np.linspace(-40, 40, width)[None, None, :] + np.linspace(-20, 20, height)[None, :, None]
    pixels = base[:channels, None, None] + ramp + rng.normal(0, 15, (channels, height, width))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_imagefolder(root: Path, classes: int = 4, train_per_class: int = 12, val_per_class: int = 4,
                      seed: int = 0) -> dict[str, dict[str, int]]:
    """A tiny ILSVRC2012-style tree: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` of sizes 40 to
    90 px, encoded with torchvision's ``encode_jpeg``. Like the real one, it holds a greyscale JPEG (train, first
    class) and a PNG named .JPEG (val, last class). Returns ``{"train": {relative path: label}, "val": ...}``."""
    import torch
    from torchvision.io import encode_jpeg, encode_png

    rng = np.random.default_rng(seed)
    wnids = fake_wnids(classes)
    written: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for folder, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, wnid in enumerate(wnids):
            (root / folder / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(40, 91, 2))
                grey = folder == "train" and label == 0 and i == 0
                image = torch.from_numpy(fake_photo(label, h, w, rng, 1 if grey else 3))
                png = folder == "val" and label == classes - 1 and i == 0
                blob = encode_png(image) if png else encode_jpeg(image, quality=90)
                rel = f"{folder}/{wnid}/{wnid}_{i}.JPEG"
                (root / rel).write_bytes(blob.numpy().tobytes())
                written[folder][rel] = label
    return written


TREE_CLASSES = ("dark", "light", "red")  # what the images of write_image_tree show, by class


def tree_image(label: int, height: int, width: int, rng: np.random.Generator, grey: bool) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) for class ``label`` of :data:`TREE_CLASSES`: dark grey, light grey, or red,
    under noise (the colour and brightness say the class: a tiny ResNet learns it in an epoch or two)."""
    level = {0: (60, 60, 60), 1: (190, 190, 190), 2: (200, 50, 50)}[label]
    pixels = np.array(level, dtype=np.float64)[None, None, :] + rng.normal(0, 14, (height, width, 3))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return pixels.mean(axis=2).astype(np.uint8) if grey else pixels


def write_image_tree(root: Path, train_per_class: int = 8, test_per_class: int = 4,
                     sizes: tuple[tuple[int, int], ...] = ((20, 20), (24, 28)), all_grey: bool = False,
                     seed: int = 0) -> dict[str, dict[str, int]]:
    """A ``data.source: folder`` tree: ``root/train/<class>/*`` and ``root/test/<class>/*`` for the three
    :data:`TREE_CLASSES`, alternating PNG and JPEG files and the (height, width) ``sizes``. The grey classes are
    saved as greyscale (PIL mode L) images and red as RGB, so the tree is 3-channel data holding greyscale
    images; ``all_grey`` saves red as greyscale too (1-channel data). A ``.DS_Store`` in one class folder must be
    skipped. Returns ``{"train": {relative path: label}, "test": ...}``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for folder, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(TREE_CLASSES):
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                pixels = tree_image(label, h, w, rng, grey=all_grey or label < 2)
                ext = ("png", "jpg")[(i // len(sizes)) % 2]  # every size in both formats
                rel = f"{folder}/{name}/{name}_{i:03d}.{ext}"
                Image.fromarray(pixels).save(root / rel, quality=95)
                written[folder][rel] = label
    (root / "train" / TREE_CLASSES[0] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return written
