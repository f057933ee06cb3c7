"""Datasets: raw sources, the prepared on-disk format, and in-memory batches."""

from blockdrop.data.batches import Normalize, batches, random_crop, random_flip
from blockdrop.data.prepared import (
    DataIntegrityError,
    Meta,
    Split,
    load_meta,
    load_split,
    split_train_val,
    write_prepared,
)
from blockdrop.data.sources import DataSourceError, RawData, load_source

__all__ = [
    "DataIntegrityError", "DataSourceError", "Meta", "Normalize", "RawData", "Split", "batches", "load_meta",
    "load_source", "load_split", "random_crop", "random_flip", "split_train_val", "write_prepared",
]
