"""DVC stage ``prepare``: the raw files in ``data.raw`` -> uint8 tensors for train / val / test plus meta.json.

``data.raw`` is the stage's DVC dependency (dvc.yaml), so the data read here is the data DVC versions.
ImageNet-style data (``data.transforms: imagenet``) stays in its folders: the splits written are indexes of its
image files. A folder of your own (``data.source: folder``) is inspected file by file first: its channels and
sizes come from the images, and a tree that breaks the layout's rules is refused (exit 2, one line).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from blockdrop import stage, tracking
from blockdrop.data import (
    FolderListing,
    ImageSurvey,
    Meta,
    carve_folder_splits,
    check_streamable,
    common_side,
    inspect_images,
    load_source,
    read_image_splits,
    scan_folder,
    scan_imagenet,
    split_train_val,
    write_folder_prepared,
    write_prepared,
)
from blockdrop.files import fsync_dir

log = logging.getLogger("blockdrop.prepare")


def read_tensors(ctx: stage.StageContext) -> Callable[[Path], Meta]:
    """Read Fashion-MNIST / CIFAR into memory; return the writer of its prepared splits."""
    data = ctx.params.data
    if data.source == "folder":
        return read_image_tensors(ctx)
    raw = load_source(data.source, data.raw, data.verify_checksums)  # md5 of the raw files checked
    log.info("read %s from %s: %d train, %d test images of shape %s", data.source, raw.origin,
             len(raw.train_labels), len(raw.test_labels), tuple(raw.train_images.shape[1:]))
    # Sizes that do not fit the raw data exit 2 here, before the MLflow run is opened.
    stage.check_fit(ctx, tuple(raw.train_images.shape[1:]),
                    {"train": len(raw.train_labels), "test": len(raw.test_labels)})

    def write(out: Path) -> Meta:
        splits = split_train_val(raw, data.val_size, ctx.params.seed, data.train_limit, data.test_limit)
        return write_prepared(splits, raw, data.source, out)

    return write


def list_folder(ctx: stage.StageContext) -> tuple[FolderListing, ImageSurvey]:
    """A folder of your own: its listing and channels, every file's header read (a non-image refused)."""
    listing = scan_folder(Path(ctx.params.data.raw))
    survey = inspect_images(listing)
    log.info("listed %s: %d classes %s, %d train, %d test images; %s; %d channel(s)", listing.root,
             len(listing.classes), listing.classes[:10], len(listing.train[0]), len(listing.test[0]),
             ", ".join(f"{n} {fmt}" for fmt, n in sorted(survey.formats.items())), survey.channels)
    if ctx.params.data.streamed:
        check_streamable(survey, listing.root)
    return listing, survey


def read_image_tensors(ctx: stage.StageContext) -> Callable[[Path], Meta]:
    """A folder of your own, cifar-style: every image decoded into memory at one size; return the writer."""
    data = ctx.params.data
    listing, survey = list_folder(ctx)
    side = common_side(survey)
    h, w = (side, side) if side else survey.sizes[0]
    if side:
        log.info("images of %d sizes: each resized (shorter side) and centre-cropped to %dx%d, the smallest "
                 "shorter side", len(set(survey.sizes)), side, side)
    else:
        log.info("every image is %dx%d: kept at that size", h, w)
    stage.check_fit(ctx, (survey.channels, h, w), {"train": len(listing.train[0]), "test": len(listing.test[0])})

    def write(out: Path) -> Meta:
        carved = carve_folder_splits(listing, data.val_size, ctx.params.seed, data.train_limit, data.test_limit)
        splits = read_image_splits(listing.root, carved, survey.channels, side)
        return write_prepared(splits, listing, data.source, out, root=listing.root)

    return write


def read_folders(ctx: stage.StageContext) -> Callable[[Path], Meta]:
    """List ImageNet's folders, or an imagenet-style folder of your own (the images are read by the later
    stages); return the writer of the indexes."""
    data = ctx.params.data
    if data.source == "folder":
        listing, survey = list_folder(ctx)
        channels = survey.channels
    else:
        listing, channels = scan_imagenet(Path(data.raw)), 3
        log.info("listed imagenet in %s: %d classes, %d train, %d val images", listing.root, len(listing.classes),
                 len(listing.train[0]), len(listing.test[0]))
    stage.check_fit(ctx, (channels, data.image_size, data.image_size),
                    {"train": len(listing.train[0]), "test": len(listing.test[0])})

    def write(out: Path) -> Meta:
        splits = carve_folder_splits(listing, data.val_size, ctx.params.seed, data.train_limit, data.test_limit)
        return write_folder_prepared(splits, listing.classes, data.source, listing.root, data.resize,
                                     data.image_size, listing.raw_md5, out, channels=channels)

    return write


def main() -> None:
    ctx = stage.start("prepare")
    data = ctx.params.data
    with stage.failures_reported("prepare"):
        write = (read_folders if data.streamed else read_tensors)(ctx)
    with stage.failures_reported("prepare"), tracking.stage_run("prepare", ctx.params) as run:
        # Write beside the real folder, then swap it in: a failure never leaves a half-written dataset.
        tmp = Path(f"{stage.DATA_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        meta = write(tmp)
        shutil.rmtree(stage.DATA_DIR, ignore_errors=True)
        tmp.rename(stage.DATA_DIR)
        fsync_dir(stage.DATA_DIR.parent)  # the files were flushed before the rename; now the rename itself
        run.set_tags({"data_sha256": meta.data_sha256})  # known only now that the files exist
        run.log_metrics({"data": {"classes": meta.num_classes, **{f"{k}_images": n for k, n in meta.sizes.items()}}})
        run.log_artifacts([stage.DATA_DIR / "meta.json"])
        log.info("wrote %s (%s)", stage.DATA_DIR, ", ".join(f"{k} {v}" for k, v in meta.sizes.items()))


if __name__ == "__main__":
    main()
