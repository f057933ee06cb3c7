"""Prefect flow ``blockdrop-sweep``: every setting of ``sweep.grid`` as a DVC experiment, compared in one place.

``make sweep`` (``python -m orchestration sweep``). The grid is ``sweep.grid`` in params.yaml, dotted keys to
lists of values (``{finetune.penalty: [1, 2, 3.4], seed: [0, 1]}``), or ``--set key=v1,v2`` on the command line.
Every combination is one DVC experiment named after its values (``sweep-penalty-2``), queued with
``dvc exp run --queue -S ...`` and run by ``sweep.workers`` DVC queue workers (``dvc queue start -j N``):

* Stages a setting does not change come from DVC's cache (a penalty sweep trains no backbone and no
  curriculum policy); an experiment that already exists on this commit with the same values is not run again,
  so a second run of the same sweep queues nothing.
* Every stage run lands in MLflow under one parent run ``blockdrop-sweep``, tagged ``dvc_exp`` (the
  experiment) and ``sweep``; each ``evaluate`` run carries every param its numbers depend on, so one MLflow
  table has penalty, seed ... against accuracy, blocks, FLOPs and speedup.
* A failed experiment is queued again ``sweep.retries`` times; one that still fails is reported (with the tail
  of its log) and does not stop the others. The flow fails at the end if any setting is missing.
* ``reports/sweep/`` (``orchestration.sweep_results``): the parent run logs its tables and figure, and the
  report stage shows them (``dvc repro`` after the sweep; the flow does it when nothing else is stale).

The grid's settings are ``orchestration.grid``'s, the queue is driven by ``orchestration.dvc_queue``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from blockdrop import tracking
from blockdrop.config import Params, ParamsError, load_params, parse_params, refuse
from blockdrop.project import project_root
from orchestration.api import on_local_server
from orchestration.dvc_queue import experiments_on_head, git, queue_env, run_experiments
from orchestration.grid import expand
from orchestration.stages import PipelineBusyError, flow_lock
from orchestration.sweep_results import load_experiment, matches, same_results, write_results

__all__ = ["OUT", "SWEEP", "main", "refresh_report", "sweep_flow", "sweep_params"]

SWEEP = "blockdrop-sweep"
OUT = Path("reports/sweep")


def sweep_params(root: Path, grid: dict[str, list[Any]] | None = None) -> Params:
    """params.yaml, with ``grid`` (``--set``) in place of ``sweep.grid``, validated; ParamsError if invalid."""
    params = load_params(root / "params.yaml", exit_on_error=False)
    if grid:
        raw = params.model_dump()
        raw["sweep"]["grid"] = grid
        params = parse_params(raw)
    if not params.sweep.grid:
        raise ParamsError("sweep.grid: empty; give dotted keys and their values in params.yaml, or --set key=v1,v2")
    return params


@flow(name=SWEEP, log_prints=True)
def sweep_flow(grid: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """Run every setting of ``grid`` (default ``sweep.grid``) as a DVC experiment; write ``reports/sweep``."""
    logger = get_run_logger()
    root = project_root()
    params = sweep_params(root, grid)
    s = params.sweep
    settings = expand(s.grid, s.name)
    t0 = time.perf_counter()
    with flow_lock(root), tracking.parent_run(SWEEP, params) as run_id:
        parent = tracking.open_run(run_id)
        parent.log_params({"sweep.grid": json.dumps(s.grid), "sweep.workers": s.workers, "sweep.retries": s.retries,
                           "sweep.settings": len(settings)})
        existing = experiments_on_head(root)
        cached = [x for x in settings if x.name in existing and matches(root, existing[x.name], x)]
        todo = [x for x in settings if x not in cached]
        logger.info("%d settings: %d already done on this commit, %d to run on %d workers", len(settings),
                    len(cached), len(todo), s.workers)
        results = {x.name: {"status": "Cached", "attempts": 0, "log": ""} for x in cached}
        if todo:
            results |= run_experiments(str(root), todo, s.workers, s.retries, run_id, s.name)
        existing = experiments_on_head(root)
        done = [x for x in settings if results[x.name]["status"] in ("Cached", "Success") and x.name in existing]
        experiments = [load_experiment(root, x, existing[x.name]) for x in done]
        runs = tracking.latest_stage_runs("evaluate", [x.name for x in done])
        links = tracking.ui_links(run_id, list(runs.values()))
        wall = time.perf_counter() - t0
        summary = {"grid": s.grid, "workers": s.workers, "baseline": git(root, "rev-parse", "HEAD").strip(),
                   "parent_run_id": run_id, "wall_seconds": round(wall, 1), "mlflow": links,
                   "ran": sum(r["status"] == "Success" for r in results.values()),
                   "experiments": {x.name: {"values": dict(x.values), "commit": existing.get(x.name),
                                            "evaluate_run_id": runs.get(x.name), **results[x.name]}
                                   for x in settings}}
        if same_results(root / OUT, summary):  # a rerun that ran nothing: leave the files (and the report) be
            paths = [p for p in sorted((root / OUT).iterdir()) if p.name != "README.md"]
            logger.info("%s already holds these experiments' results: left as they are", OUT)
        else:
            paths = write_results(root / OUT, experiments, summary, f"{params.report.title}: sweep over "
                                  f"{', '.join(s.grid)}", params.analyze.dpi)
        parent.log_artifacts(paths)
        counts = {k: sum(r["status"] == k for r in results.values()) for k in ("Cached", "Success", "Failed")}
        parent.log_metrics({"sweep": {"wall_seconds": wall, "settings_cached": counts["Cached"],
                                      "settings_ran": counts["Success"], "settings_failed": counts["Failed"]}})
        parent.set_tags({"sweep": s.name, "sweep.failed": ", ".join(n for n, r in results.items()
                                                                    if r["status"] == "Failed") or "none"})
        report = refresh_report(root, run_id, s.name)
        logger.info(report)
    failed = [n for n, r in results.items() if r["status"] == "Failed"]
    return {"parent_run_id": run_id, "results": results, "links": links, "wall_seconds": wall,
            "failed": failed, "outputs": [str(p) for p in paths], "report": report}


def refresh_report(root: Path, parent_run_id: str, sweep: str) -> str:
    """Rerun the report stage (it reads ``reports/sweep``) when it is the only stale stage; else say why not."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stale = set(repo.status())
        if stale - {"report"}:
            return f"not updating reports/report.html: {', '.join(sorted(stale))} are stale (run dvc repro)"
        if stale:
            repo.reproduce("report", single_item=True, run_env=queue_env(parent_run_id, sweep))
            return "reports/report.html updated (dvc repro report)"
    return "reports/report.html is up to date"


def main(grid: dict[str, list[Any]] | None = None) -> int:
    """Run the sweep and print where its results are; the exit code says whether every setting finished."""
    root = project_root()
    try:
        sweep_params(root, grid)  # bad params: exit 2 now, before any server or run starts
    except ParamsError as error:
        raise refuse(error) from None
    try:
        with flow_lock(root):
            result = on_local_server(lambda: sweep_flow(grid=grid))
    except PipelineBusyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, r in result["results"].items():
        print(f"  {name}: {r['status'].lower()}" + (f" after {r['attempts']} attempts" if r["attempts"] > 1 else ""))
    print(f"wall time {result['wall_seconds']:.0f} s; results in {OUT}/ (settings.csv, tradeoff.png, speedup.png)")
    print(result["report"])
    print(f"MLflow (make ui): parent run {result['links']['parent']}\n"
          f"  settings side by side: {result['links']['compare']}")
    if result["failed"]:
        print(f"error: {len(result['failed'])} settings failed after their retries: {', '.join(result['failed'])} "
              f"(dvc queue logs <name>)", file=sys.stderr)
        return 1
    return 0
