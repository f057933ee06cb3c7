"""Prefect flows over the DVC pipeline: run it stage by stage, retrain on a schedule, promote the model.

* ``blockdrop-pipeline``: opens a parent MLflow run, then runs every DVC stage as its own Prefect task, in
  the order DVC itself would (read from ``dvc.yaml`` through DVC's API: this file never lists stages).
  Each task is ``dvc repro --single-item <stage>`` through DVC's API in this process; the stage's command
  inherits ``$BLOCKDROP_PARENT_RUN_ID`` so its MLflow run nests under the parent, and its output goes both
  to the terminal and to the task's log in Prefect. Failed stages are retried
  (``flow.retries``), except a stage that exits 2: its params are invalid, and retrying cannot help. A
  stage DVC finds up to date is not run and is recorded as ``skipped`` on the parent run (tags
  ``stage.<name>``, metrics, and the artifact ``flow/stages.json``).
* ``blockdrop-retrain``: the pipeline as a subflow, then the registry's ``challenger`` against its
  ``champion`` on the same test split; ``champion`` moves only when ``blockdrop.promotion.decide`` says so.

``python -m pipelines.flow run|retrain|serve`` (``make flow``, ``make schedule``). This is the only module
that imports prefect; the stages and the library know nothing of it.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import logging.handlers
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.logging.handlers import APILogHandler

from blockdrop import tracking
from blockdrop.config import Params, load_params
from pipelines.prefect_server import api_url, healthy, local_server

__all__ = ["BadParamsError", "StageFailedError", "dag_order", "pipeline_flow", "retrain_flow"]

PIPELINE = "blockdrop-pipeline"
RETRAIN = "blockdrop-retrain"
DEPLOYMENT = "blockdrop-retrain-scheduled"
PREFECT_PORT = 4200
BAD_PARAMS_EXIT = 2  # blockdrop.config.load_params exits 2 on invalid params


class StageFailedError(RuntimeError):
    """A stage failed in a way that may pass on a retry (exit 1, a crash, a lost server...)."""


class BadParamsError(StageFailedError):
    """A stage refused its params (exit 2): not retried."""


# ------------------------------------------------------------------------------------------------ DVC


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) that holds ``dvc.yaml``."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    raise FileNotFoundError(f"no dvc.yaml in {start} or above: run from the project")


def dag_order(root: Path) -> list[str]:
    """Every stage of the project, dependencies first: the order ``dvc repro`` itself uses."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with Repo(str(root)) as repo:
        return [stage.addressing for stage in plan_repro(repo.index.graph)]


def _stage_env() -> dict[str, str]:
    """The flow's environment (with the parent run id) plus this interpreter's bin first on PATH, so a
    stage's ``python`` is the one running the flow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ---------------------------------------------------------------------------------------------- tasks


def _retry_unless_bad_params(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry any failure but invalid params."""
    try:
        state.result()
    except BadParamsError:
        return False
    except Exception:
        return True
    return True


class _StageOutput:
    """While open, whatever this process and its children write to fd 1 and 2 (the stage's own output,
    DVC's and Prefect's console messages) still reaches the terminal as it comes, and each line also goes
    to this task run's log in the Prefect API (through a logger with only the API handler: the console
    handler writes to fd 2, which would loop) and to ``tail``. DVC's log records are kept too.

    DVC runs a stage's command as a child that inherits these file descriptors; redirecting them is the
    only way to see that output when DVC runs in this process.
    """

    def __init__(self, stage: str, tail: int = 40) -> None:
        self.stage = stage
        self.tail: deque[str] = deque(maxlen=tail)
        self._api = logging.getLogger("blockdrop.flow.stage_output")
        self._api.propagate = False
        self._api.setLevel(logging.INFO)
        if not self._api.handlers:
            self._api.addHandler(APILogHandler())
        self._extra = dict(getattr(get_run_logger(), "extra", {}))

    def __enter__(self) -> _StageOutput:
        sys.stdout.flush(), sys.stderr.flush()
        self._saved = os.dup(1), os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 1), os.dup2(write, 2)
        os.close(write)
        self.dvc_messages = logging.handlers.BufferingHandler(capacity=1_000_000)  # DVC's, to tell what it did
        dvc_logger = logging.getLogger("dvc")
        self._dvc_level = dvc_logger.level
        dvc_logger.setLevel(logging.INFO)  # "Running stage ...", "... didn't change, skipping", as its CLI says
        dvc_logger.addHandler(self.dvc_messages)
        # The thread runs in a copy of this context: Prefect's settings (the API's URL) live in context vars.
        context = contextvars.copy_context()
        self._pump = threading.Thread(target=context.run, args=(self._forward, read), daemon=True)
        self._pump.start()
        return self

    def _forward(self, read: int) -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            for raw in iter(pipe.readline, b""):
                os.write(self._saved[0], raw)
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                self._api.info("%s | %s", self.stage, line, extra=self._extra)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("dvc").removeHandler(self.dvc_messages)
        logging.getLogger("dvc").setLevel(self._dvc_level)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(self._saved[0], 1), os.dup2(self._saved[1], 2)  # closes our pipe's last write ends
        self._pump.join()
        os.close(self._saved[0]), os.close(self._saved[1])

    def dvc_said(self, text: str) -> bool:
        return any(text in record.getMessage() for record in self.dvc_messages.buffer)


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_bad_params)
def run_stage(stage: str, root: str, force: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` through DVC's API, in this process (a ``dvc`` process per stage
    cost ~0.7 s more each, DVC's start-up); returns ``{"stage", "status": ran|skipped|restored, "seconds"}``.

    ``restored``: DVC's run cache held outputs for exactly these deps and params, and checked them out.
    """
    from dvc.repo import Repo

    logger = get_run_logger()
    t0 = time.perf_counter()
    with Repo(root) as repo:
        if not force:
            changes = repo.status(targets=[stage])
            if not changes:
                logger.info("stage %s is up to date: skipped", stage)
                return {"stage": stage, "status": "skipped", "seconds": 0.0}
            logger.info("stage %s changed: %s", stage, json.dumps(changes.get(stage, changes), default=str)[:500])
        with _StageOutput(stage) as output:
            try:
                repo.reproduce(stage, single_item=True, force=force, run_env=_stage_env())
            except Exception as error:  # DVC's ReproductionError, caused by the command's exit
                cause = f"{error}: {error.__cause__}" if error.__cause__ else str(error)
                exited = re.findall(r"exited with (-?\d+)", cause)
                code = int(exited[-1]) if exited else 1
                lines = list(output.tail)
                errors = [ln for ln in lines if ln.startswith("error:")] or [ln for ln in lines if "ERROR" in ln]
                message = f"stage {stage} failed (exit {code}): {errors[-1] if errors else cause}"
                raise (BadParamsError if code == BAD_PARAMS_EXIT else StageFailedError)(message) from error
    status = ("skipped" if output.dvc_said("didn't change, skipping")
              else "restored" if output.dvc_said("skipping run, checking out outputs") else "ran")
    return {"stage": stage, "status": status, "seconds": round(time.perf_counter() - t0, 3)}


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
    results: list[dict[str, Any]] = []
    with tracking.parent_run(PIPELINE, params) as run_id:
        parent = tracking.open_run(run_id)
        parent.log_params({"flow.force": force, "flow.retries": params.flow.retries})
        try:
            for stage in stages:  # one at a time: DVC locks the repository
                t0 = time.perf_counter()
                try:
                    result = runner(stage, str(root), force)
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
    """Score the registry's challenger and champion on the test split; move ``champion`` if it should."""
    from blockdrop.promotion import Decision, decide, score_on_test

    logger = get_run_logger()
    name = tracking.registry_name(params.data.source, params.model.depth)
    challenger = tracking.get_alias_version(name, "challenger") or tracking.latest_version(name)
    if challenger is None:
        raise RuntimeError(f"no version of registered model {name}: set tracking.log_model: true and rerun "
                           "finetune (dvc repro --force --single-item finetune)")
    champion = tracking.get_alias_version(name, "champion")
    data_dir = Path(root) / "data" / "prepared"
    scores = {"challenger": score_on_test(tracking.load_registered_model(name, challenger), data_dir)}
    if champion == challenger:
        scores["champion"] = scores["challenger"]
        decision = Decision(False, f"version {challenger} is already the champion", 0.0, 1.0)
    else:
        if champion is not None:
            scores["champion"] = score_on_test(tracking.load_registered_model(name, champion), data_dir)
        decision = decide(scores["challenger"], scores.get("champion"), params.flow.accuracy_tolerance,
                          params.flow.require_flops_not_higher)
    if decision.promote:
        tracking.set_alias(name, "champion", challenger)
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
    with tracking.parent_run(RETRAIN, params) as run_id:
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


# ------------------------------------------------------------------------------------------- schedule


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(port: int = PREFECT_PORT, startup_timeout_s: float = 120.0) -> None:
    """Serve ``blockdrop-retrain`` on ``flow.cron`` against a Prefect server on 127.0.0.1:``port``, starting
    the server if none answers there (and stopping it again on Ctrl-C)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = project_root()
    params = _load(root)
    api = api_url(port)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server too (Prefect's runner takes over later)
    try:
        with local_server(port, _stage_env(), startup_timeout_s=startup_timeout_s) as started:
            os.environ["PREFECT_API_URL"] = api  # for the flow runs the server's runner starts
            print(f"serving {RETRAIN} as deployment {DEPLOYMENT!r} on cron {params.flow.cron!r} (flow.cron)\n"
                  f"  runs, schedule and logs: Prefect UI at http://127.0.0.1:{port} (Deployments -> {DEPLOYMENT})\n"
                  f"  run now: PREFECT_API_URL={api} prefect deployment run '{RETRAIN}/{DEPLOYMENT}'\n"
                  f"  MLflow runs: make ui.  Ctrl-C stops serving" + (" and the server." if started else "."),
                  flush=True)
            with temporary_settings(updates={PREFECT_API_URL: api}):
                retrain_flow.serve(name=DEPLOYMENT, cron=params.flow.cron)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", f"run {PIPELINE} once"), ("retrain", f"run {RETRAIN} once")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--force", action="store_true", help="run every stage, even those DVC finds up to date")
    p = sub.add_parser("serve", help=f"serve {RETRAIN} on flow.cron (starts a Prefect server if needed)")
    p.add_argument("--port", type=int, default=PREFECT_PORT)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port)
        return
    chosen = pipeline_flow if args.command == "run" else retrain_flow
    local = api_url(PREFECT_PORT)
    if not os.environ.get("PREFECT_API_URL") and healthy(local, timeout=0.5):
        # The server `make schedule` runs: its UI shows this run, and no temporary server (~15 s) is started.
        from prefect.settings import PREFECT_API_URL, temporary_settings

        print(f"using the Prefect server at {local}", flush=True)
        with temporary_settings(updates={PREFECT_API_URL: local}):
            result = chosen(force=args.force)
    else:
        result = chosen(force=args.force)
    stages = result["stages"] if args.command == "run" else result["pipeline"]["stages"]
    print("stages: " + ", ".join(f"{s['stage']} {s['status']}" for s in stages))
    if args.command == "retrain":
        d = result["decision"]
        print(f"{result['model']}: challenger v{result['challenger_version']} "
              f"{'promoted to champion' if d['promote'] else 'not promoted'} ({d['reason']})")
    print(f"MLflow parent run {result['parent_run_id']} in {tracking.tracking_uri()} (make ui to browse)")


if __name__ == "__main__":
    main()
