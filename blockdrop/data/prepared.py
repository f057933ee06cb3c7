"""The prepared dataset on disk: one uint8 tensor file per split plus ``meta.json``.

``prepare`` writes it once; every later stage loads whole splits into memory (Fashion-MNIST's 60k
images are 47 MB as uint8) and slices batches out of them, so no stage runs per-image Python code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from blockdrop.data.sources import RawData

__all__ = ["SPLITS", "Meta", "Split", "load_meta", "load_split", "split_train_val", "write_prepared"]

SPLITS = ("train", "val", "test")


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def data_sha256(self) -> str:
        """One digest for the whole prepared dataset (the MLflow tag ``data_sha256``)."""
        joined = "".join(f"{k}:{v};" for k, v in sorted(self.sha256.items()))
        return hashlib.sha256(joined.encode()).hexdigest()


def split_train_val(raw: RawData, val_size: int, seed: int, train_limit: int = 0, test_limit: int = 0
                    ) -> dict[str, Split]:
    """Carve ``val_size`` images out of train with a permutation fixed by ``seed``; optionally keep only
    ``train_limit`` of the rest and the first ``test_limit`` test images (0 keeps all)."""
    n = len(raw.train_labels)
    if val_size >= n:
        raise ValueError(f"data.val_size={val_size} leaves no training images (train has {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx, val_idx = perm[: n - val_size], perm[n - val_size :]
    if train_limit:
        train_idx = train_idx[:train_limit]
    train_idx, val_idx = train_idx.sort().values, val_idx.sort().values
    test = slice(0, test_limit or None)
    return {
        "train": Split(raw.train_images[train_idx], raw.train_labels[train_idx]),
        "val": Split(raw.train_images[val_idx], raw.train_labels[val_idx]),
        "test": Split(raw.test_images[test], raw.test_labels[test]),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_prepared(splits: dict[str, Split], raw: RawData, source: str, out_dir: Path) -> Meta:
    """Write ``<split>.pt`` for each split and ``meta.json``; return the meta."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, split in splits.items():
        path = out_dir / f"{name}.pt"
        torch.save({"images": split.images.contiguous(), "labels": split.labels.contiguous()}, path)
        digests[path.name] = _sha256(path)
    pixels = splits["train"].images.double().div_(255)
    meta = Meta(
        source=source,
        classes=raw.classes,
        shape=list(splits["train"].images.shape[1:]),
        mean=[round(v, 6) for v in pixels.mean(dim=(0, 2, 3)).tolist()],
        std=[round(v, 6) for v in pixels.std(dim=(0, 2, 3)).tolist()],
        sizes={k: len(v) for k, v in splits.items()},
        sha256=digests,
    )
    (out_dir / "meta.json").write_text(json.dumps(meta.__dict__, indent=2) + "\n")
    return meta


def load_meta(data_dir: str | Path) -> Meta:
    return Meta(**json.loads((Path(data_dir) / "meta.json").read_text()))


def load_split(data_dir: str | Path, name: str) -> Split:
    path = Path(data_dir) / f"{name}.pt"
    try:
        blob = torch.load(path, weights_only=True)
        return Split(blob["images"], blob["labels"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run the prepare stage (dvc repro prepare)") from None
    except Exception as e:
        raise RuntimeError(f"{path} is unreadable or corrupted ({type(e).__name__}: {e})") from None
