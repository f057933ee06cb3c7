"""The handle a stage logs through (:class:`StageRun`), and handles on runs that already exist.

Every call names its run explicitly (no global state), so a flow can log to its parent run while stage runs
open and close in other processes.
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from blockdrop.lineage import dvc_md5
from blockdrop.tracking.costs import timed
from blockdrop.tracking.store import client, tracking_uri, unreachable

__all__ = ["EPOCH_LOG_ATTEMPTS", "EPOCH_LOG_BACKOFF_S", "StageRun", "latest_stage_runs", "metric_items", "open_run"]

EPOCH_LOG_ATTEMPTS, EPOCH_LOG_BACKOFF_S = 4, 0.5  # 0.5 + 1 + 2 s of waiting before an epoch's point is dropped
log = logging.getLogger(__name__)


def metric_items(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``{"test": {"accuracy": .9}}`` -> ``("test/accuracy", .9)``; non-numbers (lists, strings) skipped."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from metric_items(value, f"{prefix}{key}/")
        elif isinstance(value, numbers.Real):
            yield f"{prefix}{key}", float(value)


class StageRun:
    """The handle a stage logs through; every call names the run explicitly (no global state)."""

    def __init__(self, client: MlflowClient, run_id: str, previous_run_id: str | None = None):
        self.client, self.run_id, self.uri = client, run_id, tracking_uri()
        self.previous_run_id = previous_run_id  # the stage's last run in this folder, if it did not finish

    @timed
    def mark_resumed(self, epoch: int) -> None:
        """Record that this run continues from the resume state saved after ``epoch`` epochs (and by which run:
        the stage's previous run in this folder, killed or failed, whose lease was left behind)."""
        tags = {"resumed": "true", "resumed_from_epoch": str(epoch)}
        if self.previous_run_id:
            tags["resumed_from_run"] = self.previous_run_id
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    @timed
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log (nested) metrics; nested keys are joined with "/"."""
        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, step or 0) for k, v in metric_items(metrics)]
        self.client.log_batch(self.run_id, metrics=batch)

    @timed
    def log_epoch(self, metrics: Mapping[str, Any], step: int) -> None:
        """One epoch's metrics, with the epoch as the step (so MLflow plots them as curves).

        A curve point is not worth a stage: a write that fails (a locked SQLite store, a server that
        blinks) is retried with back-off, then given up with a warning. A server still unreachable after the
        back-off is gone, not blinking: that raises :class:`TrackingUnavailable` and the stage stops (a rerun
        resumes from the last epoch's saved state) rather than train on with nothing recorded. The final
        metrics are not retried this way: losing those must fail the stage.
        """
        error: Exception | None = None
        for attempt in range(EPOCH_LOG_ATTEMPTS):
            if attempt:
                time.sleep(EPOCH_LOG_BACKOFF_S * 2 ** (attempt - 1))
                if unreachable(self.uri):
                    continue  # a health check costs nothing; a write to a dead server costs MLflow's retries
            try:
                self.log_metrics(metrics, step=step)
                return
            except MlflowException as e:
                error = e
        if gone := unreachable(self.uri):
            raise gone from None
        log.warning("epoch %d metrics not logged to run %s after %d attempts: %s", step, self.run_id,
                    EPOCH_LOG_ATTEMPTS, str(error).splitlines()[0][:200])

    @timed
    def log_artifacts(self, paths: Iterable[str | Path]) -> None:
        """Upload files or folders, keeping their relative folder (``reports/pretrain/metrics.json``)."""
        for path in map(Path, paths):
            inside = not path.is_absolute() and ".." not in path.parts
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.as_posix() if inside else path.name)
            else:
                folder = path.parent.as_posix() if inside and path.parent != Path(".") else None
                self.client.log_artifact(self.run_id, str(path), folder)

    @timed
    def tag_outputs(self, paths: Iterable[str | Path]) -> dict[str, str]:
        """Tag ``dvc_md5:<path>`` with the md5 DVC will record, linking this run to a ``dvc.lock``."""
        tags = {f"dvc_md5:{Path(p).as_posix()}": dvc_md5(p) for p in paths}
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        return tags

    @timed
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @timed
    def log_params(self, params: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    @timed
    def log_json(self, obj: Any, artifact_file: str) -> None:
        """``obj`` as a JSON artifact at ``artifact_file`` (e.g. ``"flow/stages.json"``)."""
        self.client.log_dict(self.run_id, obj, artifact_file)

    def lineage_tags(self, checkpoint: str | Path) -> dict[str, str]:
        """Tags that tie a registered version to DVC: the md5 DVC records for ``checkpoint``, and this run's
        git commit and params hash."""
        tags = self.client.get_run(self.run_id).data.tags
        return {"dvc_md5": dvc_md5(checkpoint), "git_commit": tags.get("git_commit", "unknown"),
                "params_sha256": tags.get("params_sha256", "unknown"), "run_id": self.run_id}


def open_run(run_id: str) -> StageRun:
    """A handle on an existing run (the flow's parent run, to record what its stages did)."""
    return StageRun(client(), run_id)


def latest_stage_runs(stage: str, dvc_exps: Iterable[str]) -> dict[str, str]:
    """``{experiment: run id}``: the latest FINISHED run of ``stage`` tagged with each DVC experiment name."""
    store = client()
    ids = [e.experiment_id for e in store.search_experiments()]
    found: dict[str, str] = {}
    for name in dvc_exps:
        runs = store.search_runs(ids, filter_string=f"tags.dvc_exp = '{name}' and tags.stage = '{stage}' and "
                                 "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                 max_results=1)
        if runs:
            found[name] = runs[0].info.run_id
    return found
