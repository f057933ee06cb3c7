"""DVC's experiment queue, driven from a flow: queue settings (``dvc exp run --queue -S ...``), start workers
(``dvc queue start -j N``), follow ``dvc queue status``, queue failures again, and find the experiments
already saved on HEAD.

Why DVC's queue and not ``dvc exp run --temp`` per Prefect task: the queue is what ``tests/test_queue.py``
has shown safe with parallel workers on one MLflow store, and its workers outlive this process's threads;
concurrent ``--temp`` runs would each take the workspace's DVC lock to stash (not measured here).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blockdrop import project, tracking
from orchestration.grid import Setting
from orchestration.stages import stage_env

__all__ = ["dvc", "experiments_on_head", "git", "queue_env", "queue_status", "read_at", "run_experiments",
           "start_workers", "stop_idle_workers"]

POLL_S = 5.0
NO_WORKER_S = 60.0
DONE = {"Success", "Failed"}
STATES = {"Queued", "Running", "Success", "Failed"}  # the Status column of `dvc queue status`


def queue_env(parent_run_id: str | None = None, sweep: str | None = None) -> dict[str, str]:
    """The flow's stage environment, unsupervised (the queue's workers outlive this process by design), naming
    this sweep's parent run (or none) and no experiment."""
    env = stage_env(supervised=False)
    for var in ("DVC_EXP_NAME", "DVC_ROOT", tracking.PARENT_ENV, tracking.SWEEP_ENV):
        env.pop(var, None)
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id  # inherited by the queue workers, then by every stage they run
    if sweep:
        env[tracking.SWEEP_ENV] = sweep
    return env


def dvc(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """The ``dvc`` CLI of this interpreter's environment, in ``root``."""
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, env=env or queue_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    return proc


def start_workers(root: Path, workers: int, env: dict[str, str]) -> None:
    """``dvc queue start -j N``. Its output goes to a file, not a pipe: the workers it spawns inherit the
    command's stdout and stderr, and reading a pipe would wait for them to exit, i.e. for the whole queue."""
    log = root / ".dvc" / "tmp" / "blockdrop-sweep-workers.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        cmd = [str(Path(sys.executable).parent / "dvc"), "queue", "start", "-j", str(workers)]
        code = subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                              timeout=120).returncode
    if code != 0:
        raise RuntimeError(f"dvc queue start -j {workers} failed ({code}): see {log}")


def git(root: Path, *args: str) -> str:
    """``git <args>`` in ``root``: its stdout, stripped; RuntimeError if git fails (the sweep cannot go on)."""
    out = project.git(*args, cwd=root)
    if out is None:
        raise RuntimeError(f"git {' '.join(args)} failed in {root}")
    return out


def experiments_on_head(root: Path) -> dict[str, str]:
    """``{name: commit}`` of the finished experiments whose baseline is HEAD. Read from git's refs
    (``refs/exps/<baseline>/<name>``, DVC's layout) rather than ``dvc exp ls``, which takes DVC's lock that
    the queue's workers take too while they save an experiment."""
    head = git(root, "rev-parse", "HEAD").strip()
    prefix = f"refs/exps/{head[:2]}/{head[2:]}/"
    out = git(root, "for-each-ref", "--format=%(refname) %(objectname)", prefix)
    return {ref.removeprefix(prefix): sha for ref, sha in (line.split() for line in out.splitlines())}


def read_at(root: Path, rev: str, path: str) -> str | None:
    """The text of ``path`` at commit ``rev`` (an experiment's), or None if it has none."""
    return project.git("show", f"{rev}:{path}", cwd=root)


def queue_status(root: Path) -> tuple[dict[str, str], int]:
    """From one ``dvc queue status``: ``{experiment name: Queued|Running|Success|Failed}`` and the number of
    this project's queue workers alive (active or idle)."""
    text = dvc(root, "queue", "status").stdout
    status: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        state = next((w for w in words if w in STATES), None)
        if state and len(words) >= 2:
            status[words[1]] = state  # task, name, created..., status
    m = re.search(r"Worker status: (\d+) active, (\d+) idle", text)
    return status, (int(m.group(1)) + int(m.group(2)) if m else 0)


def stop_idle_workers(root: Path, timeout_s: float = 60.0) -> None:
    """Workers left from an earlier queue carry that queue's environment (its parent run): stop them, so the
    ones this sweep starts carry its own."""
    if not queue_status(root)[1]:
        return
    dvc(root, "queue", "stop", check=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and queue_status(root)[1]:
        time.sleep(1.0)


def _log_tail(root: Path, name: str, lines: int = 15) -> str:
    text = dvc(root, "queue", "logs", name, check=False).stdout.strip().splitlines()
    return "\n".join(text[-lines:])


@task(name="run-experiments", cache_policy=NO_CACHE)
def run_experiments(root: str, todo: list[Setting], workers: int, retries: int, parent_run_id: str,
                    sweep: str) -> dict[str, dict[str, Any]]:
    """Queue ``todo``, run it on ``workers`` DVC queue workers, queue failures again up to ``retries`` times.
    Returns ``{name: {"status": Success|Failed, "attempts": n, "log": tail of a failure's log}}``."""
    logger = get_run_logger()
    path = Path(root)
    env = queue_env(parent_run_id, sweep)
    results: dict[str, dict[str, Any]] = {s.name: {"status": "Queued", "attempts": 0, "log": ""} for s in todo}
    pending = list(todo)
    for attempt in range(1, retries + 2):
        stop_idle_workers(path)  # before queueing: an idle worker of an earlier queue would take these
        stale = queue_status(path)[0]
        leftovers = [s.name for s in pending if stale.get(s.name) in DONE]  # a failure of an earlier sweep
        if leftovers:
            dvc(path, "queue", "remove", *leftovers, check=False)
        for s in pending:
            dvc(path, "exp", "run", "--queue", "--name", s.name, *[a for o in s.overrides for a in ("-S", o)], env=env)
            results[s.name]["attempts"] = attempt
        logger.info("attempt %d: queued %d experiments: %s", attempt, len(pending), ", ".join(s.name for s in pending))
        start_workers(path, workers, env)
        status = _wait(path, [s.name for s in pending], workers, env, logger)
        failed = [s for s in pending if status.get(s.name) != "Success"]
        for s in pending:
            results[s.name]["status"] = status.get(s.name, "Failed")
            if s in failed:
                results[s.name]["log"] = _log_tail(path, s.name)
                logger.warning("%s failed (attempt %d of %d):\n%s", s.name, attempt, retries + 1,
                               results[s.name]["log"])
        pending = failed
        if not pending:
            break
    stop_idle_workers(path)
    return results


def _wait(root: Path, names: list[str], workers: int, env: dict[str, str], logger: Any) -> dict[str, str]:
    """Poll ``dvc queue status`` until every one of ``names`` is done; log each change of state. Workers that
    are all gone for ``NO_WORKER_S`` while some experiments still wait (killed, crashed) are started again."""
    seen: dict[str, str] = {}
    no_worker_since: float | None = None
    while True:
        everything, alive = queue_status(root)
        status = {n: s for n, s in everything.items() if n in names}
        for name, state in status.items():
            if seen.get(name) != state:
                done = sum(v in DONE for v in status.values())
                logger.info("%s: %s (%d of %d done)", name, state, done, len(names))
        seen = status
        if len(status) == len(names) and set(status.values()) <= DONE:
            return status
        if alive or "Running" in status.values():
            no_worker_since = None
        elif no_worker_since is None:
            no_worker_since = time.monotonic()
        elif time.monotonic() - no_worker_since > NO_WORKER_S:
            logger.warning("no queue worker left with experiments still queued: starting %d again", workers)
            start_workers(root, workers, env)
            no_worker_since = None
        time.sleep(POLL_S)
