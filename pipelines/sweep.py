"""Prefect flow ``blockdrop-sweep``: every setting of ``sweep.grid`` as a DVC experiment, compared in one place.

``make sweep`` (``python -m pipelines.flow sweep``). The grid is ``sweep.grid`` in params.yaml, dotted keys to
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
* ``reports/sweep/``: ``experiments.csv`` (one row per experiment), ``settings.csv`` (one per setting, mean and
  spread over seeds, Pareto front), ``tradeoff.png`` and ``sweep.json``; the parent run logs them, and the
  report stage shows them (``dvc repro`` after the sweep; the flow does it when nothing else is stale).

Why DVC's queue and not ``dvc exp run --temp`` per Prefect task: the queue is what ``tests/test_queue.py``
has shown safe with parallel workers on one MLflow store, and its workers outlive this process's threads;
concurrent ``--temp`` runs would each take the workspace's DVC lock to stash (not measured here).
"""

from __future__ import annotations

import io
import itertools
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blockdrop import tracking
from blockdrop.analysis.tradeoff import Experiment, settings_table, tradeoff_figure
from blockdrop.config import Params, ParamsError, flatten, load_params, parse_params, refuse

SWEEP = "blockdrop-sweep"
OUT = Path("reports/sweep")
POLL_S = 5.0
NO_WORKER_S = 60.0
DONE = {"Success", "Failed"}
STATES = {"Queued", "Running", "Success", "Failed"}  # the Status column of `dvc queue status`
READ_FROM_EXPERIMENT = ("reports/evaluate/metrics.json", "reports/heuristics/by_k.csv", "params.yaml")


@dataclass(frozen=True)
class Setting:
    """One combination of the grid: its ``(dotted key, value)`` pairs and its DVC experiment's name."""

    values: tuple[tuple[str, Any], ...]
    name: str

    @property
    def overrides(self) -> list[str]:
        """``-S`` arguments of ``dvc exp run``: YAML spellings, so ``true`` stays a bool and ``2`` an int."""
        return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                for k, v in self.values]


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value).lower()
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("._") or "x"


def expand(grid: dict[str, list[Any]], prefix: str = "sweep") -> list[Setting]:
    """Every combination of ``grid``, in its order, each named ``<prefix>-<key>-<value>_...`` by the last part of
    each dotted key (the whole key, dots as dashes, where two keys end alike)."""
    last = [k.rsplit(".", 1)[-1] for k in grid]
    short = [part if last.count(part) == 1 else key.replace(".", "-") for key, part in zip(grid, last, strict=True)]
    settings = []
    for combination in itertools.product(*grid.values()):
        name = "_".join(f"{s}-{_slug(v)}" for s, v in zip(short, combination, strict=True))
        settings.append(Setting(tuple(zip(grid, combination, strict=True)), f"{prefix}-{name}"))
    return settings


def parse_set(items: list[str]) -> dict[str, list[Any]]:
    """``["finetune.penalty=1,2", "seed=0,1"]`` -> ``{"finetune.penalty": [1, 2], "seed": [0, 1]}`` (YAML values)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ParamsError(f"--set {item!r}: expected key=value[,value...]")
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


# ------------------------------------------------------------------------------------------ DVC's side


def _env(parent_run_id: str | None = None, sweep: str | None = None) -> dict[str, str]:
    """The flow's stage environment, unsupervised, naming this sweep's parent run (or none) and no experiment."""
    from pipelines.flow import _stage_env

    env = _stage_env(supervised=False)
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
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, env=env or _env(),
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


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def experiments_on_head(root: Path) -> dict[str, str]:
    """``{name: commit}`` of the finished experiments whose baseline is HEAD. Read from git's refs
    (``refs/exps/<baseline>/<name>``, DVC's layout) rather than ``dvc exp ls``, which takes DVC's lock that
    the queue's workers take too while they save an experiment."""
    head = _git(root, "rev-parse", "HEAD").strip()
    prefix = f"refs/exps/{head[:2]}/{head[2:]}/"
    out = _git(root, "for-each-ref", "--format=%(refname) %(objectname)", prefix)
    return {ref.removeprefix(prefix): sha for ref, sha in (line.split() for line in out.splitlines())}


def _read(root: Path, rev: str, path: str) -> str | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def matches(root: Path, rev: str, setting: Setting) -> bool:
    """True if the experiment at ``rev`` ran with exactly ``setting``'s values."""
    text = _read(root, rev, "params.yaml")
    flat = flatten(yaml.safe_load(text) or {}) if text else {}
    return all(key in flat and flat[key] == value for key, value in setting.values)


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


# ------------------------------------------------------------------------------------------------ tasks


@task(name="run-experiments", cache_policy=NO_CACHE)
def run_experiments(root: str, todo: list[Setting], workers: int, retries: int, parent_run_id: str,
                    sweep: str) -> dict[str, dict[str, Any]]:
    """Queue ``todo``, run it on ``workers`` DVC queue workers, queue failures again up to ``retries`` times.
    Returns ``{name: {"status": Success|Failed, "attempts": n, "log": tail of a failure's log}}``."""
    logger = get_run_logger()
    path = Path(root)
    env = _env(parent_run_id, sweep)
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


def load_experiment(root: Path, setting: Setting, rev: str) -> Experiment:
    """What the experiment at ``rev`` wrote: evaluate's metrics, the per-k heuristics, and its data/depth."""
    metrics, by_k, params_text = (_read(root, rev, p) for p in READ_FROM_EXPERIMENT)
    if metrics is None:
        raise FileNotFoundError(f"experiment {setting.name} ({rev[:7]}) has no reports/evaluate/metrics.json")
    params = parse_params(yaml.safe_load(params_text or "") or {})
    heuristics = pd.read_csv(io.StringIO(by_k)) if by_k else None
    return Experiment(setting.name, dict(setting.values), json.loads(metrics), heuristics, params.data.source,
                      params.model.depth)


def write_results(out: Path, experiments: list[Experiment], summary: dict[str, Any], title: str,
                  dpi: int = 150) -> list[Path]:
    """``experiments.csv``, ``settings.csv``, ``tradeoff.png`` and ``sweep.json`` in ``out`` (replaced whole)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("experiments.csv", "settings.csv", "tradeoff.png", "sweep.json"):
        (out / stale).unlink(missing_ok=True)
    paths = [out / "sweep.json"]
    if experiments:
        rows = [{"experiment": e.name, **e.params, **{f"{section}.{k}": v for section, m in e.metrics.items()
                                                      if isinstance(m, dict) for k, v in m.items()}}
                for e in experiments]
        pd.DataFrame(rows).to_csv(out / "experiments.csv", index=False)
        settings_table(experiments).to_csv(out / "settings.csv", index=False)
        tradeoff_figure(experiments, out / "tradeoff.png", title=title, dpi=dpi)
        paths += [out / "experiments.csv", out / "settings.csv", out / "tradeoff.png"]
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return paths


# ------------------------------------------------------------------------------------------------- flow


def _same_results(out: Path, summary: dict[str, Any]) -> bool:
    """True if ``out/sweep.json`` describes the same grid and baseline, and the same experiment commits."""
    try:
        before = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError):
        return False
    commits = {n: e.get("commit") for n, e in summary["experiments"].items()}
    return (before.get("grid") == summary["grid"] and before.get("baseline") == summary["baseline"]
            and {n: e.get("commit") for n, e in before.get("experiments", {}).items()} == commits)


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
    from pipelines.flow import flow_lock, project_root

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
        summary = {"grid": s.grid, "workers": s.workers, "baseline": _git(root, "rev-parse", "HEAD").strip(),
                   "parent_run_id": run_id, "wall_seconds": round(wall, 1), "mlflow": links,
                   "ran": sum(r["status"] == "Success" for r in results.values()),
                   "experiments": {x.name: {"values": dict(x.values), "commit": existing.get(x.name),
                                            "evaluate_run_id": runs.get(x.name), **results[x.name]}
                                   for x in settings}}
        if _same_results(root / OUT, summary):  # a rerun that ran nothing: leave the files (and the report) be
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
            repo.reproduce("report", single_item=True, run_env=_env(parent_run_id, sweep))
            return "reports/report.html updated (dvc repro report)"
    return "reports/report.html is up to date"


def main(grid: dict[str, list[Any]] | None = None) -> int:
    """Run the sweep and print where its results are; the exit code says whether every setting finished."""
    from pipelines.flow import PipelineBusyError, _run_flow, flow_lock, project_root

    root = project_root()
    try:
        sweep_params(root, grid)  # bad params: exit 2 now, before any server or run starts
    except ParamsError as error:
        raise refuse(error) from None
    try:
        with flow_lock(root):
            result = _run_flow(lambda force: sweep_flow(grid=grid), force=False)
    except PipelineBusyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, r in result["results"].items():
        print(f"  {name}: {r['status'].lower()}" + (f" after {r['attempts']} attempts" if r["attempts"] > 1 else ""))
    print(f"wall time {result['wall_seconds']:.0f} s; results in {OUT}/ (settings.csv, tradeoff.png)")
    print(result["report"])
    print(f"MLflow (make ui): parent run {result['links']['parent']}\n"
          f"  settings side by side: {result['links']['compare']}")
    if result["failed"]:
        print(f"error: {len(result['failed'])} settings failed after their retries: {', '.join(result['failed'])} "
              f"(dvc queue logs <name>)", file=sys.stderr)
        return 1
    return 0
