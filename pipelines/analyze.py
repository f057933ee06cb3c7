"""DVC stage ``analyze``: policies grouped by image, difficulty against compute, and the run's figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from blockdrop import stage, tracking
from blockdrop.analysis import read_history, read_per_image, run_analysis
from blockdrop.data import load_meta, load_split

PER_IMAGE = Path("data/evaluate/per_image.csv")
EVALUATE_METRICS = Path("reports/evaluate/metrics.json")
HISTORIES = {name: Path(f"reports/{name}/history.csv") for name in ("pretrain", "curriculum", "finetune")}
REPORTS = Path("reports/analyze")
log = logging.getLogger("blockdrop.analyze")


def main() -> None:
    ctx = stage.start("analyze")
    with stage.failures_reported("analyze"):
        meta = load_meta(stage.DATA_DIR)
        test = load_split(stage.DATA_DIR, "test")
        per_image = read_per_image(PER_IMAGE)
        if not EVALUATE_METRICS.exists():
            raise FileNotFoundError(f"{EVALUATE_METRICS} is missing: run the evaluate stage first")
        evaluate_metrics = json.loads(EVALUATE_METRICS.read_text())
        histories = {name: read_history(path) for name, path in HISTORIES.items()}
        with tracking.stage_run("analyze", ctx.params, data_sha256=meta.data_sha256) as run:
            # In-memory splits: the uint8 array. A folder split (ImageNet): a lazy view that decodes only the
            # images the figures show (its 50k test images would take 7.5 GB).
            metrics, written = run_analysis(per_image, test.images.numpy(), meta.classes, ctx.params.analyze,
                                            REPORTS, ctx.params.seed, evaluate_metrics, histories)
            log.info("wrote %d files under %s", len(written), REPORTS)
            run.log_metrics(metrics)
            run.log_artifacts([REPORTS / "metrics.json", REPORTS / "top_policies.csv", REPORTS / "block_usage.csv",
                               REPORTS / "accuracy_flops.csv", REPORTS / "figures"])


if __name__ == "__main__":
    main()
