"""Datasets: raw sources, the prepared on-disk format, in-memory batches and folder splits streamed from disk."""

from blockdrop.data.batches import Normalize, batches, random_crop, random_flip
from blockdrop.data.folder import FolderSplit
from blockdrop.data.images import (
    ImageSurvey,
    check_streamable,
    common_side,
    inspect_images,
    read_image_splits,
    read_images,
)
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
from blockdrop.data.sources import BadDataError, DataSourceError, RawData, load_source
from blockdrop.data.tree import FolderListing, carve_folder_splits, scan_folder, scan_imagenet

__all__ = [
    "BadDataError", "DataIntegrityError", "DataSourceError", "FolderListing", "FolderSplit", "ImageSurvey", "Meta",
    "Normalize", "RawData", "Split", "batches", "carve_folder_splits", "check_streamable", "common_side",
    "inspect_images", "load_meta", "load_source", "load_split", "random_crop", "random_flip", "read_image_splits",
    "read_images", "scan_folder", "scan_imagenet", "split_train_val", "write_folder_prepared", "write_prepared",
]
