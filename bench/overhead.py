"""What orchestration and tracking cost, measured in one run on the tiny profile in a temporary copy.

1. ``dvc repro --force``, then ``python -m orchestration run --force`` (the Prefect flow: one task per
   stage through DVC's API in the flow's process, a parent MLflow run) twice in the same copy: against a
   running ``prefect server start`` (started untimed, as the database is; what ``make schedule``, a
   deployment or a configured ``PREFECT_API_URL`` use), and with no server, when the flow process starts
   Prefect's temporary server for itself. Each is timed from outside as a subprocess and runs every stage;
   printed as ``flow overhead, ...: +X s (ratio Y)``.
2. Every stage records, through ``$BLOCKDROP_TRACKING_TIMES``, the seconds its own process spent in
   ``blockdrop.tracking`` (importing mlflow, connecting, starting and ending the run, logging params,
   metrics, artifacts and the model) and the lifetime of the process; the ratio is MLflow's share.
   The tiny profile's stages last seconds, so the ~2.5 s a stage pays to import mlflow dominates there;
   the same figures for the default profile are read from the ``tracking/*`` metrics that every stage
   run logs, for the last run of each stage in this workspace's store (``make repro``).

3. With ``--tracking-server``, the same share against a shared MLflow server instead of SQLite: PostgreSQL and
   ``mlflow server`` from ``ops/tracking_server.py`` (``make tracking-server``), started untimed on free
   loopback ports, with ``dvc repro --force`` run once against each store; the flows are not run then.

4. With ``--tracking-server --default-profile``, the default profile's pipeline (this checkout's params.yaml and
   the real Fashion-MNIST, in a temporary copy) once, against the server only: the share the goal is about. Its
   SQLite counterpart is the last full pipeline in this workspace's own store (3.), printed beside it.

    python bench/overhead.py                     # about 3 x the tiny pipeline's time (4-6 min here)
    python bench/overhead.py --tracking-server   # about 2 x, plus the servers' start-up
    python bench/overhead.py --tracking-server --default-profile   # one default pipeline (about 20 min here)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tinyrepo import drop_dvc_remotes, make_tiny_repo, project_files  # noqa: E402

from ops.tracking_server import tracking_server  # noqa: E402
from orchestration.prefect_server import api_url, local_server  # noqa: E402

FLOW_GOAL_S = 20.0
LABELS = {"dvc": "dvc repro --force:",
          "dvc-server": "dvc repro --force (MLflow server over PostgreSQL):",
          "flow": "python -m orchestration run --force (running server):",
          "flow-temp": "python -m orchestration run --force (no server):"}
SERVERS = {"flow": "a running Prefect server", "flow-temp": "its temporary Prefect server"}
TRACKING_GOAL = 0.02


def default_copy(dst: Path) -> Path:
    """The project as git sees it, with this checkout's params.yaml (the default profile) and no DVC remote, in a
    git repository of its own; ``prepare`` reads the real Fashion-MNIST as ``make repro`` does."""
    for rel in project_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst / rel)
    if (REPO / "data" / "raw").exists():
        shutil.copytree(REPO / "data" / "raw", dst / "data" / "raw", symlinks=True)
    drop_dvc_remotes(dst)
    subprocess.run(["git", "-c", "init.defaultBranch=main", "init", "-q"], cwd=dst, check=True)
    return dst


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} exited with {proc.returncode}; see {log}")
    return seconds


def read_times(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(log: Path) -> Iterator[str]:
    """PostgreSQL and ``mlflow server`` on free loopback ports (started untimed, stopped after); yields its URI."""
    # A folder of its own, not inside the copy's: mkdtemp makes 0700 folders, and as root the cluster runs
    # as the postgres user, who must get through every folder above it.
    state = Path(tempfile.mkdtemp(prefix="blockdrop-tracking-"))
    t0 = time.perf_counter()
    try:
        with log.open("w") as out, tracking_server(state, free_port(), free_port(), stdout=out) as server:
            print(f"(PostgreSQL and the MLflow server started once, untimed: {time.perf_counter() - t0:.1f} s)",
                  flush=True)
            yield server.uri
    finally:
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def prefect_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """``prefect server start`` on a free loopback port (started untimed, stopped after); yields its API URL."""
    port = free_port()
    t0 = time.perf_counter()
    with log.open("w") as out, local_server(port, env, stdout=out, startup_timeout_s=180):
        print(f"(Prefect server started once, untimed: {time.perf_counter() - t0:.1f} s)", flush=True)
        yield api_url(port)


def flow_task_seconds(uri: str) -> float:
    """Sum of the last flow's per-stage task times, as its parent run logged them."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("blockdrop")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'blockdrop-pipeline'",
                                order_by=["attributes.start_time DESC"], max_results=1)  # the run just made
    return sum(v for k, v in run.data.metrics.items() if k.startswith("stage_seconds/"))


def workspace_share() -> None:
    """The same share for the stage runs of the last full pipeline in this workspace's own store (the
    default profile's `make repro`), from the ``tracking/*`` metrics every stage run logs about itself."""
    db = REPO / "mlflow.db"
    if not db.exists():
        return
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("blockdrop")
    if experiment is None:
        return
    query = "metrics.`tracking/share` >= 0 and attributes.status = 'FINISHED'"
    runs = client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time DESC"],
                              max_results=200)
    latest: dict[str, object] = {}
    for run in runs:  # newest first: the last run of each stage
        latest.setdefault(run.info.run_name, run)
    if not latest:
        return
    print(f"\nThe last run of each stage in this workspace's store ({db}):")
    tracked = total = 0.0
    for name, run in sorted(latest.items(), key=lambda kv: kv[1].info.start_time):
        m = run.data.metrics
        tracked, total = tracked + m["tracking/seconds"], total + m["tracking/process_seconds"]
        print(f"  {name:<11} {m['tracking/seconds']:10.2f} {m['tracking/import_seconds']:9.2f} "
              f"{m['tracking/log_model_seconds']:11.2f} {m['tracking/process_seconds']:10.1f} "
              f"{m['tracking/share']:7.1%}")
    print(f"MLflow logging there: {tracked:.1f} s of {total:.1f} s stage time = {tracked / total:.1%}  "
          f"[goal: under {TRACKING_GOAL:.0%}: {'met' if tracked / total < TRACKING_GOAL else 'NOT met'}]")


def tracking_share(rows: list[dict], store: str) -> None:
    """MLflow's share of one ``dvc repro`` run's stage processes, per stage and in all."""
    print(f"\nMLflow logging inside each stage (dvc repro run, {store}):")
    print(f"  {'stage':<11} {'tracking s':>10} {'import s':>9} {'log_model s':>11} {'process s':>10} {'share':>7}")
    for r in rows:
        share = r["tracking_s"] / r["process_s"] if r["process_s"] else float("nan")
        print(f"  {r['stage']:<11} {r['tracking_s']:10.2f} {r['import_s']:9.2f} {r['log_model_s']:11.2f} "
              f"{r['process_s'] or 0:10.1f} {share:7.1%}")
    stages_s = sum(r["process_s"] or 0 for r in rows)
    tracking_s = sum(r["tracking_s"] for r in rows)
    import_s = sum(r["import_s"] for r in rows)
    model_s = sum(r["log_model_s"] for r in rows)
    share = tracking_s / stages_s if stages_s else float("nan")
    print(f"MLflow logging ({store}): {tracking_s:.1f} s of {stages_s:.1f} s stage time = {share:.1%}  "
          f"[goal: under {TRACKING_GOAL:.0%}: {'met' if share < TRACKING_GOAL else 'NOT met'}]")
    fixed = (tracking_s - model_s) / max(len(rows), 1)
    print(f"  of which importing mlflow {import_s:.1f} s, log_model {model_s:.1f} s; about {fixed:.1f} s per stage "
          f"is fixed (imports, store, run start/end), so the share falls as stages grow: with this tracking "
          f"time it is under {TRACKING_GOAL:.0%} once the stages take {tracking_s / TRACKING_GOAL / 60:.0f} min")


def flow_overhead(wall: dict[str, float], tasks: dict[str, float], rows: dict[str, list[dict]]) -> None:
    """The flows' cost over plain ``dvc repro``, outside the stage processes."""
    stages = {name: sum(r["process_s"] or 0 for r in rs) for name, rs in rows.items()}
    # The stages' own compute varies between two runs on a busy machine far more than orchestration costs,
    # so the overhead is compared outside the stage processes: wall time minus the stages' process time.
    outside = {name: wall[name] - stages[name] for name in wall}
    print(f"  dvc repro: {stages['dvc']:6.1f} s in {len(rows['dvc'])} stage processes, "
          f"{outside['dvc']:5.1f} s outside them (DVC's start-up, checks, hashes, lock file)")
    for name in ("flow", "flow-temp"):
        print(f"  {name + ':':<10} {stages[name]:6.1f} s in {len(rows[name])} stage processes, "
              f"{outside[name]:5.1f} s outside them: {tasks[name] - stages[name]:.1f} s in DVC's API around the "
              f"stages, {wall[name] - tasks[name]:.1f} s Prefect (import, {SERVERS[name]}, flow and task runs) "
              "and the parent run")
    for name in ("flow", "flow-temp"):
        extra = outside[name] - outside["dvc"]
        ratio = (wall["dvc"] + extra) / wall["dvc"]
        verdict = "met" if extra < FLOW_GOAL_S else "NOT met"
        print(f"flow overhead, {SERVERS[name] + ':':<30} {extra:+5.1f} s (ratio {ratio:.2f})  "
              f"[goal: under {FLOW_GOAL_S:.0f} s more: {verdict}]")
    print("  (the temporary server is what a flow process without a Prefect server starts for itself; "
          "`make schedule`, deployments and a configured PREFECT_API_URL use a running one)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("--tracking-server", action="store_true",
                        help="MLflow's share against SQLite and against a local MLflow server over PostgreSQL "
                             "(make tracking-server), one dvc repro --force each; the flows are not run")
    parser.add_argument("--default-profile", action="store_true",
                        help="with --tracking-server: the default profile's pipeline against the server only")
    args = parser.parse_args()
    if args.default_profile and not args.tracking_server:
        parser.error("--default-profile goes with --tracking-server (SQLite's figure is this workspace's store)")
    tmp = Path(tempfile.mkdtemp(prefix="blockdrop-overhead-"))
    root = default_copy(tmp / "repo") if args.default_profile else make_tiny_repo(tmp / "repo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("BLOCKDROP_PARENT_RUN_ID", "DVC_ROOT", "PREFECT_API_URL")}
    env.update({"MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"})
    env.setdefault("PREFECT_HOME", str(tmp / "prefect-home"))
    # Create the MLflow and Prefect databases (their migrations take seconds; a user's already exist)
    # before either timed run: what is timed is the cost of every run, not of the first one ever. The
    # tracking server creates its PostgreSQL schema when it starts, untimed too.
    create = f"from mlflow import MlflowClient; MlflowClient({uri!r}).search_experiments()"
    subprocess.run([sys.executable, "-c", create], env=env, check=True, capture_output=True)
    dvc = [sys.executable, "-m", "dvc", "repro", "--force"]
    flow = [sys.executable, "-m", "orchestration", "run", "--force"]
    if args.default_profile:
        runs = {"dvc-server": dvc}
    elif args.tracking_server:
        runs = {"dvc": dvc, "dvc-server": dvc}
    else:
        prefect = Path(sys.executable).parent / "prefect"
        t0 = time.perf_counter()
        subprocess.run([str(prefect), "server", "database", "upgrade", "-y"], env=env, check=True,
                       capture_output=True)
        print(f"(Prefect database created once, untimed: {time.perf_counter() - t0:.1f} s)")
        runs = {"dvc": dvc, "flow-temp": flow, "flow": flow}

    print(f"{'default' if args.default_profile else 'tiny'} profile in {root}", flush=True)
    wall: dict[str, float] = {}
    tasks: dict[str, float] = {}
    for name, cmd in runs.items():
        # Stages keep per-epoch resume state in checkpoints/ (not a DVC out); left in place, a second run
        # would resume the finished training instead of redoing it.
        shutil.rmtree(root / "checkpoints", ignore_errors=True)
        run_env = {**env, "BLOCKDROP_TRACKING_TIMES": str(tmp / f"times-{name}.jsonl")}
        # A server runs only around its own run: idle, it still polls its database.
        if name == "flow":
            server = prefect_server(env, tmp / "prefect-server.log")
        elif name == "dvc-server":
            server = mlflow_server(tmp / "tracking-server.log")
        else:
            server = contextlib.nullcontext()
        with server as address:
            if name == "flow":
                run_env["PREFECT_API_URL"] = address
            elif name == "dvc-server":
                run_env["MLFLOW_TRACKING_URI"] = address
            wall[name] = timed(cmd, root, run_env, tmp / f"{name}.log")
        if name.startswith("flow"):
            tasks[name] = flow_task_seconds(uri)
        print(f"{LABELS[name]:<52} {wall[name]:7.1f} s", flush=True)

    rows = {name: read_times(tmp / f"times-{name}.jsonl") for name in runs}
    if not args.tracking_server:
        flow_overhead(wall, tasks, rows)
    if "dvc" in rows:
        tracking_share(rows["dvc"], "SQLite")
    if args.tracking_server:
        tracking_share(rows["dvc-server"], "MLflow server over PostgreSQL")
    workspace_share()
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
