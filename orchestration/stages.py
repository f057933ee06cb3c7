"""One DVC stage as a Prefect task, and what every flow needs around it: the project, its stages in DAG order,
the flow lock, and the errors that say which failures are worth a retry.

Each task is ``dvc repro --single-item <stage>`` through DVC's API in this process; the stage's command
inherits ``$BLOCKDROP_PARENT_RUN_ID`` so its MLflow run nests under the flow's parent run, and its output goes
both to the terminal and to the task's log in Prefect (``stage_output``). Failed stages are retried
(``flow.retries``), except a stage that exits 2 (its params are invalid, and retrying cannot help), a busy
pipeline, and a timeout. A stage running past ``flow.task_timeout_s`` is killed with its processes
(``stage_timeout``: Prefect's own timeout cannot interrupt a synchronous task): a rerun would most likely hang
again and hold the pipeline for another whole timeout. Each stage gets ``$BLOCKDROP_SUPERVISOR_PID``, this
process: if the flow is killed, the stage stops itself (``blockdrop.supervision``) instead of running on.

One flow at a time per project: a flow holds ``.dvc/tmp/blockdrop-flow.lock`` while it runs, and a second one
(or a stage meeting DVC's own lock, held by a ``dvc repro`` beside it) fails at once, not retried, saying the
pipeline is busy.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blockdrop.supervision import SUPERVISOR_ENV
from orchestration.stage_output import StageOutput
from orchestration.stage_timeout import Watchdog

__all__ = ["BadParamsError", "PipelineBusyError", "StageFailedError", "StageTimeoutError", "dag_order", "flow_lock",
           "run_stage", "stage_env"]

BAD_PARAMS_EXIT = 2  # invalid params (blockdrop.config.refuse), or raw data breaking its rules (BadDataError)
FLOW_LOCK = Path(".dvc/tmp/blockdrop-flow.lock")  # relative to the project root


class StageFailedError(RuntimeError):
    """A stage failed in a way that may pass on a retry (exit 1, a crash, a lost server...)."""


class BadParamsError(StageFailedError):
    """A stage refused its params or its raw data (exit 2): not retried."""


class PipelineBusyError(StageFailedError):
    """Another flow or ``dvc repro`` holds the project: not retried (it would wait for nothing useful)."""


class StageTimeoutError(StageFailedError):
    """A stage ran past ``flow.task_timeout_s`` and was killed: not retried."""


NOT_RETRIED = (BadParamsError, PipelineBusyError, StageTimeoutError)


def dag_order(root: Path) -> list[str]:
    """Every stage of the project, dependencies first: the order ``dvc repro`` itself uses (this package
    never lists stages). The raw data's ``.dvc`` files come first, as in ``dvc repro``: their task verifies the
    tracked folder and records a changed one (no stage command, so no MLflow run)."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with Repo(str(root)) as repo:
        return [stage.addressing for stage in plan_repro(repo.index.graph)]


def stage_env(supervised: bool = True) -> dict[str, str]:
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


def _retry_unless_bad_params(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry any failure but invalid params, a busy pipeline, a timeout."""
    try:
        state.result()
    except NOT_RETRIED:
        return False
    except Exception:
        return True
    return True


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
        with StageOutput(stage) as output, Watchdog(timeout_s) as watchdog:
            try:
                repo.reproduce(stage, single_item=True, force=force, run_env=stage_env())
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
