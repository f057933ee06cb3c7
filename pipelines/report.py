"""DVC stage ``report``: ``reports/report.md`` and a self-contained ``reports/report.html``."""

from __future__ import annotations

import logging
from pathlib import Path

from blockdrop import stage, tracking
from blockdrop.data import load_meta
from blockdrop.project import git_commit
from blockdrop.report import build_report, write_report

REPORTS = Path("reports")
PARAMS = Path("params.yaml")
log = logging.getLogger("blockdrop.report")


def main() -> None:
    ctx = stage.start("report")
    with stage.failures_reported("report"):
        meta = load_meta(stage.DATA_DIR)
        with tracking.stage_run("report", ctx.params, data_sha256=meta.data_sha256) as run:
            commit = git_commit()
            markdown, page = build_report(REPORTS, ctx.params, PARAMS.read_text(), commit)
            paths = write_report(REPORTS, markdown, page)
            log.info("wrote %s (%.1f MB) and %s, from commit %s", paths[1], paths[1].stat().st_size / 1e6,
                     paths[0], commit)
            run.log_artifacts(paths)


if __name__ == "__main__":
    main()
