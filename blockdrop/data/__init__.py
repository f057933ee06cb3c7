"""Datasets: raw sources, the prepared on-disk format, in-memory batches and folder splits streamed from disk."""

from blockdrop.data.batches import Normalize, batches, random_crop, random_flip
from blockdrop.data.folder import FolderSplit
from blockdrop.data.imagenet import carve_folder_splits, scan_imagenet
from blockdrop.data.prepared import (
    DataIntegrityError,
    Meta,
    Split,
    load_meta,
    load_split,
    split_train_val,
    write_folder_prepared,
    write_prepared,
)
from blockdrop.data.sources import DataSourceError, RawData, load_source

__all__ = [
    "DataIntegrityError", "DataSourceError", "FolderSplit", "Meta", "Normalize", "RawData", "Split", "batches",
    "carve_folder_splits", "load_meta", "load_source", "load_split", "random_crop", "random_flip", "scan_imagenet",
    "split_train_val", "write_folder_prepared", "write_prepared",
]
