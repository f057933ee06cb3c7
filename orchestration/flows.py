"""The Prefect flows ``blockdrop-pipeline`` and ``blockdrop-retrain`` over the DVC pipeline.

* ``blockdrop-pipeline``: opens a parent MLflow run, then runs every DVC stage as its own Prefect task
  (``stages.run_stage``), in the order DVC itself would (``stages.dag_order``). A stage DVC finds up to date
  is not run and is recorded as ``skipped`` on the parent run (tags ``stage.<name>``, metrics, and the
  artifact ``flow/stages.json``).
* ``blockdrop-retrain``: the pipeline as a subflow, then the registered version built from the
  ``models/blockdrop.pt`` in ``dvc.lock`` (its ``dvc_md5`` tag) against the ``champion`` on the same test
  split; ``champion`` moves only when ``blockdrop.promotion.decide`` says so, and only if nobody moved it
  meanwhile (compare-and-swap). Served on ``flow.cron`` by ``orchestration.schedule``.

Both hold the flow lock (``stages.flow_lock``) while they run. Run them with ``python -m orchestration run``
or ``retrain`` (``make flow``, ``make retrain``); prefect.yaml deploys them from this file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blockdrop import tracking
from blockdrop.config import Params, load_params
from blockdrop.project import project_root
from orchestration.stages import dag_order, flow_lock, run_stage

__all__ = ["PIPELINE", "RETRAIN", "compare_and_promote", "pipeline_flow", "retrain_flow"]

PIPELINE = "blockdrop-pipeline"
RETRAIN = "blockdrop-retrain"


def _record_stages(run: tracking.StageRun, results: list[dict[str, Any]]) -> None:
    counts = {s: sum(r["status"] == s for r in results) for s in ("ran", "skipped", "restored", "failed")}
    run.set_tags({f"stage.{r['stage']}": r["status"] for r in results})
    run.log_metrics({"flow": {f"stages_{k}": v for k, v in counts.items()},
                     "stage_seconds": {r["stage"]: r["seconds"] for r in results}})
    run.log_json({"stages": results, "counts": counts}, "flow/stages.json")


def _load(root: Path) -> Params:
    return load_params(root / "params.yaml", exit_on_error=False)  # ParamsError: fail now, one line


# ---------------------------------------------------------------------------------------------- flows


@flow(name=PIPELINE, log_prints=True)
def pipeline_flow(force: bool = False) -> dict[str, Any]:
    """Every DVC stage as a task, in DAG order, under one parent MLflow run.

    ``force``: run every stage even if DVC finds it up to date (``dvc repro --force``, one stage at a time).
    """
    logger = get_run_logger()
    root = project_root()
    params = _load(root)
    stages = dag_order(root)
    logger.info("stages in DAG order: %s", " -> ".join(stages))
    runner = run_stage.with_options(retries=params.flow.retries, retry_delay_seconds=params.flow.retry_delay_s)
    timeout = params.flow.task_timeout_s
    results: list[dict[str, Any]] = []
    with flow_lock(root), tracking.parent_run(PIPELINE, params) as run_id:
        parent = tracking.open_run(run_id)
        parent.log_params({"flow.force": force, "flow.retries": params.flow.retries, "flow.task_timeout_s": timeout})
        try:
            for stage in stages:  # one at a time: DVC locks the repository
                t0 = time.perf_counter()
                try:
                    result = runner(stage, str(root), force, timeout)
                except Exception:
                    results.append({"stage": stage, "status": "failed", "seconds": round(time.perf_counter() - t0, 3)})
                    raise
                results.append(result)
                parent.set_tags({f"stage.{stage}": result["status"]})
        finally:
            _record_stages(parent, results)
    return {"parent_run_id": run_id, "stages": results}


@task(name="compare-and-promote", cache_policy=NO_CACHE)
def compare_and_promote(root: str, params: Params) -> dict[str, Any]:
    """Score the version built from dvc.lock's ``models/blockdrop.pt`` and the champion on the test split;
    move ``champion`` (compare-and-swap) if it should."""
    from blockdrop.promotion import Decision, decide, load_version, locked_md5, promote, score_on_test, select_version

    logger = get_run_logger()
    name = tracking.registry_name(params.data.dataset, params.model.depth)
    # Not the alias `challenger`: a `dvc exp run` elsewhere may have registered (and aliased) another model.
    challenger = select_version(name, locked_md5(root))
    champion = tracking.get_alias_version(name, "champion")
    data_dir = Path(root) / "data" / "prepared"
    scores = {"challenger": score_on_test(load_version(name, challenger, root), data_dir)}
    if champion == challenger:
        scores["champion"] = scores["challenger"]
        decision = Decision(False, f"version {challenger} is already the champion", 0.0, 1.0)
    else:
        if champion is not None:
            scores["champion"] = score_on_test(load_version(name, champion, root), data_dir)
        decision = decide(scores["challenger"], scores.get("champion"), params.flow.accuracy_tolerance,
                          params.flow.require_flops_not_higher)
    if decision.promote:
        promote(name, challenger, expected=champion, root=root)  # ChampionChangedError if it moved meanwhile
    logger.info("%s: challenger v%s vs champion %s -> %s (%s)", name, challenger,
                f"v{champion}" if champion is not None else "none",
                "promoted" if decision.promote else "kept", decision.reason)
    return {"model": name, "challenger_version": challenger, "champion_version_before": champion,
            "champion_version": challenger if decision.promote else champion, "scores": scores,
            "decision": decision.as_dict(), "accuracy_tolerance": params.flow.accuracy_tolerance,
            "require_flops_not_higher": params.flow.require_flops_not_higher}


@flow(name=RETRAIN, log_prints=True)
def retrain_flow(force: bool = False) -> dict[str, Any]:
    """Reproduce the pipeline (a subflow), then promote its model to ``champion`` if it is not worse."""
    root = project_root()
    params = _load(root)
    with flow_lock(root), tracking.parent_run(RETRAIN, params) as run_id:
        parent = tracking.open_run(run_id)
        pipeline = pipeline_flow(force=force)
        result = compare_and_promote(str(root), params)
        promoted = result["decision"]["promote"]
        parent.log_params({"challenger/version": result["challenger_version"],
                           "champion/version": result["champion_version_before"] or "none",
                           "flow.accuracy_tolerance": params.flow.accuracy_tolerance,
                           "flow.require_flops_not_higher": params.flow.require_flops_not_higher})
        parent.log_metrics({role: {k: v for k, v in s.items() if k in ("accuracy", "flops_mean", "blocks_mean")}
                            for role, s in result["scores"].items()})
        parent.set_tags({"promotion": "promoted" if promoted else "kept",
                         "promotion.reason": result["decision"]["reason"],
                         "registered_model": result["model"], "champion.version": result["champion_version"],
                         "pipeline_run_id": pipeline["parent_run_id"]})
        parent.log_json(result, "promotion/decision.json")
    return {"parent_run_id": run_id, "pipeline": pipeline, **result}
