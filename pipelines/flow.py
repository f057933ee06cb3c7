"""Prefect flows over the DVC pipeline: run it stage by stage, retrain on a schedule, promote the model.

* ``blockdrop-pipeline``: opens a parent MLflow run, then runs every DVC stage as its own Prefect task, in
  the order DVC itself would (read from ``dvc.yaml`` through DVC's API: this file never lists stages).
  Each task is ``dvc repro --single-item <stage>`` through DVC's API in this process; the stage's command
  inherits ``$BLOCKDROP_PARENT_RUN_ID`` so its MLflow run nests under the parent, and its output goes both
  to the terminal and to the task's log in Prefect. Failed stages are retried
  (``flow.retries``), except a stage that exits 2: its params are invalid, and retrying cannot help. A
  stage DVC finds up to date is not run and is recorded as ``skipped`` on the parent run (tags
  ``stage.<name>``, metrics, and the artifact ``flow/stages.json``).
* ``blockdrop-retrain``: the pipeline as a subflow, then the registered version built from the
  ``models/blockdrop.pt`` in ``dvc.lock`` (its ``dvc_md5`` tag) against the ``champion`` on the same test
  split; ``champion`` moves only when ``blockdrop.promotion.decide`` says so, and only if nobody moved it
  meanwhile (compare-and-swap). The served deployment runs one flow run at a time (``global_limit=1``).

One flow at a time per project: a flow holds ``.dvc/tmp/blockdrop-flow.lock`` while it runs, and a second one
(or a stage meeting DVC's own lock, held by a ``dvc repro`` beside it) fails at once, not retried, saying the
pipeline is busy. A stage running past ``flow.task_timeout_s`` is killed with its processes (Prefect's own
timeout cannot interrupt a synchronous task) and fails, not retried: a rerun would most likely hang again and
hold the pipeline for another whole timeout. Each stage gets ``$BLOCKDROP_SUPERVISOR_PID``, this process: if
the flow is killed, the stage stops itself (``blockdrop.supervision``) instead of running on unsupervised.

``python -m pipelines.flow run|retrain|serve|sweep`` (``make flow``, ``make schedule``, ``make sweep``). This
module and ``pipelines/sweep.py`` (the ``blockdrop-sweep`` flow) are the only ones that import prefect; the
stages and the library know nothing of it.
"""

from __future__ import annotations

import argparse
import contextvars
import fcntl
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
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.logging.handlers import APILogHandler

from blockdrop import tracking
from blockdrop.config import Params, ParamsError, load_params, refuse
from blockdrop.supervision import SUPERVISOR_ENV
from pipelines.prefect_server import api_url, healthy, local_server

__all__ = ["BadParamsError", "PipelineBusyError", "StageFailedError", "StageTimeoutError", "dag_order", "flow_lock",
           "pipeline_flow", "retrain_flow"]

PIPELINE = "blockdrop-pipeline"
RETRAIN = "blockdrop-retrain"
DEPLOYMENT = "blockdrop-retrain-scheduled"
PREFECT_PORT = 4200
BAD_PARAMS_EXIT = 2  # blockdrop.config.load_params exits 2 on invalid params
FLOW_LOCK = Path(".dvc/tmp/blockdrop-flow.lock")  # relative to the project root
KILL_GRACE_S = 5.0  # after SIGTERM, how long a timed-out stage's processes get before SIGKILL


class StageFailedError(RuntimeError):
    """A stage failed in a way that may pass on a retry (exit 1, a crash, a lost server...)."""


class BadParamsError(StageFailedError):
    """A stage refused its params (exit 2): not retried."""


class PipelineBusyError(StageFailedError):
    """Another flow or ``dvc repro`` holds the project: not retried (it would wait for nothing useful)."""


class StageTimeoutError(StageFailedError):
    """A stage ran past ``flow.task_timeout_s`` and was killed: not retried."""


NOT_RETRIED = (BadParamsError, PipelineBusyError, StageTimeoutError)


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


def _stage_env(supervised: bool = True) -> dict[str, str]:
    """The flow's environment (with the parent run id) plus this interpreter's bin first on PATH, so a
    stage's ``python`` is the one running the flow. ``supervised``: the stage stops itself if this process
    dies (not for DVC's queue workers, which outlive the sweep's process by design)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if supervised:
        env[SUPERVISOR_ENV] = str(os.getpid())
    return env


_HELD: dict[str, int] = {}  # flow locks this process holds, with their depth (retrain holds it around pipeline)


@contextmanager
def flow_lock(root: Path) -> Iterator[None]:
    """Hold the project for one flow: an exclusive ``flock`` on ``.dvc/tmp/blockdrop-flow.lock``, taken without
    waiting (:class:`PipelineBusyError` naming the holder's pid if another process has it) and released when
    the block ends or the process dies. Re-entrant within a process (the retrain flow runs the pipeline)."""
    path = root / FLOW_LOCK
    key = str(path)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise PipelineBusyError(f"pipeline busy: another flow (pid {holder}) is running in {root} "
                                    f"(it holds {FLOW_LOCK}); try again when it has finished") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]


def _dvc_busy(error: BaseException | None) -> bool:
    """True if DVC failed on its repository lock (a ``dvc repro`` or another flow beside this one)."""
    from dvc.lock import LockError

    while error is not None:
        if isinstance(error, LockError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _busy(stage: str) -> PipelineBusyError:
    return PipelineBusyError(f"pipeline busy: stage {stage}: DVC's lock is held by another process (a dvc repro "
                             "or dvc exp run in this project?)")


class _Watchdog:
    """Kills the processes a stage started (DVC runs its command as a child of this process) once
    ``timeout_s`` has passed. Only children that appeared after the task began are touched: the temporary
    Prefect server, also a child of this process, lives on."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.fired = timeout_s, False
        self._before = {p.pid for p in psutil.Process().children()}
        self._timer = threading.Timer(timeout_s, self._kill) if timeout_s > 0 else None

    def __enter__(self) -> _Watchdog:
        if self._timer:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer:
            self._timer.cancel()

    def _kill(self) -> None:
        self.fired = True
        started = [p for p in psutil.Process().children() if p.pid not in self._before]
        tree = list(started)
        for p in started:
            with suppress(psutil.Error):
                tree += p.children(recursive=True)
        for p in tree:
            with suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(tree, timeout=KILL_GRACE_S)
        for p in alive:
            with suppress(psutil.Error):
                p.kill()


# ---------------------------------------------------------------------------------------------- tasks


def _retry_unless_bad_params(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry any failure but invalid params, a busy pipeline, a timeout."""
    try:
        state.result()
    except NOT_RETRIED:
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
def run_stage(stage: str, root: str, force: bool = False, timeout_s: float = 0.0) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` through DVC's API, in this process (a ``dvc`` process per stage
    cost ~0.7 s more each, DVC's start-up); returns ``{"stage", "status": ran|skipped|restored, "seconds"}``.

    ``restored``: DVC's run cache held outputs for exactly these deps and params, and checked them out.
    ``timeout_s`` (> 0): the stage's processes are killed when it passes (:class:`StageTimeoutError`).
    """
    try:
        return _run_stage(stage, root, force, timeout_s)
    except StageFailedError:
        raise
    except Exception as error:
        if _dvc_busy(error):
            raise _busy(stage) from None
        raise


def _run_stage(stage: str, root: str, force: bool, timeout_s: float) -> dict[str, Any]:
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
        with _StageOutput(stage) as output, _Watchdog(timeout_s) as watchdog:
            try:
                repo.reproduce(stage, single_item=True, force=force, run_env=_stage_env())
            except Exception as error:  # DVC's ReproductionError, caused by the command's exit
                if watchdog.fired:
                    raise StageTimeoutError(f"stage {stage} timed out after {timeout_s:g} s (flow.task_timeout_s): "
                                            "its processes were killed") from None
                if _dvc_busy(error):
                    raise _busy(stage) from None
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
    name = tracking.registry_name(params.data.source, params.model.depth)
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
                # global_limit: the deployment's concurrency limit, 1 across every runner serving it, which is
                # what keeps two promotions on different machines from interleaving (a file lock cannot).
                retrain_flow.serve(name=DEPLOYMENT, cron=params.flow.cron, global_limit=1)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)


def _run_flow(chosen: Any, force: bool) -> dict[str, Any]:
    local = api_url(PREFECT_PORT)
    if not os.environ.get("PREFECT_API_URL") and healthy(local, timeout=0.5):
        # The server `make schedule` runs: its UI shows this run, and no temporary server (~15 s) is started.
        from prefect.settings import PREFECT_API_URL, temporary_settings

        print(f"using the Prefect server at {local}", flush=True)
        with temporary_settings(updates={PREFECT_API_URL: local}):
            return chosen(force=force)
    return chosen(force=force)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", f"run {PIPELINE} once"), ("retrain", f"run {RETRAIN} once")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--force", action="store_true", help="run every stage, even those DVC finds up to date")
    p = sub.add_parser("serve", help=f"serve {RETRAIN} on flow.cron (starts a Prefect server if needed)")
    p.add_argument("--port", type=int, default=PREFECT_PORT)
    p = sub.add_parser("sweep", help="run every setting of sweep.grid as a DVC experiment (pipelines/sweep.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep these values of a dotted params key instead of sweep.grid (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port)
        return
    if args.command == "sweep":
        from pipelines import sweep

        try:
            grid = sweep.parse_set(args.set)
        except ParamsError as error:
            raise refuse(error) from None
        raise SystemExit(sweep.main(grid or None))
    chosen = pipeline_flow if args.command == "run" else retrain_flow
    try:
        with flow_lock(project_root()):  # a second flow fails here at once, before any server or run starts
            result = _run_flow(chosen, args.force)
    except PipelineBusyError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    stages = result["stages"] if args.command == "run" else result["pipeline"]["stages"]
    print("stages: " + ", ".join(f"{s['stage']} {s['status']}" for s in stages))
    if args.command == "retrain":
        d = result["decision"]
        print(f"{result['model']}: challenger v{result['challenger_version']} "
              f"{'promoted to champion' if d['promote'] else 'not promoted'} ({d['reason']})")
    print(f"MLflow parent run {result['parent_run_id']} in {tracking.tracking_uri()} (make ui to browse)")


if __name__ == "__main__":
    main()
