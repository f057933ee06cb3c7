"""MLflow, in one place: one run per DVC stage, named and tagged the same way everywhere.

A stage does::

    with tracking.stage_run("pretrain", params, data_sha256=meta.data_sha256) as run:
        run.log_epoch({"train/loss": loss}, step=epoch)
        run.log_metrics({"test": {"accuracy": 0.9}})      # -> "test/accuracy"
        run.log_artifacts(["reports/pretrain/metrics.json"])
        run.tag_outputs(["models/backbone.pt"])           # tag "dvc_md5:models/backbone.pt"

The run logs exactly the params the stage lists in ``dvc.yaml`` (dotted names, as in params.yaml), so
``dvc exp show`` and the MLflow comparison view have the same columns. This package and
``blockdrop/serving.py`` are the only library modules that import mlflow: the rest of the library stays usable
without a tracking server.

One job per module: :mod:`.store` (which store, reachable, prepared), :mod:`.lifecycle` (opening and ending
stage and flow runs), :mod:`.runs` (the handle a stage logs through), :mod:`.provenance` (params, tags and
dataset a run records), :mod:`.leases` (which process holds a run), :mod:`.stops` (SIGTERM as an exception),
:mod:`.costs` (what tracking costs a stage), :mod:`.registry` (registered models) and :mod:`.ui` (UI addresses).
"""

import os

# Set before mlflow is imported: it reads some of these at import time. setdefault, so the user's
# environment still wins. MLflow's HTTP defaults (7 retries, 120 s timeout each, exponential back-off)
# turn a server that dies mid-run into a ~20 minute hang; these bound it to about a minute and a half.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

# costs first: it times the import of mlflow.
from blockdrop.tracking.costs import TIMES_ENV  # noqa: I001
from blockdrop.lineage import dvc_md5
from blockdrop.tracking.lifecycle import PARENT_ENV, parent_run, stage_run
from blockdrop.tracking.provenance import SWEEP_ENV
from blockdrop.tracking.registry import (
    describe_version,
    download_run_file,
    find_version,
    get_alias_version,
    latest_version,
    load_registered_model,
    log_blockdrop_model,
    registry_name,
    set_alias,
    set_version_tags,
    version_info,
)
from blockdrop.tracking.runs import StageRun, latest_stage_runs, open_run
from blockdrop.tracking.store import TrackingUnavailable, repo_root, tracking_uri
from blockdrop.tracking.ui import ui_address, ui_links

__all__ = [
    "PARENT_ENV",
    "SWEEP_ENV",
    "TIMES_ENV",
    "StageRun",
    "TrackingUnavailable",
    "describe_version",
    "download_run_file",
    "dvc_md5",
    "find_version",
    "get_alias_version",
    "latest_stage_runs",
    "latest_version",
    "load_registered_model",
    "log_blockdrop_model",
    "open_run",
    "parent_run",
    "registry_name",
    "repo_root",
    "set_alias",
    "set_version_tags",
    "stage_run",
    "tracking_uri",
    "ui_address",
    "ui_links",
    "version_info",
]
