"""Opening and ending runs: one run per DVC stage (:func:`stage_run`), and one per flow (:func:`parent_run`)
that the stage runs it starts, even in subprocesses, nest under.

A stage run ends FINISHED when its block completes, FAILED when the block raises, and KILLED when the stage is
stopped (SIGTERM, Ctrl-C) or its process died (then marked by the next start, see :mod:`.leases`): no run stays
RUNNING once its process is gone, even when DVC later finds the stage up to date and never runs it again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import mlflow
from mlflow.entities import Metric, Param

from blockdrop.config import Params
from blockdrop.tracking.costs import clock, cost_metrics, record_times
from blockdrop.tracking.leases import lease_path, take_over_lease, write_lease
from blockdrop.tracking.provenance import base_tags, log_prepared_input, stage_params, stage_tags
from blockdrop.tracking.runs import StageRun, metric_items
from blockdrop.tracking.stops import StageStopped, exit_code, sigterm_raises, stop_signal
from blockdrop.tracking.store import TrackingUnavailable, connect, no_http_retries, server_errors, unreachable

__all__ = ["PARENT_ENV", "parent_run", "stage_run"]

PARENT_ENV = "BLOCKDROP_PARENT_RUN_ID"  # set by the Prefect flow; every stage run nests under it
log = logging.getLogger(__name__)


@contextmanager
def stage_run(stage: str, params: Params, data_sha256: str | None = None) -> Iterator[StageRun]:
    """One MLflow run named ``stage``, nested under ``$BLOCKDROP_PARENT_RUN_ID`` when the flow set it.

    While the run is open, a lease ``checkpoints/<stage>.run.json`` names it; one left behind by a killed
    process gets its run marked KILLED by the next start, whose run then knows it as ``previous_run_id`` (see
    :meth:`StageRun.mark_resumed`). An exception inside the block marks the run FAILED and propagates.

    A stop (SIGTERM, raised as :class:`~.stops.StageStopped` within the block, or Ctrl-C) ends the run KILLED
    and exits the process with 143 or 130 and one log line; its lease stays, so a rerun that resumes names it.

    Raises :class:`TrackingUnavailable` before any work if the server is down, and if it goes away during the
    block (a tracking call fails and ``/health`` no longer answers): the run is then left RUNNING on a server
    that cannot be told otherwise, and its lease stays for the next start to mark it KILLED.
    """
    with sigterm_raises():
        run_id = None
        try:
            with _open_stage_run(stage, params, data_sha256) as run:
                run_id = run.run_id
                yield run
        except (KeyboardInterrupt, StageStopped) as stop:
            code = exit_code(stop)
            ended = f"its run {run_id} ended KILLED" if run_id else "while its run was being opened"
            log.warning("stage %s: stopped by %s, %s; exiting %d", stage, stop_signal(stop).name, ended, code)
            raise SystemExit(code) from None


@contextmanager
def _open_stage_run(stage: str, params: Params, data_sha256: str | None) -> Iterator[StageRun]:
    """:func:`stage_run` less the handling of stop signals: the run, ended with the status its block earned."""
    t0 = time.perf_counter()
    with clock():
        client, experiment_id = connect(params)
        previous = take_over_lease(stage, client)
        flat, keys, upstream = stage_params(stage, params)
        # mlflow 3 accepts a parent that is not active in this process: it checks the run exists and sets
        # the mlflow.parentRunId tag. nested=True covers the in-process case (a caller's run is active).
        active = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=stage,
            parent_run_id=os.environ.get(PARENT_ENV) or None,
            nested=mlflow.active_run() is not None,
            tags=stage_tags(stage, params, keys, upstream, data_sha256),
            log_system_metrics=True,  # CPU/GPU/memory every 10 s; mlflow logs and swallows monitor errors
        )
    run = StageRun(client, active.info.run_id, previous)
    status, gone = "FAILED", None
    try:
        try:
            with clock():  # inside the try: a stop or an error from here on still ends the run
                write_lease(stage, run.run_id)
                log_prepared_input(stage, params)
                if flat:
                    client.log_batch(run.run_id, params=[Param(k, str(v)) for k, v in flat.items()])
            yield run
            status = "FINISHED"
        except (KeyboardInterrupt, StageStopped):
            status = "KILLED"
            raise
        except TrackingUnavailable as error:
            gone = error
            raise
        except server_errors() as error:
            # One line naming the URI, not MLflow's traceback through urllib3, when the server went away.
            if (gone := unreachable(run.uri)) is None:
                raise
            raise gone from error
        finally:
            current = mlflow.active_run()
            if current is not None and current.info.run_id == run.run_id:  # the block may have ended it
                if gone is None and status != "KILLED":
                    with clock():
                        _log_own_cost(run)
                        mlflow.end_run(status)
                else:
                    # One call, failing at once if the server is gone: a stopped stage has seconds to exit
                    # (blockdrop.supervision ends it outright after those), and a lease left behind still gets
                    # the run marked KILLED by the next start.
                    with no_http_retries(), suppress(*server_errors()):
                        mlflow.end_run(status)
    except server_errors() as error:  # ending the run: the server went away after the block's last call
        if (gone := unreachable(run.uri)) is None:
            raise
        raise gone from error
    finally:
        if status == "FINISHED" and gone is None:  # a failed run's lease stays: the rerun that resumes names it
            lease_path(stage).unlink(missing_ok=True)
        record_times(stage, time.perf_counter() - t0)


def _log_own_cost(run: StageRun) -> None:
    """What tracking cost this stage (:func:`~.costs.cost_metrics`), as ``tracking/*`` metrics of its run."""
    run.client.log_batch(run.run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0)
                                              for k, v in metric_items({"tracking": cost_metrics()})])


@contextmanager
def parent_run(name: str, params: Params) -> Iterator[str]:
    """A run for a whole flow; stage runs started (even in subprocesses) inside it nest under it.

    Itself nested under the active run, or under ``$BLOCKDROP_PARENT_RUN_ID``: the retrain flow's run holds
    the pipeline flow's run, which holds the stage runs.
    """
    _, experiment_id = connect(params)
    previous = os.environ.get(PARENT_ENV)
    outer = mlflow.active_run()
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=name,
        tags=base_tags(name),
        nested=outer is not None,
        parent_run_id=None if outer is not None else previous or None,
    ) as active:
        os.environ[PARENT_ENV] = active.info.run_id  # inherited by `dvc repro` and its stages
        try:
            yield active.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous
