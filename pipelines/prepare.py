"""DVC stage ``prepare``: raw dataset -> uint8 tensors for train / val / test plus meta.json."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from blockdrop import stage, tracking
from blockdrop.data import load_source, split_train_val, write_prepared
from blockdrop.files import fsync_dir

log = logging.getLogger("blockdrop.prepare")


def main() -> None:
    ctx = stage.start("prepare")
    data = ctx.params.data
    with stage.failures_reported("prepare"):
        raw = load_source(data.source, data.raw_dir, data.verify_checksums)  # md5 of the raw files checked
        log.info("read %s from %s: %d train, %d test images of shape %s", data.source, raw.origin,
                 len(raw.train_labels), len(raw.test_labels), tuple(raw.train_images.shape[1:]))
        # Sizes that do not fit the raw data exit 2 here, before the MLflow run is opened.
        stage.check_fit(ctx, tuple(raw.train_images.shape[1:]),
                        {"train": len(raw.train_labels), "test": len(raw.test_labels)})
    with stage.failures_reported("prepare"), tracking.stage_run("prepare", ctx.params) as run:
        splits = split_train_val(raw, data.val_size, ctx.params.seed, data.train_limit, data.test_limit)
        # Write beside the real folder, then swap it in: a failure never leaves a half-written dataset.
        tmp = Path(f"{stage.DATA_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        meta = write_prepared(splits, raw, data.source, tmp)
        shutil.rmtree(stage.DATA_DIR, ignore_errors=True)
        tmp.rename(stage.DATA_DIR)
        fsync_dir(stage.DATA_DIR.parent)  # the files were flushed before the rename; now the rename itself
        run.set_tags({"data_sha256": meta.data_sha256})  # known only now that the files exist
        run.log_metrics({"data": {"classes": meta.num_classes, **{f"{k}_images": n for k, n in meta.sizes.items()}}})
        run.log_artifacts([stage.DATA_DIR / "meta.json"])
        log.info("wrote %s (%s)", stage.DATA_DIR, ", ".join(f"{k} {v}" for k, v in meta.sizes.items()))

if __name__ == "__main__":
    main()
